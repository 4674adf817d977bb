"""Preference-pair files as reward-model labels (pair_labels.py): the template, padding and
truncation of one pair, the file kinds, and training end to end through launch.py."""

import json
import random

import pytest

import launch
import tiny
from lm_human_preferences import pair_labels
from lm_human_preferences.label_types import get_label_type
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.preferences import PreferenceFileError, PreferencePair, write_pairs

LQ, LR = 8, 6  # query / response length of the tiny task


def test_a_pair_becomes_a_row_with_the_template_padding_and_truncation(capsys):
    enc = get_encoding("gpt2")
    pad = enc.padding_token
    pair = PreferencePair("the cat sat on the mat", " a dog ran far away and then slept", " no", 0.75)
    context = enc.encode("Question: the cat sat on the mat\n\nAnswer: ")
    chosen, rejected = enc.encode(" a dog ran far away and then slept"), enc.encode(" no")
    assert len(context) > 6 and len(chosen) > 5 and len(rejected) == 1
    (row,) = pair_labels.pairs_to_rows([pair], where="p.jsonl", label_type=get_label_type("soft_preference"),
                                       template="stack", query_length=6, response_length=5, encoding=enc)
    assert row == {"query": context[-6:], "chosen": chosen[:5], "rejected": rejected + [pad] * 4, "chosen_prob": 0.75}
    assert "note: p.jsonl: 1 of 1 pairs truncated to 6 query tokens (their end kept) and 5 response tokens" in \
        capsys.readouterr().out
    # long enough: the context is right-padded like a query, nothing truncated, no note
    (row,) = pair_labels.pairs_to_rows([pair], where="p.jsonl", label_type=get_label_type("preference"),
                                       template="stack", query_length=20, response_length=12, encoding=enc)
    assert row == {"query": context + [pad] * (20 - len(context)), "chosen": chosen + [pad] * (12 - len(chosen)),
                   "rejected": rejected + [pad] * 11}
    assert "note" not in capsys.readouterr().out


def test_pair_files_are_told_from_token_label_files(tmp_path):
    tokens = tiny.make_best_of_4_labels(tmp_path / "labels.json", n=2, query_length=LQ, response_length=LR)
    pairs_json = tmp_path / "pairs.json"
    pairs_json.write_text(json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    (tmp_path / "broken.json").write_text("[{\"sample0\": [1]}]")
    assert not pair_labels.is_pair_file(tokens) and not pair_labels.is_pair_file(tmp_path / "broken.json")
    assert pair_labels.is_pair_file(pairs_json)
    assert pair_labels.is_pair_file(tmp_path / "x.jsonl") and pair_labels.is_pair_file(tmp_path / "x.CSV")


def make_pairs(n: int, *, seed: int = 0, soft: bool = False) -> list[PreferencePair]:
    """Chosen = the response with more ' good' words; soft pairs (rlcd orientation) carry a probability."""
    rng = random.Random(seed)
    words = [w for w in tiny.WORDS if w != "good"]
    pairs = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(5)) + "."
        good = " " + " ".join(["good"] * 3 + [rng.choice(words) for _ in range(2)])
        bad = " " + " ".join(rng.choice(words) for _ in range(5))
        meta = {"input": "", "preference": 1 + i % 2} if soft else {}
        pairs.append(PreferencePair(prompt, good, bad, round(rng.uniform(0.6, 1.0), 3) if soft else None, meta))
    return pairs


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs_task")
    write_pairs(d / "pairs.jsonl", make_pairs(24), format="pairs")
    write_pairs(d / "soft.csv", make_pairs(24, soft=True), format="rlcd")
    return {"model": tiny.make_model(d / "model", encoding=tiny.small_encoding()),
            "corpus": tiny.make_corpus(d / "corpus.txt"), "dir": d}


def train_args(task, source, save_dir, *extra) -> list[str]:
    return ["train_reward", "offline_sentiment", "pairs_rm", f"--task.policy.initial_model={task['model']}",
            f"--task.query_dataset={task['corpus']}", f"--task.query_length={LQ}", f"--task.response_length={LR}",
            f"--labels.source={source}", "--labels.num_train=16", "--batch_size=8", "--rollout_batch_size=8",
            "--normalize_samples=16", "--eval_batch_size=8", "--run.device=cpu", "--run.wandb=off",
            f"--run.save_dir={save_dir}", *extra]


@pytest.mark.parametrize("label_type, file", [("preference", "pairs.jsonl"), ("soft_preference", "soft.csv")])
def test_trains_on_a_pair_file(tiny_task, tmp_path, label_type, file):
    save_dir = tmp_path / "rm"
    assert launch.main(train_args(tiny_task, tiny_task["dir"] / file, save_dir, f"--labels.type={label_type}",
                                  "--labels.template=dialogue")) == 0
    final = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 2 and "eval/accuracy" in final
    assert (save_dir / "model.safetensors").is_file()
    assert json.loads((save_dir / "hparams.json").read_text())["labels"]["template"] == "dialogue"


@pytest.mark.parametrize("case", ["missing_field", "soft_without_prob", "not_pairwise", "unknown_template"])
def test_a_bad_pair_file_exits_2_with_one_paragraph(tiny_task, tmp_path, capsys, case):
    source, extra = tiny_task["dir"] / "pairs.jsonl", ["--labels.type=preference"]
    if case == "missing_field":
        source = tmp_path / "bad.jsonl"
        source.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
        expected = [str(source), "line 2", "'rejected'", "missing"]
    elif case == "soft_without_prob":
        extra, expected = ["--labels.type=soft_preference"], ["pairs.jsonl", "pair 1", "'chosen_prob'", "missing"]
    elif case == "not_pairwise":
        extra, expected = [], ["pairs.jsonl", "preference or soft_preference", "best_of_4"]
    else:
        extra, expected = ["--labels.type=preference", "--labels.template=chat"], ["labels.template", "'chat'"]
    save_dir = tmp_path / "rm"
    assert launch.main(train_args(tiny_task, source, save_dir, *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "\n\n" not in error and "Traceback" not in error, error
    assert all(part in error for part in expected), error
    assert not save_dir.exists()


def test_a_pair_file_error_is_a_preference_file_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("instruction,input,output_1,output_2,preference\nq,,a,b,3\n")
    with pytest.raises(PreferenceFileError, match=r"bad\.csv: row 1 \(line 2\), field 'preference'"):
        pair_labels.read_label_rows(path, label_type=get_label_type("preference"), template="plain",
                                    query_length=LQ, response_length=LR, encoding=get_encoding("gpt2"))


@pytest.mark.parametrize("format, own", [("stack", "stack"), ("pairs", "plain"), ("rlcd", "dialogue")])
def test_the_auto_template_is_the_formats_own(tmp_path, format, own):
    path = tmp_path / ("pairs.csv" if format == "rlcd" else "pairs.jsonl")
    write_pairs(path, make_pairs(4, soft=format == "rlcd"), format=format)
    read = [pair_labels.read_label_rows(path, label_type=get_label_type("preference"), template=template,
                                        query_length=LQ, response_length=LR, encoding=get_encoding("gpt2"))
            for template in ("auto", own, "tulu")]
    assert read[0] == read[1] != read[2]
