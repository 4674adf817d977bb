"""Scripted judges: offline stand-ins for the GPT-4 or human raters that compare responses.

    judge = get_judge("sentiment", randomize_positions=True, seed=0)
    judge.compare("a prompt", "what a lovely day.", "the dog was sad.")   # "a" (or "b", "tie")
    judge.best_of("a prompt", ["ok.", "great!", "bad."])                  # 1
    result = win_rate_files(judge, "policy.jsonl", "baseline.jsonl")       # WinRate(rate=0.62, low=..., high=...)

A judge scores each response (`score_fn(prompts, responses) -> scores`, higher is better) and
decides on the responses as it was shown them: first (A) and second (B), or a list for best-of-n.
- Deterministic (`sampling="argmax"`): the higher score wins; scores within `tie_margin` of
  each other tie. Best-of-n: the highest score (the first shown of equal ones).
- Bradley–Terry (`sampling="bradley_terry"`): a tie within `tie_margin` as above, otherwise the
  first shown wins with probability σ((s_first - s_second) / temperature). Best-of-n: response
  i with probability softmax(s / temperature)_i.
- `position_bias` is added to the score of the response shown first (0: none), the bias of real
  raters toward one position; `randomize_positions` shows the responses in a random order (a
  coin flip per comparison, a shuffle for best-of-n) and maps the decision back, which turns a
  position bias into noise instead of a preference for A.
All random draws come from the judge's own `random.Random(seed)`, in call order, so a judge
built with the same arguments gives the same decisions.

Judges (`get_judge`), scoring the response only:
- "sentiment": VADER's compound score (`labelers.SentimentLabeler`), in [-1, 1];
- "length_biased": the sentiment score + `length_weight` (default 0.05) per word, so it prefers
  the longer of two responses of equal sentiment, as LLM judges are known to;
- "length_neutral": the mean VADER compound score of the response's sentences (split after
  . ! ?), so repeating a response, or adding sentences of the same sentiment, does not change it;
- a personal preference's option ("simple", "expert", "concise", "verbose", "friendly",
  "unfriendly"): its `labelers.PreferenceLabeler` score;
- "preferences" (reads the prompt): the mean score of the options whose sentences the prompt
  carries (`active_preferences`), so one judge rates every combination of preferences;
- "harmless": the offline dialogue task's oracle (`labelers.HarmlessnessLabeler`): harmless
  marker words minus harmful ones;
- "MODULE:FUNCTION": a labeler function of yours, `fn(texts) -> scores` (see `labelers.py`).

`win_rate` counts A's wins over the compared prompts, ties as half, with a percentile bootstrap
interval over prompts (`bootstrap_interval`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from typing import Callable, Sequence

import numpy as np

from lm_human_preferences import labelers
from lm_human_preferences.preferences import PreferenceFileError, PreferencePair, read_json_rows

A, B, TIE = "a", "b", "tie"
CREDIT = {A: 1.0, TIE: 0.5, B: 0.0}  # A's share of one comparison

ScoreFn = Callable[[list[str], list[str]], list[float]]  # (prompts, responses) -> one score each
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class Judge:
    """Compares responses by `score_fn` (see the module docstring for the decision rules)."""

    def __init__(self, score_fn: ScoreFn, *, name: str = "judge", sampling: str = "argmax",
                 temperature: float = 1.0, tie_margin: float = 0.0, position_bias: float = 0.0,
                 randomize_positions: bool = False, seed: int = 0):
        if sampling not in ("argmax", "bradley_terry"):
            raise ValueError(f"sampling must be 'argmax' or 'bradley_terry', got {sampling!r}")
        if not temperature > 0 or not tie_margin >= 0:
            raise ValueError(f"need temperature > 0 and tie_margin >= 0, got {temperature} and {tie_margin}")
        self.score_fn, self.name, self.sampling = score_fn, name, sampling
        self.temperature, self.tie_margin, self.position_bias = temperature, tie_margin, position_bias
        self.randomize_positions = randomize_positions
        self.rng = random.Random(seed)

    def compare(self, prompt: str, response_a: str, response_b: str) -> str:
        """"a", "b" or "tie": which of two responses to `prompt` is better."""
        return self.compare_batch([prompt], [response_a], [response_b])[0]

    def compare_batch(self, prompts: Sequence[str], responses_a: Sequence[str],
                      responses_b: Sequence[str]) -> list[str]:
        """`compare` for each (prompt, a, b), with one `score_fn` call for all responses."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(f"got {len(prompts)} prompts, {len(responses_a)} and {len(responses_b)} responses")
        n = len(prompts)
        scores = self._scores(list(prompts) * 2, list(responses_a) + list(responses_b))
        return [self._decide(scores[i], scores[n + i]) for i in range(n)]

    def _decide(self, score_a: float, score_b: float) -> str:
        swap = self.randomize_positions and self.rng.random() < 0.5
        first, second = (score_b, score_a) if swap else (score_a, score_b)
        first += self.position_bias
        if abs(first - second) <= self.tie_margin:
            return TIE
        if self.sampling == "argmax":
            first_wins = first > second
        else:
            first_wins = self.rng.random() < _sigmoid((first - second) / self.temperature)
        return A if first_wins != swap else B

    def best_of(self, prompt: str, responses: Sequence[str]) -> int:
        """The index of the best of `responses` to `prompt`."""
        if not responses:
            raise ValueError("best_of needs at least one response")
        scores = self._scores([prompt] * len(responses), list(responses))
        order = list(range(len(responses)))
        if self.randomize_positions:
            self.rng.shuffle(order)
        shown = [scores[i] for i in order]
        shown[0] += self.position_bias
        if self.sampling == "argmax":
            return order[max(range(len(shown)), key=lambda k: (shown[k], -k))]
        top = max(shown)
        weights = [math.exp((s - top) / self.temperature) for s in shown]
        return order[self.rng.choices(range(len(shown)), weights=weights)[0]]

    def _scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores = [float(s) for s in self.score_fn(prompts, responses)]
        if len(scores) != len(responses) or not all(math.isfinite(s) for s in scores):
            raise ValueError(f"judge {self.name!r}: expected {len(responses)} finite scores, got {scores[:8]}")
        return scores

    def __repr__(self) -> str:
        return (f"Judge({self.name!r}, sampling={self.sampling!r}, temperature={self.temperature}, "
                f"tie_margin={self.tie_margin}, position_bias={self.position_bias}, "
                f"randomize_positions={self.randomize_positions})")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# ------------------------------------------------------------------------------- score functions


def labeler_scores(labeler: labelers.Labeler) -> ScoreFn:
    """The labeler's score of each response (the prompt is not read), e.g. VADER's compound score."""
    return lambda prompts, responses: labeler.score(list(responses))


def length_biased_scores(labeler: labelers.Labeler, *, length_weight: float) -> ScoreFn:
    """The labeler's score + `length_weight` per whitespace-separated word of the response."""
    def score(prompts, responses):
        return [s + length_weight * len(r.split()) for s, r in zip(labeler.score(list(responses)), responses)]
    return score


def length_neutral_scores(labeler: labelers.Labeler) -> ScoreFn:
    """The mean of the labeler's scores of the response's sentences (0 for an empty response)."""
    def score(prompts, responses):
        out = []
        for response in responses:
            sentences = [s for s in _SENTENCE_END.split(response.strip()) if s]
            out.append(sum(labeler.score(sentences)) / len(sentences) if sentences else 0.0)
        return out
    return score


def active_preferences(prompt: str) -> list[str]:
    """The personal preferences (`labelers.PREFERENCES`) whose sentence the prompt carries, in table order."""
    return [name for name, (_, sentence, _) in labelers.PREFERENCES.items() if sentence in prompt]


def preference_scores() -> ScoreFn:
    """The mean of the scores of the preferences each prompt carries (`active_preferences`; 0
    for a prompt that carries none), each by its `labelers.PreferenceLabeler`."""
    options = {name: labelers.PreferenceLabeler(name) for name in labelers.PREFERENCES}

    def score(prompts, responses):
        active = [active_preferences(p) for p in prompts]
        used = {n for a in active for n in a}
        by_option = {name: option.score(list(responses)) for name, option in options.items() if name in used}
        return [sum(by_option[n][i] for n in a) / len(a) if a else 0.0 for i, a in enumerate(active)]
    return score


JUDGES = ("sentiment", "length_biased", "length_neutral", "harmless", "preferences", *labelers.PREFERENCES)


def get_judge(name: str, *, length_weight: float = 0.05, **options) -> Judge:
    """A judge by name (JUDGES, or "MODULE:FUNCTION" for a labeler function of yours);
    `options` are `Judge`'s (sampling, temperature, tie_margin, position_bias,
    randomize_positions, seed); `length_weight` is the length-biased judge's score per word."""
    if ":" in name:
        labeler = labelers.get_labeler(name, key="judge")
        return Judge(labeler_scores(labeler), name=name, **options)
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; expected one of {', '.join(JUDGES)}, or a labeler function "
                         f"of your own as MODULE:FUNCTION")
    if name == "preferences":
        return Judge(preference_scores(), name=name, **options)
    if name in labelers.PREFERENCES:
        return Judge(labeler_scores(labelers.PreferenceLabeler(name)), name=name, **options)
    if name == "harmless":
        return Judge(labeler_scores(labelers.HarmlessnessLabeler()), name=name, **options)
    labeler = labelers.SentimentLabeler()
    score_fn = {"sentiment": lambda: labeler_scores(labeler),
                "length_biased": lambda: length_biased_scores(labeler, length_weight=length_weight),
                "length_neutral": lambda: length_neutral_scores(labeler)}[name]()
    return Judge(score_fn, name=name, **options)


# ------------------------------------------------------------------------------- win rates


@dataclasses.dataclass(frozen=True)
class WinRate:
    """A's win rate over `n` prompts (ties count half) and its bootstrap interval [low, high]."""

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    n: int
    confidence: float
    num_resamples: int


def bootstrap_interval(values: Sequence[float], *, num_resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`: draw `num_resamples` samples of
    len(values) with replacement (numpy's default_rng(seed)), and take the (1 - confidence)/2
    and (1 + confidence)/2 quantiles of their means."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_interval needs a non-empty list of numbers, got shape {values.shape}")
    if not 0 < confidence < 1 or num_resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and num_resamples >= 1, got {confidence} and {num_resamples}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(num_resamples, values.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def win_rate(judge: Judge, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], *,
             num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """How often `judge` prefers responses_a[i] to responses_b[i] (ties half), with the
    bootstrap interval over prompts (`bootstrap_interval` with `seed`)."""
    outcomes = judge.compare_batch(prompts, responses_a, responses_b)
    credit = [CREDIT[o] for o in outcomes]
    low, high = bootstrap_interval(credit, num_resamples=num_resamples, confidence=confidence, seed=seed)
    return WinRate(rate=sum(credit) / len(credit), low=low, high=high, wins=outcomes.count(A),
                   ties=outcomes.count(TIE), losses=outcomes.count(B), n=len(outcomes), confidence=confidence,
                   num_resamples=num_resamples)


def read_output_rows(path) -> list[dict]:
    """The rows of an output file (JSON lines {"prompt": ..., "response": ...}, as `generate`
    writes them): {"prompt", "response", "sample"} (`sample`: None when absent; other fields are
    ignored). A problem is a PreferenceFileError naming the file, the line and the field."""
    rows = []
    for where, row in read_json_rows(path):
        for field in ("prompt", "response"):
            if not isinstance(row.get(field), str):
                found = "missing" if field not in row else f"expected a string, got {type(row[field]).__name__}"
                raise PreferenceFileError(f"{where}, field {field!r}: {found}")
        rows.append({"prompt": row["prompt"], "response": row["response"], "sample": row.get("sample")})
    return rows


def read_outputs(path) -> list[tuple[str, str]]:
    """(prompt, response) of each row of an output file (`read_output_rows`)."""
    return [(row["prompt"], row["response"]) for row in read_output_rows(path)]


def win_rate_files(judge: Judge, path_a, path_b, **options) -> WinRate:
    """`win_rate` of the responses of output file `path_a` (A) against those of `path_b` (B); the
    files must hold the same prompts in the same order. `options` go to `win_rate`."""
    rows_a, rows_b = read_outputs(path_a), read_outputs(path_b)
    if len(rows_a) != len(rows_b):
        raise PreferenceFileError(f"{path_a} has {len(rows_a)} rows and {path_b} {len(rows_b)}; expected the "
                                  f"same prompts in the same order")
    for i, ((prompt_a, _), (prompt_b, _)) in enumerate(zip(rows_a, rows_b)):
        if prompt_a != prompt_b:
            raise PreferenceFileError(f"{path_a} and {path_b}: row {i + 1}: the prompts differ "
                                      f"({prompt_a[:40]!r} vs {prompt_b[:40]!r}); expected the same prompts in "
                                      f"the same order")
    return win_rate(judge, [p for p, _ in rows_a], [r for _, r in rows_a], [r for _, r in rows_b], **options)


def agreement(judge: Judge, pairs: Sequence[PreferencePair], **options) -> WinRate:
    """How often `judge` prefers each pair's chosen response (A) to its rejected one (B): its
    agreement with the labels, ties half. `options` go to `win_rate`."""
    return win_rate(judge, [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs],
                    **options)
