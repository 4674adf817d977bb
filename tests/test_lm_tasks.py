import torch

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
