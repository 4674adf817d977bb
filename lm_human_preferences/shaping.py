"""Reward shaping: small functions of the scores, composed in a fixed, written order.

    shape = compose(length_penalty(0.01), normalize(mean=0.4, std=2.0), clip(-3.0, 3.0))
    shape = parse_shaping("length_penalty=0.01,normalize=0.4:2,clip=-3:3")   # the same, from a setting
    scores = shape(scores, lengths)    # (B,) float, (B,) response lengths in tokens -> (B,)

A shaping is `fn(scores, lengths) -> scores`: `scores` (B,) are one number per response (the
reward model's or a reward function's, after the task's truncation penalty), `lengths` (B,) the
number of tokens of each response (e.g. `lm_tasks.eos_mask(...).sum(1)`, or the tokens before
truncation). `compose` applies its functions left to right, each to the output of the one
before; in a PPO step the composed function goes between the score and the KL penalty
(`ppo.kl_penalty_rewards`), which it does not touch; train_policy takes one as
`--rewards.shaping=SPEC` (order: score → truncation penalty → shaping → score whitening → KL
penalty). An empty composition returns the scores unchanged. A shaping may keep state (see
`Composition`).

| name | `parse_shaping` form | result |
|---|---|---|
| `scale(c)` | `scale=c` | c · s |
| `shift(c)` | `shift=c` | s + c |
| `normalize(mean, std)` | `normalize=mean:std` | (s − mean) / std (reward scaling with fixed statistics) |
| `clip(low, high)` | `clip=low:high` | s clamped to [low, high] |
| `length_penalty(c)` | `length_penalty=c` | s − c · length |
| `omit_long(max_length, value)` | `omit_long=max_length:value` | s, or `value` for responses longer than max_length |
| `length_only(target)` | `length_only` or `length_only=target` | length, or 1 − abs(length − target) / target: a reward of length alone, ignoring s |
| `RunningScale(clip)` | `running_scale` or `running_scale=clip` | clamp((s − μ) / σ, −clip, clip), clip 0.3 by default |
| `SigmaLengthPenalty(coef, per_token)` | `len_penalty` or `len_penalty=coef:per_token` | s + coef · σ · (1 − per_token · length), 2 and 0.01 by default |

The last two are Singhal et al.'s (2023) interventions against length bias, as their code
computes them: μ and σ are running statistics (`RunningStats`), the means of the last `window`
(10) batches' mean and sample standard deviation of the scores, the current batch included.
In a composition (`compose(..., stats=RunningStats())`, which `parse_shaping` uses whenever one
of them appears) one `RunningStats` is updated with the scores the composition receives, before
any function applies, and every such function reads it (the paper's code scales and penalizes
with the statistics of the raw reward-model scores); alone, each keeps and updates its own. The
statistics are those of the whole batch, every rank's rows (all-reduced; the paper's code keeps
each process's own), so every rank holds the same state, which `state_dict()` /
`load_state_dict()` save and restore. With
`length_only=N` (`--len_only=N` in the paper's code) the reward is 1 − |L/N − 1|.

`omit_long_indices` is the paper's "omit long" intervention, which replaces samples rather than
scores: each response that did not terminate (no EOS within the length limit) is replaced by a
terminated one of the batch, drawn at random (see its docstring for the two variants).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from lm_human_preferences import distributed

Shaping = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def scale(factor: float) -> Shaping:
    return lambda scores, lengths: scores * factor


def shift(offset: float) -> Shaping:
    return lambda scores, lengths: scores + offset


def normalize(mean: float, std: float) -> Shaping:
    if not std > 0:
        raise ValueError(f"normalize needs std > 0, got {std}")
    return lambda scores, lengths: (scores - mean) / std


def clip(low: float, high: float) -> Shaping:
    if not low <= high:
        raise ValueError(f"clip needs low <= high, got {low} and {high}")
    return lambda scores, lengths: scores.clamp(low, high)


def length_penalty(coef: float) -> Shaping:
    return lambda scores, lengths: scores - coef * lengths.to(scores.dtype)


def omit_long(max_length: float, value: float) -> Shaping:
    return lambda scores, lengths: torch.where(lengths > max_length, torch.full_like(scores, value), scores)


def length_only(target: float | None = None) -> Shaping:
    if target is not None and not target > 0:
        raise ValueError(f"length_only needs a target > 0, got {target}")

    def shape(scores, lengths):
        lengths = lengths.to(scores.dtype)
        return lengths if target is None else 1.0 - (lengths - target).abs() / target
    return shape


class RunningStats:
    """The means, over the last `window` batches, of each batch's mean and sample standard
    deviation (n − 1; 0 for one score) of the scores."""

    def __init__(self, window: int = 10):
        if window < 1:
            raise ValueError(f"the running statistics need a window >= 1, got {window}")
        self.window, self.means, self.stds = window, [], []

    def update(self, scores: torch.Tensor) -> None:
        """Add the batch of every rank's `scores` (sums all-reduced, so every rank keeps the same state)."""
        values = scores.detach().double()
        total, squares, n = distributed.all_reduce_sum(torch.stack([
            values.sum(), values.square().sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                              device=values.device)])).tolist()
        mean = total / n
        self.means = (self.means + [mean])[-self.window:]
        self.stds = (self.stds + [math.sqrt(max(squares - n * mean * mean, 0.0) / (n - 1)) if n > 1 else 0.0]
                     )[-self.window:]

    @property
    def mean(self) -> float:
        return sum(self.means) / len(self.means)

    @property
    def std(self) -> float:
        return sum(self.stds) / len(self.stds)

    def state_dict(self) -> dict:
        return {"window": self.window, "means": list(self.means), "stds": list(self.stds)}

    def load_state_dict(self, state: dict) -> None:
        self.window, self.means, self.stds = int(state["window"]), list(state["means"]), list(state["stds"])


class _Running:
    """A shaping reading running statistics: its own (updated on each call) or a composition's."""

    def __init__(self, stats: RunningStats | None, window: int):
        self.owns = stats is None
        self.stats = RunningStats(window) if stats is None else stats

    def __call__(self, scores, lengths):
        if self.owns:
            self.stats.update(scores)
        return self.shape(scores, lengths)

    def state_dict(self) -> dict:
        return self.stats.state_dict() if self.owns else {}

    def load_state_dict(self, state: dict) -> None:
        if self.owns:
            self.stats.load_state_dict(state)


class RunningScale(_Running):
    """clamp((s − μ) / max(σ, 1e-8), −clip, clip) with running μ, σ (reward scaling)."""

    def __init__(self, clip: float = 0.3, *, window: int = 10, stats: RunningStats | None = None):
        if not clip > 0:
            raise ValueError(f"running_scale needs clip > 0, got {clip}")
        super().__init__(stats, window)
        self.clip = clip

    def shape(self, scores, lengths):
        return ((scores - self.stats.mean) / max(self.stats.std, 1e-8)).clamp(-self.clip, self.clip)


class SigmaLengthPenalty(_Running):
    """s + coef · σ · (1 − per_token · length) with running σ: at length 1/per_token the bonus
    is gone, and each further 1/per_token tokens cost coef standard deviations."""

    def __init__(self, coef: float = 2.0, per_token: float = 0.01, *, window: int = 10,
                 stats: RunningStats | None = None):
        super().__init__(stats, window)
        self.coef, self.per_token = coef, per_token

    def shape(self, scores, lengths):
        return scores + self.coef * self.stats.std * (1.0 - self.per_token * lengths.to(scores.dtype))


class Composition:
    """The shapings applied left to right: compose(f, g)(s, n) = g(f(s, n), n). A stateful
    shaping (e.g. running statistics) has `state_dict()` / `load_state_dict(state)`; the
    composition's state is theirs by position, and train_policy keeps it in its checkpoints.
    A shaping sees this rank's scores; a checkpoint holds rank 0's state, which every rank
    resumes from, so a state should be the same on every rank (statistics all-reduced). With
    `stats`, that `RunningStats` is first updated with the scores the composition receives (its
    state is kept under "stats")."""

    def __init__(self, *fns: Shaping, stats: RunningStats | None = None):
        self.fns, self.stats = fns, stats

    def __call__(self, scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.stats is not None:
            self.stats.update(scores)
        for fn in self.fns:
            scores = fn(scores, lengths)
        return scores

    def state_dict(self) -> dict:
        state = {str(i): fn.state_dict() for i, fn in enumerate(self.fns) if hasattr(fn, "state_dict")}
        return {**state, "stats": self.stats.state_dict()} if self.stats is not None else state

    def load_state_dict(self, state: dict) -> None:
        if self.stats is not None:
            self.stats.load_state_dict(state["stats"])
        for i, fn in enumerate(self.fns):
            if hasattr(fn, "load_state_dict"):
                fn.load_state_dict(state[str(i)])


def compose(*fns: Shaping, stats: RunningStats | None = None) -> Composition:
    """The shapings applied left to right (`Composition`)."""
    return Composition(*fns, stats=stats)


def omit_long_indices(terminated: torch.Tensor, *, generator: torch.Generator | None = None,
                      variant: str = "corrected") -> tuple[torch.Tensor, torch.Tensor]:
    """(sample_index, score_index), (B,) each, for the "omit long" intervention: the batch trains
    on queries[sample_index], responses[sample_index] with scores[score_index]. Each row that
    did not terminate (`terminated` (B,) bool False) gets the sample of a terminated row drawn
    uniformly (`generator`, a CPU one). "released" keeps the omitted row's own score (score_index = the
    row), as the paper's code does: it scores the long response and trains the replacement on
    that score. "corrected" moves the score with the sample (score_index = sample_index), so a
    replaced row is an exact copy of a terminated one. With no terminated row, nothing changes."""
    if variant not in ("released", "corrected"):
        raise ValueError(f"omit_long variant must be 'released' or 'corrected', got {variant!r}")
    rows = torch.arange(terminated.numel(), device=terminated.device)
    safe = rows[terminated]
    sample_index = rows.clone()
    if safe.numel():
        long_rows = rows[~terminated]
        draws = torch.randint(safe.numel(), (long_rows.numel(),), generator=generator).to(terminated.device)
        sample_index[long_rows] = safe[draws]
    return sample_index, (rows if variant == "released" else sample_index)




SHAPINGS: dict[str, tuple[Callable[..., Shaping], tuple[int, ...]]] = {  # name -> (maker, allowed argument counts)
    "scale": (scale, (1,)), "shift": (shift, (1,)), "normalize": (normalize, (2,)), "clip": (clip, (2,)),
    "length_penalty": (length_penalty, (1,)), "omit_long": (omit_long, (2,)), "length_only": (length_only, (0, 1)),
    "running_scale": (RunningScale, (0, 1)), "len_penalty": (SigmaLengthPenalty, (0, 2)),
}
RUNNING = ("running_scale", "len_penalty")  # the shapings that read a composition's RunningStats


def parse_shaping(spec: str) -> Composition:
    """A composition from "name=a:b,name=c,...", in the order written (see the module's table);
    an empty string is no shaping. A bad item is a ValueError naming it. The running shapings
    share one `RunningStats` of the composition's input (window 10)."""
    fns, stats = [], RunningStats()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, args = item.partition("=")
        if name not in SHAPINGS:
            raise ValueError(f"unknown reward shaping {name!r} in {item!r}; expected one of {', '.join(SHAPINGS)}")
        maker, counts = SHAPINGS[name]
        try:
            values = [float(a) for a in args.split(":")] if args else []
        except ValueError:
            raise ValueError(f"reward shaping {item!r}: expected numbers separated by ':'") from None
        if len(values) not in counts:
            forms = " or ".join(name + ("=" + ":".join("x" * n) if n else "") for n in counts)
            raise ValueError(f"reward shaping {item!r}: expected {forms}")
        try:
            fns.append(maker(*values, stats=stats) if name in RUNNING else maker(*values))
        except ValueError as e:
            raise ValueError(f"reward shaping {item!r}: {e}") from None
    return compose(*fns, stats=stats if any(isinstance(fn, _Running) for fn in fns) else None)
