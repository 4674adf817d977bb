import pytest
import torch

from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language.datasets import PassageFile
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.lm_tasks import TaskHParams, TaskQueries, query_dataset
from lm_human_preferences.lm_tasks import (apply_penalty, format_policy_queries, response_has_truncation,
                                           truncate_responses)
from lm_human_preferences.lm_tasks import eos_mask

P = 50259  # padding token


def test_format_policy_queries():
    queries = torch.tensor([[1, 2, P], [3, P, P]])
    out = format_policy_queries(queries, prefix_tokens=[7, 8], suffix_tokens=[9])
    assert out.tolist() == [[7, 8, 1, 2, P, 9], [7, 8, 3, P, P, 9]]
    assert out.dtype == queries.dtype
    assert torch.equal(format_policy_queries(queries, prefix_tokens=[], suffix_tokens=[]), queries)


def test_truncate_responses_first_token_at_or_after_truncate_after():
    responses = torch.tensor([
        [5, 13, 6, 7, 13, 8, 13, 9],  # 13 at 1 (< after) ignored; cut after the one at 4
        [5, 13, 6, 7, 8, 9, 10, 11],  # only a 13 before truncate_after: unchanged
        [5, 6, 7, 8, 9, 10, 11, 12],  # no 13: unchanged
        [5, 6, 7, 8, 9, 10, 11, 13],  # 13 at the last position: unchanged
        [5, 6, 13, 13, 9, 10, 11, 12],  # 13 exactly at truncate_after
    ])
    out = truncate_responses(responses, truncate_token=13, truncate_after=2, pad_token=P)
    assert out.tolist() == [
        [5, 13, 6, 7, 13, P, P, P],
        [5, 13, 6, 7, 8, 9, 10, 11],
        [5, 6, 7, 8, 9, 10, 11, 12],
        [5, 6, 7, 8, 9, 10, 11, 13],
        [5, 6, 13, P, P, P, P, P],
    ]
    assert responses[0, 5] == 8  # input untouched
    assert torch.equal(truncate_responses(responses, truncate_token=None, truncate_after=2, pad_token=P), responses)


def test_truncate_responses_matches_loop():
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(0, 4, (64, 12), generator=g)
    out = truncate_responses(responses, truncate_token=1, truncate_after=3, pad_token=P)
    for row, got in zip(responses.tolist(), out.tolist()):
        hits = [i for i in range(3, len(row)) if row[i] == 1]
        want = row if not hits else row[:hits[0] + 1] + [P] * (len(row) - hits[0] - 1)
        assert got == want


def test_penalty_for_responses_without_truncate_token():
    responses = torch.tensor([[1, 13, 2, 3], [1, 2, 3, 13], [13, 2, 3, 4], [1, 2, 3, 4]])
    valid = response_has_truncation(responses, truncate_token=13, truncate_after=1)
    assert valid.tolist() == [True, True, False, False]
    scores = torch.tensor([0.5, 1.5, 2.5, 3.5])
    out = apply_penalty(scores, responses, truncate_token=13, truncate_after=1, penalty_reward_value=-1)
    assert out.tolist() == [0.5, 1.5, -1.0, -1.0]
    # the truncated responses keep the truncate token, so they give the same verdict
    truncated = truncate_responses(responses, truncate_token=13, truncate_after=1, pad_token=P)
    assert torch.equal(response_has_truncation(truncated, truncate_token=13, truncate_after=1), valid)


def test_no_truncate_token_means_no_penalty():
    responses = torch.tensor([[1, 2], [3, 4]])
    scores = torch.tensor([0.1, 0.2])
    assert response_has_truncation(responses, truncate_token=None, truncate_after=0).all()
    assert torch.equal(apply_penalty(scores, responses, truncate_token=None, truncate_after=0,
                                     penalty_reward_value=-1), scores)


def test_eos_mask_keeps_tokens_up_to_the_first_eos():
    E = 50256
    responses = torch.tensor([[5, E, 7, E], [E, 1, 2, 3], [1, 2, 3, 4]])
    mask = eos_mask(responses, eos_token=E)
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False], [True] * 4]
    stopped = truncate_responses(responses, truncate_token=E, truncate_after=0, pad_token=P)
    assert torch.equal(stopped, responses.masked_fill(~mask, P))


# ---- query datasets: errors name the task's settings ----

ENC = get_encoding("test")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def corpus(tmp_path):
    import random
    rng = random.Random(0)
    lines = ["".join(rng.choice(LETTERS + "..") for _ in range(rng.randint(3, 30))) for _ in range(37)]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("start, end, key", [("qqqq", ".", "task.start_text"), ("", "qqqq", "task.end_text")])
def test_a_dataset_without_any_query_is_an_error_not_a_hang(corpus, start, end, key):
    queries = TaskQueries(PassageFile(corpus, seed=0), encoding=ENC, query_length=8, start_text=start or None,
                           end_text=end, batch_size=4)
    with pytest.raises(HParamsError, match=rf"'{key}': none of the 37 passages of the query dataset gives a query: "
                                           rf".*'qqqq' \(tokens \[.*\]\) must occur"):
        next(queries)
    assert queries.skipped == 2 * 37


def test_a_source_of_unknown_size_without_any_query_is_an_error_too(monkeypatch):
    from lm_human_preferences.language import datasets

    monkeypatch.setattr(datasets, "NO_QUERY_LIMIT", 50)
    endless = iter(lambda: "abcdef", None)  # no length, never a period
    queries = TaskQueries(endless, encoding=ENC, query_length=8, start_text=".", end_text=None, batch_size=2)
    with pytest.raises(HParamsError, match=r"'task.start_text': none of 50 passages in a row of the query dataset"):
        next(queries)


def test_a_start_text_outside_the_vocabulary_is_an_error_at_once():
    from lm_human_preferences.language.encodings import SubsetEncoding

    enc = SubsetEncoding.from_texts(["the cat sat. the dog ran."])
    with pytest.raises(HParamsError, match=r"'task.start_text': 'zebra' is not in the model's vocabulary"):
        TaskQueries(iter(["the cat sat."]), encoding=enc, query_length=8, start_text="zebra", end_text=".",
                     batch_size=1)


@pytest.mark.parametrize("start, end, key", [("qqqq", ".", "task.start_text"), ("", "qqqq", "task.end_text")])
def test_the_query_dataset_trainers_read_names_the_task_setting(corpus, start, end, key):
    task = TaskHParams(query_dataset=str(corpus), query_length=8, start_text=start, end_text=end)
    queries = query_dataset(task, encoding=ENC, data_dir=str(corpus.parent), batch_size=4, rank=0, world_size=1,
                            seed=0)
    assert isinstance(queries, TaskQueries)
    with pytest.raises(HParamsError, match=rf"^invalid hyperparameter '{key}': none of the 37 passages"):
        next(queries)


def test_a_source_of_empty_passages_names_the_query_dataset(monkeypatch):
    from lm_human_preferences.language import datasets

    monkeypatch.setattr(datasets, "NO_QUERY_LIMIT", 50)
    queries = TaskQueries(iter(lambda: "", None), encoding=ENC, query_length=8, start_text=None, end_text=None,
                          batch_size=1)
    with pytest.raises(HParamsError, match=r"'task.query_dataset': none of 50 passages in a row .* all empty"):
        next(queries)
