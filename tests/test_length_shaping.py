"""The length-bias shapings of shaping.py (running reward scaling, the σ-scaled length penalty,
omit-long's sample replacement), on hand-computed cases."""

import math

import pytest
import torch

from lm_human_preferences.shaping import (
    RunningScale,
    RunningStats,
    SigmaLengthPenalty,
    compose,
    length_only,
    omit_long_indices,
    parse_shaping,
)


def test_running_stats_keep_the_last_window_batches():
    stats = RunningStats(window=2)
    stats.update(torch.tensor([1.0, 2.0, 3.0]))  # mean 2, sample std 1
    assert (stats.mean, stats.std) == (2.0, 1.0)
    stats.update(torch.tensor([4.0, 6.0]))  # mean 5, std sqrt(2)
    assert stats.mean == 3.5 and stats.std == pytest.approx((1 + math.sqrt(2)) / 2)
    stats.update(torch.tensor([0.0, 0.0]))  # the first batch leaves the window
    assert stats.mean == 2.5 and stats.std == pytest.approx(math.sqrt(2) / 2)
    stats.update(torch.tensor([7.0]))  # one score: std 0
    assert stats.stds[-1] == 0.0


def test_running_scale_by_hand():
    scale = RunningScale(clip=10.0, window=2)
    torch.testing.assert_close(scale(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)), torch.tensor([-1.0, 0.0, 1.0]))
    sigma = (1 + math.sqrt(2)) / 2  # running mean 3.5
    torch.testing.assert_close(scale(torch.tensor([4.0, 6.0]), torch.zeros(2)),
                               torch.tensor([0.5 / sigma, 2.5 / sigma]))
    clipped = RunningScale()  # clip 0.3, the paper's
    torch.testing.assert_close(clipped(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)), torch.tensor([-0.3, 0.0, 0.3]))


def test_sigma_length_penalty_by_hand():
    # sigma 1: s + 2 * 1 * (1 - 0.01 L)
    penalty = SigmaLengthPenalty()
    out = penalty(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 50, 100]))
    torch.testing.assert_close(out, torch.tensor([3.0, 3.0, 3.0]))
    half = SigmaLengthPenalty(coef=1.0, per_token=0.1)  # its own statistics: sigma of [2, 4] = sqrt(2)
    torch.testing.assert_close(half(torch.tensor([2.0, 4.0]), torch.tensor([20, 5])),
                               torch.tensor([2.0 - math.sqrt(2), 4.0 + 0.5 * math.sqrt(2)]))


def test_parse_shares_the_statistics_of_the_raw_scores():
    scores, lengths = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 50, 100])
    # mean 2 and sigma 1 of the raw scores; penalized [3, 3, 3]; scaled (3 - 2) / 1
    torch.testing.assert_close(parse_shaping("len_penalty,running_scale=10")(scores, lengths), torch.ones(3))
    torch.testing.assert_close(parse_shaping("len_penalty=2:0.01,running_scale")(scores, lengths),
                               torch.full((3,), 0.3))
    # Composed by hand without shared statistics, the scale reads the penalized scores (all 3): 0
    own = compose(SigmaLengthPenalty(), RunningScale(clip=10.0))
    torch.testing.assert_close(own(scores, lengths), torch.zeros(3))
    torch.testing.assert_close(parse_shaping("length_only=50")(scores, lengths), torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(length_only(50.0)(scores, lengths), 1 - (lengths / 50 - 1).abs())


def test_shaping_state_round_trips():
    batches = [torch.tensor([1.0, 2.0, 5.0]), torch.tensor([0.0, 4.0, 4.0]), torch.tensor([3.0, -1.0, 2.0])]
    lengths = torch.tensor([10, 30, 60])
    first = parse_shaping("len_penalty,running_scale=5")
    for batch in batches[:2]:
        first(batch, lengths)
    state = first.state_dict()
    assert state["stats"]["means"] == [pytest.approx(8 / 3), pytest.approx(8 / 3)]
    second = parse_shaping("len_penalty,running_scale=5")
    second.load_state_dict(state)
    torch.testing.assert_close(second(batches[2], lengths), first(batches[2], lengths))
    alone = RunningScale(clip=5.0)
    alone(batches[0], lengths)
    again = RunningScale(clip=5.0)
    again.load_state_dict(alone.state_dict())
    torch.testing.assert_close(again(batches[1], lengths), alone(batches[1], lengths))
    assert parse_shaping("scale=2").state_dict() == {}


@pytest.mark.parametrize("spec,message", [
    ("running_scale=0", "running_scale needs clip > 0"),
    ("len_penalty=1", r"expected len_penalty or len_penalty=x:x"),
])
def test_running_shaping_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_shaping(spec)


def test_omit_long_indices_both_variants():
    terminated = torch.tensor([True, False, True, False, True])
    sample, score = omit_long_indices(terminated, generator=torch.Generator().manual_seed(0), variant="released")
    assert sample[terminated].tolist() == [0, 2, 4]
    assert all(int(j) in (0, 2, 4) for j in sample[~terminated])
    assert score.tolist() == [0, 1, 2, 3, 4]  # the long row's own score stays with the replacement
    sample2, score2 = omit_long_indices(terminated, generator=torch.Generator().manual_seed(0))
    assert sample2.tolist() == sample.tolist() and score2.tolist() == sample.tolist()
    none = torch.zeros(3, dtype=torch.bool)
    for variant in ("released", "corrected"):
        assert [t.tolist() for t in omit_long_indices(none, variant=variant)] == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(ValueError, match="released' or 'corrected"):
        omit_long_indices(terminated, variant="paper")


def test_running_stats_are_those_of_every_rank(monkeypatch):
    from lm_human_preferences import distributed

    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: t * 2)  # two ranks with the same scores
    stats = RunningStats()
    stats.update(torch.tensor([1.0, 2.0, 3.0]))  # 6 scores: mean 2, sample variance (28 - 6 * 4) / 5
    assert stats.mean == 2.0 and stats.std == pytest.approx(math.sqrt(0.8))
