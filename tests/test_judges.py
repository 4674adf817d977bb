import json
import math
from collections import Counter

import numpy as np
import pytest

from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.judges import (
    A,
    B,
    TIE,
    Judge,
    agreement,
    bootstrap_interval,
    get_judge,
    read_outputs,
    win_rate,
    win_rate_files,
)
from lm_human_preferences.preferences import PreferenceFileError, PreferencePair


def number_scores(prompts, responses):
    """A response's score is the number it spells."""
    return [float(r) for r in responses]


def _outputs(path, prompts, responses):
    path.write_text("".join(json.dumps({"prompt": p, "response": r, "step": 3}) + "\n"
                            for p, r in zip(prompts, responses)))
    return path


def test_deterministic_sentiment_judge():
    judge = get_judge("sentiment")
    assert judge.compare("p", "what a lovely day.", "the dog was sad.") == A
    assert judge.compare("p", "the dog was sad.", "what a lovely day.") == B
    assert judge.compare("p", "the dog sat.", "the dog sat.") == TIE
    assert judge.best_of("p", ["the dog was sad.", "a great and lovely day!", "ok."]) == 1


def test_tie_margin_and_first_of_equal_best():
    judge = Judge(number_scores, tie_margin=0.5)
    assert judge.compare_batch(["p"] * 3, ["1.0", "1.0", "2"], ["1.4", "1.6", "1"]) == [TIE, B, A]
    assert Judge(number_scores).best_of("p", ["1", "3", "3", "2"]) == 1


def test_bradley_terry_sampling_follows_the_score_difference():
    prompts, a, b = ["p"] * 4000, ["1"] * 4000, ["0"] * 4000
    for temperature in (1.0, 4.0):
        judge = Judge(number_scores, sampling="bradley_terry", temperature=temperature, seed=1)
        share = judge.compare_batch(prompts, a, b).count(A) / 4000
        assert share == pytest.approx(1 / (1 + math.exp(-1 / temperature)), abs=0.025)  # 0.731, 0.562
    same = [Judge(number_scores, sampling="bradley_terry", seed=5).compare_batch(prompts[:50], a[:50], b[:50])
            for _ in range(2)]
    assert same[0] == same[1]
    other = Judge(number_scores, sampling="bradley_terry", seed=6).compare_batch(prompts[:50], a[:50], b[:50])
    assert other != same[0]


def test_bradley_terry_best_of_n_follows_the_softmax():
    judge = Judge(number_scores, sampling="bradley_terry", temperature=0.5, seed=0)
    counts = Counter(judge.best_of("p", ["0", "1", "0.5"]) for _ in range(4000))
    z = [math.exp(s / 0.5) for s in (0.0, 1.0, 0.5)]
    for i in range(3):
        assert counts[i] / 4000 == pytest.approx(z[i] / sum(z), abs=0.025)


def test_position_randomization_cancels_a_position_bias(tmp_path):
    """A judge that prefers whatever it sees first: on two identical files its win rate is 1
    with fixed positions and about 1/2 with randomised ones."""
    prompts = [f"prompt {i}" for i in range(400)]
    responses = [f"the same answer {i % 7}." for i in range(400)]
    path_a, path_b = _outputs(tmp_path / "a.jsonl", prompts, responses), _outputs(tmp_path / "b.jsonl", prompts, responses)
    fixed = win_rate_files(get_judge("sentiment", position_bias=0.1), path_a, path_b)
    assert (fixed.rate, fixed.wins, fixed.n) == (1.0, 400, 400)
    randomized = win_rate_files(get_judge("sentiment", position_bias=0.1, randomize_positions=True, seed=0),
                                path_a, path_b)
    assert randomized.rate == pytest.approx(0.5, abs=0.06)
    assert randomized.low < 0.5 < randomized.high
    assert randomized.wins + randomized.losses == 400 and randomized.ties == 0
    # best-of-n: the first shown wins, so a random order spreads the picks over the positions
    judge = Judge(number_scores, position_bias=1.0, randomize_positions=True, seed=0)
    counts = Counter(judge.best_of("p", ["0"] * 4) for _ in range(2000))
    assert all(abs(counts[i] / 2000 - 0.25) < 0.04 for i in range(4))
    assert Judge(number_scores, position_bias=1.0).best_of("p", ["0"] * 4) == 0


def test_length_biased_and_length_neutral_judges():
    short, long = "what a lovely day.", "what a lovely day. what a lovely day. what a lovely day."
    assert get_judge("sentiment").compare("p", long, short) == A  # VADER's compound grows with repeats
    assert get_judge("length_biased").compare("p", "the cat sat on the mat.", "the cat sat.") == A
    assert get_judge("length_biased").compare("p", "the cat sat.", "the cat sat on the mat.") == B
    neutral = get_judge("length_neutral")
    assert neutral.compare("p", long, short) == TIE
    assert neutral.compare("p", short + " the dog was sad.", short) == B  # a sad sentence lowers the mean
    assert neutral.score_fn(["p"], [""]) == [0.0]


def test_bootstrap_intervals_cover_the_true_rate():
    """95% percentile intervals of 200 Bernoulli(0.3) outcomes cover 0.3 in about 95% of 200 data sets."""
    rng = np.random.default_rng(0)
    covered = 0
    for seed in range(200):
        values = (rng.random(200) < 0.3).astype(float)
        low, high = bootstrap_interval(values, num_resamples=1000, seed=seed)
        assert low <= values.mean() <= high
        covered += low <= 0.3 <= high
    assert 0.9 <= covered / 200 <= 0.99
    assert bootstrap_interval([1.0, 0.0, 0.5], seed=3) == bootstrap_interval([1.0, 0.0, 0.5], seed=3)
    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)


def test_win_rate_of_a_noisy_judge_covers_its_true_rate():
    """A Bradley–Terry judge whose A wins with probability σ(0.5) = 0.622: the interval covers it."""
    judge = Judge(number_scores, sampling="bradley_terry", seed=2)
    result = win_rate(judge, ["p"] * 500, ["0.5"] * 500, ["0"] * 500, seed=1)
    assert result.low < 1 / (1 + math.exp(-0.5)) < result.high
    assert result.high - result.low < 0.1 and (result.confidence, result.num_resamples) == (0.95, 1000)


def test_ties_count_half():
    result = win_rate(Judge(number_scores), ["p"] * 4, ["1", "1", "0", "2"], ["0", "1", "1", "0"])
    assert (result.wins, result.ties, result.losses, result.rate) == (2, 1, 1, 0.625)


def test_agreement_with_preference_labels():
    pairs = [PreferencePair("p", "what a lovely day.", "the dog was sad."),
             PreferencePair("p", "the dog was sad.", "what a great day.")]
    result = agreement(get_judge("sentiment"), pairs)
    assert (result.wins, result.losses, result.rate) == (1, 1, 0.5)


def test_output_file_errors(tmp_path):
    a = _outputs(tmp_path / "a.jsonl", ["x", "y"], ["1", "2"])
    b = _outputs(tmp_path / "b.jsonl", ["x", "z"], ["1", "2"])
    with pytest.raises(PreferenceFileError, match=r"a\.jsonl and .*b\.jsonl: row 2: the prompts differ"):
        win_rate_files(Judge(number_scores), a, b)
    c = _outputs(tmp_path / "c.jsonl", ["x"], ["1"])
    with pytest.raises(PreferenceFileError, match=r"has 2 rows and .*c\.jsonl 1"):
        win_rate_files(Judge(number_scores), a, c)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": "1"}\n{"prompt": "x", "text": "1"}\n')
    with pytest.raises(PreferenceFileError, match=r"bad\.jsonl: line 2, field 'response': missing"):
        read_outputs(bad)


def test_get_judge_names_and_bad_options():
    assert get_judge("examples/labelers.py:positive_minus_negative").compare("p", "so happy", "so sad") == A
    with pytest.raises(ValueError, match="unknown judge 'gpt4'; expected one of sentiment, length_biased"):
        get_judge("gpt4")
    with pytest.raises(HParamsError, match="judge"):
        get_judge("examples/labelers.py:nothing_here")
    with pytest.raises(ValueError, match="sampling must be"):
        Judge(number_scores, sampling="vote")
    with pytest.raises(ValueError, match="expected 2 finite scores"):
        Judge(lambda p, r: [1.0]).compare("p", "a", "b")
