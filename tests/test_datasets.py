import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_human_preferences.language.datasets import (PassageFile, QueryDataset, QueryDatasetError, get_passages,
                                                    preprocess_query, register_dataset, registered_datasets,
                                                    write_passages_jsonl)
from lm_human_preferences.language.encodings import get_encoding

ROOT = Path(__file__).resolve().parents[1]
P = 99  # pad token for the explicit-token cases


def pq(tokens, query_length=8, start=None, end=None):
    return preprocess_query(tokens, query_length=query_length, start_token=start, end_token=end, pad_token=P)


# ---- docs/original.md §4 preprocessing ----

def test_start_token_keeps_tokens_after_first_occurrence():
    assert pq([1, 2, 13, 3, 4, 13, 5], start=[13]) == [3, 4, 13, 5, P, P, P, P]


def test_start_token_absent_skips():
    assert pq([1, 2, 3], start=[13]) is None


def test_start_token_at_the_end_keeps_passage_whole_like_oai():
    assert pq([1, 2, 13], start=[13]) == [1, 2, 13, P, P, P, P, P]


def test_end_token_cuts_after_last_occurrence_and_pads():
    assert pq([3, 13, 4, 13, 5], end=[13]) == [3, 13, 4, 13, P, P, P, P]
    assert pq([3, 4, 5], end=[13]) is None


def test_truncation_happens_before_end_search():
    assert pq([1, 13, 2, 3, 13], query_length=3, end=[13]) == [1, 13, P]
    assert pq([1, 2, 3, 13], query_length=3, end=[13]) is None


def test_start_and_end_together():
    assert pq([1, 13, 2, 3, 13, 4, 5, 13, 6, 7], query_length=6, start=[13], end=[13]) == [2, 3, 13, 4, 5, 13]
    assert pq([1, 13, 2, 3, 13, 4, 5, 13, 6, 7], query_length=5, start=[13], end=[13]) == [2, 3, 13, P, P]


def test_multi_token_start_and_end_sequences():
    tokens = [1, 7, 8, 2, 7, 3, 8, 9, 8, 4]
    assert pq(tokens, query_length=10, start=[7, 8]) == [2, 7, 3, 8, 9, 8, 4, P, P, P]
    assert pq(tokens, query_length=10, start=[7, 8], end=[9, 8]) == [2, 7, 3, 8, 9, 8, P, P, P, P]
    assert pq(tokens, start=[8, 7]) is None


def test_disabled_start_end_and_empty_query():
    assert pq([1, 2, 3], start=[], end=None) == [1, 2, 3, P, P, P, P, P]
    assert pq([1, 2, 3, 4, 5, 6, 7, 8, 9]) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert pq([]) is None


def test_gpt2_period_is_token_13():
    enc = get_encoding("gpt2")
    tokens = enc.encode("He left. She smiled and waved. Then")
    assert enc.encode(".") == [13]
    query = preprocess_query(tokens, query_length=10, start_token=[13], end_token=[13], pad_token=enc.padding_token)
    assert enc.decode(query) == " She smiled and waved."
    assert query[-1] == 50259


# ---- passage sources ----

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_txt_source_skips_blank_lines_and_reshuffles_each_epoch(tmp_path):
    lines = [f"passage {i}" for i in range(20)]
    path = write_lines(tmp_path / "p.txt", lines[:10] + ["", "   "] + lines[10:])
    source = get_passages(str(path), data_dir=tmp_path, seed=3)
    epoch0 = [next(source) for _ in range(20)]
    epoch1 = [next(source) for _ in range(20)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(lines)
    assert epoch0 != epoch1
    again = get_passages(path, data_dir=tmp_path, seed=3)
    assert [next(again) for _ in range(20)] == epoch0
    other = get_passages(path, data_dir=tmp_path, seed=4)
    assert [next(other) for _ in range(20)] != epoch0


def test_jsonl_source_and_missing_text_error(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"text": "a\nb"}), json.dumps({"text": "c", "id": 1})])
    source = PassageFile(path, seed=0)
    assert sorted(next(source) for _ in range(2)) == ["a\nb", "c"]
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), "", json.dumps({"body": "x"})])
    source = PassageFile(bad, seed=0)
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*'text'"):
        [next(source) for _ in range(2)]


def test_registered_dataset_must_be_prepared(tmp_path):
    assert {"books", "cnndm", "tldr"} <= set(registered_datasets())
    with pytest.raises(FileNotFoundError, match=r"python datasets/books\.py"):
        get_passages("books", data_dir=tmp_path, seed=0)
    write_passages_jsonl(tmp_path / "books" / "train.jsonl", ["one.", "two."])
    source = get_passages("books", data_dir=tmp_path, seed=0)
    assert sorted(next(source) for _ in range(2)) == ["one.", "two."]


def test_unknown_dataset_lists_registered_names(tmp_path):
    with pytest.raises(ValueError, match="books"):
        get_passages("no_such_dataset", data_dir=tmp_path, seed=0)
    with pytest.raises(FileNotFoundError):
        get_passages(str(tmp_path / "missing.txt"), data_dir=tmp_path, seed=0)


def test_register_dataset(tmp_path):
    register_dataset("test_letters", lambda *, data_dir, split, seed: iter(["abc"] * 5))
    assert next(get_passages("test_letters", data_dir=tmp_path, seed=0)) == "abc"
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("test_letters", lambda **kw: iter([]))


def test_write_passages_jsonl_is_atomic_and_overwrites(tmp_path):
    out = tmp_path / "d" / "train.jsonl"
    assert write_passages_jsonl(out, ["x", "y\nz"]) == 2
    with pytest.raises(RuntimeError):
        write_passages_jsonl(out, (p if p != "boom" else (_ for _ in ()).throw(RuntimeError()) for p in ["a", "boom"]))
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == ["x", "y\nz"]
    assert os.listdir(out.parent) == ["train.jsonl"]


# ---- query batches: sharding and resumption ----

ENC = get_encoding("test")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def corpus(tmp_path):
    import random
    rng = random.Random(0)
    lines = ["".join(rng.choice(LETTERS + "..") for _ in range(rng.randint(3, 30))) for _ in range(37)]
    return write_lines(tmp_path / "corpus.txt", lines)


def make(path, *, batch_size, rank=0, world_size=1, seed=1):
    return QueryDataset(PassageFile(path, seed=seed), encoding=ENC, query_length=8, start_text=".", end_text=".",
                        batch_size=batch_size, rank=rank, world_size=world_size)


@pytest.mark.parametrize("start, end, option", [("qqqq", ".", "start_text"), ("", "qqqq", "end_text")])
def test_a_dataset_without_any_query_is_an_error_not_a_hang(corpus, start, end, option):
    queries = QueryDataset(PassageFile(corpus, seed=0), encoding=ENC, query_length=8, start_text=start or None,
                           end_text=end, batch_size=4)
    with pytest.raises(QueryDatasetError, match=rf"^{option}: none of the 37 passages of the query dataset gives "
                                                rf"a query: .*'qqqq' \(tokens \[.*\]\) must occur") as error:
        next(queries)
    assert error.value.option == option and not error.value.problem.startswith(option)
    assert queries.skipped == 2 * 37


def test_a_source_of_unknown_size_without_any_query_is_an_error_too(monkeypatch):
    from lm_human_preferences.language import datasets

    monkeypatch.setattr(datasets, "NO_QUERY_LIMIT", 50)
    endless = iter(lambda: "abcdef", None)  # no length, never a period
    queries = QueryDataset(endless, encoding=ENC, query_length=8, start_text=".", end_text=None, batch_size=2)
    with pytest.raises(QueryDatasetError, match=r"^start_text: none of 50 passages in a row of the query dataset"):
        next(queries)


def test_a_source_of_empty_passages_names_the_passages(monkeypatch):
    from lm_human_preferences.language import datasets

    monkeypatch.setattr(datasets, "NO_QUERY_LIMIT", 50)
    queries = QueryDataset(iter(lambda: "", None), encoding=ENC, query_length=8, start_text=None, end_text=None,
                           batch_size=1)
    with pytest.raises(QueryDatasetError, match=r"^passages: none of 50 passages in a row .* \(they are all empty\)"):
        next(queries)


def test_a_start_text_outside_the_vocabulary_is_an_error_at_once():
    from lm_human_preferences.language.encodings import SubsetEncoding

    enc = SubsetEncoding.from_texts(["the cat sat. the dog ran."])
    with pytest.raises(QueryDatasetError, match=r"^start_text: 'zebra' is not in the model's vocabulary") as error:
        QueryDataset(iter(["the cat sat."]), encoding=enc, query_length=8, start_text="zebra", end_text=".",
                     batch_size=1)
    assert error.value.option == "start_text"


def test_query_batches_are_padded_and_count_skips(corpus):
    queries = make(corpus, batch_size=4)
    batches = [next(queries) for _ in range(10)]
    for batch in batches:
        assert batch.shape == (4, 8) and batch.dtype == torch.long
        for row in batch.tolist():
            text = ENC.decode(row)
            assert text.endswith(".") and row[len(text):] == [ENC.padding_token] * (8 - len(text))
    assert queries.skipped > 0
    assert queries.passages_consumed == 40 + queries.skipped


def test_two_ranks_interleave_to_one_rank_double_batch(corpus):
    single = make(corpus, batch_size=6)
    ranks = [make(corpus, batch_size=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(8):
        full = next(single)
        parts = [next(q) for q in ranks]
        assert torch.equal(parts[0], full[0::2]) and torch.equal(parts[1], full[1::2])
    assert single.skipped == ranks[0].skipped == ranks[1].skipped


def test_resume_from_state_dict_gives_same_next_batches(corpus):
    queries = make(corpus, batch_size=5, rank=1, world_size=2)
    for _ in range(4):
        next(queries)
    state = json.loads(json.dumps(queries.state_dict()))  # survives a JSON round trip
    expected = [next(queries) for _ in range(6)]  # crosses epoch boundaries (37 passages)
    resumed = make(corpus, batch_size=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(6)]))
    assert resumed.skipped == queries.skipped and resumed.passages_consumed == queries.passages_consumed


def test_resume_over_plain_iterator_skips_consumed_passages():
    def passages():
        i = 0
        while True:
            yield LETTERS[i % 26] * (i % 5) + "." + LETTERS[(i + 3) % 26] + "."
            i += 1

    def build():
        return QueryDataset(passages(), encoding=ENC, query_length=4, start_text=".", end_text="", batch_size=3)

    queries = build()
    next(queries), next(queries)
    state = queries.state_dict()
    resumed = build()
    resumed.load_state_dict(state)
    assert torch.equal(next(queries), next(resumed))


# ---- prep scripts, run as a user would ----

def run_prep(script, *args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(cwd / "hf"))
    proc = subprocess.run([sys.executable, str(ROOT / "datasets" / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def read_texts(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_no_init_in_datasets_folder():
    assert not (ROOT / "datasets" / "__init__.py").exists()


def test_books_prep_detokenizes_and_groups_sentences(tmp_path):
    sentences = [f"he said , `` i do n't know number {i} . ''" for i in range(60)]
    write_lines(tmp_path / "books.jsonl", [json.dumps({"text": s}) for s in sentences])
    run_prep("books.py", "--source", tmp_path / "books.jsonl", "--out-dir", tmp_path / "out", cwd=tmp_path)
    passages = read_texts(tmp_path / "out" / "books" / "train.jsonl")
    assert passages[0].startswith('He said, "I don\'t know number 0." He said,')
    assert " ".join(passages).count("He said") == 60
    assert len(passages) > 1 and all(len(p) <= 1100 for p in passages)
    assert sorted(os.listdir(tmp_path / "out" / "books")) == ["train.jsonl"]


def test_cnndm_prep_from_parquet_cleans_articles(tmp_path):
    pd = pytest.importorskip("pandas")
    articles = ["LONDON, England (CNN) -- Harry Potter star Daniel Radcliffe turns 18.",
                "By . Daily Mail Reporter . PUBLISHED: . 14:11 EST, 25 October 2013 . | . UPDATED: . "
                "15:36 EST, 25 October 2013 . A man\u2019s dog was found.",
                "(CNN)The Palestinian Authority joined.\n\n\n\nMore text.",
                "   "]
    pd.DataFrame({"article": articles, "highlights": ["x"] * 4}).to_parquet(tmp_path / "cnndm.parquet")
    run_prep("cnndm.py", "--source", tmp_path / "cnndm.parquet", "--out-dir", tmp_path / "out", "--split",
             "validation", cwd=tmp_path)
    assert read_texts(tmp_path / "out" / "cnndm" / "validation.jsonl") == [
        "Harry Potter star Daniel Radcliffe turns 18.", "A man's dog was found.",
        "The Palestinian Authority joined.\n\nMore text."]


def test_tldr_prep_from_json_list_with_max_examples(tmp_path):
    posts = [{"content": f"post {i}\n\n\n\nbody {i}  ", "summary": "s"} for i in range(5)]
    (tmp_path / "tldr.json").write_text(json.dumps(posts))
    run_prep("tldr.py", "--source", tmp_path / "tldr.json", "--out-dir", tmp_path, "--max-examples", 3,
             cwd=tmp_path)
    assert read_texts(tmp_path / "tldr" / "train.jsonl") == [f"post {i}\n\nbody {i}" for i in range(3)]
    source = get_passages("tldr", data_dir=tmp_path, seed=0)
    assert next(source).startswith("post ")


def test_prep_reports_missing_text_field(tmp_path):
    write_lines(tmp_path / "x.jsonl", [json.dumps({"body": "hello"})])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, str(ROOT / "datasets" / "tldr.py"), "--source", str(tmp_path / "x.jsonl"),
                           "--out-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--text-field" in proc.stderr
    assert not (tmp_path / "tldr" / "train.jsonl").exists()
