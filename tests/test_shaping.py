import pytest
import torch

from lm_human_preferences.shaping import (
    clip,
    compose,
    length_only,
    length_penalty,
    normalize,
    omit_long,
    parse_shaping,
    scale,
    shift,
)

SCORES = torch.tensor([1.0, -2.0, 4.0, 0.5])
LENGTHS = torch.tensor([10, 20, 5, 40])


@pytest.mark.parametrize("fn,expected", [
    (scale(2.0), [2.0, -4.0, 8.0, 1.0]),
    (shift(-1.0), [0.0, -3.0, 3.0, -0.5]),
    (normalize(1.0, 2.0), [0.0, -1.5, 1.5, -0.25]),
    (clip(-1.0, 2.0), [1.0, -1.0, 2.0, 0.5]),
    (length_penalty(0.1), [0.0, -4.0, 3.5, -3.5]),
    (omit_long(15, -1.0), [1.0, -1.0, 4.0, -1.0]),
    (length_only(), [10.0, 20.0, 5.0, 40.0]),
    (length_only(20), [0.5, 1.0, 0.25, 0.0]),
])
def test_each_shaping_by_hand(fn, expected):
    torch.testing.assert_close(fn(SCORES, LENGTHS), torch.tensor(expected))


def test_compose_applies_left_to_right():
    torch.testing.assert_close(compose(scale(2.0), clip(-1.0, 1.0))(SCORES, LENGTHS), torch.tensor([1.0, -1.0, 1.0, 1.0]))
    torch.testing.assert_close(compose(clip(-1.0, 1.0), scale(2.0))(SCORES, LENGTHS), torch.tensor([2.0, -2.0, 2.0, 1.0]))
    assert compose()(SCORES, LENGTHS) is SCORES


def test_parse_shaping_matches_compose():
    parsed = parse_shaping("length_penalty=0.1, normalize=1:2,clip=-3:3,length_only=20")
    built = compose(length_penalty(0.1), normalize(1.0, 2.0), clip(-3.0, 3.0), length_only(20.0))
    torch.testing.assert_close(parsed(SCORES, LENGTHS), built(SCORES, LENGTHS))
    torch.testing.assert_close(parse_shaping("length_only")(SCORES, LENGTHS), LENGTHS.float())
    assert parse_shaping("")(SCORES, LENGTHS) is SCORES


@pytest.mark.parametrize("spec,message", [
    ("scale=2,bonus=1", r"unknown reward shaping 'bonus' in 'bonus=1'; expected one of scale, shift"),
    ("clip=1", r"reward shaping 'clip=1': expected clip=x:x"),
    ("length_only=1:2", r"expected length_only or length_only=x"),
    ("scale=two", r"'scale=two': expected numbers separated by ':'"),
    ("normalize=0:0", r"'normalize=0:0': normalize needs std > 0"),
    ("clip=2:1", r"clip needs low <= high"),
])
def test_parse_shaping_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_shaping(spec)
