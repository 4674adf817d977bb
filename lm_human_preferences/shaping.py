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
"""

from __future__ import annotations

from typing import Callable

import torch

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


class Composition:
    """The shapings applied left to right: compose(f, g)(s, n) = g(f(s, n), n). A stateful
    shaping (e.g. running statistics) has `state_dict()` / `load_state_dict(state)`; the
    composition's state is theirs by position, and train_policy keeps it in its checkpoints."""

    def __init__(self, *fns: Shaping):
        self.fns = fns

    def __call__(self, scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            scores = fn(scores, lengths)
        return scores

    def state_dict(self) -> dict:
        return {str(i): fn.state_dict() for i, fn in enumerate(self.fns) if hasattr(fn, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for i, fn in enumerate(self.fns):
            if hasattr(fn, "load_state_dict"):
                fn.load_state_dict(state[str(i)])


def compose(*fns: Shaping) -> Composition:
    """The shapings applied left to right (`Composition`)."""
    return Composition(*fns)


SHAPINGS: dict[str, tuple[Callable[..., Shaping], tuple[int, ...]]] = {  # name -> (maker, allowed argument counts)
    "scale": (scale, (1,)), "shift": (shift, (1,)), "normalize": (normalize, (2,)), "clip": (clip, (2,)),
    "length_penalty": (length_penalty, (1,)), "omit_long": (omit_long, (2,)), "length_only": (length_only, (0, 1)),
}


def parse_shaping(spec: str) -> Composition:
    """A composition from "name=a:b,name=c,...", in the order written (see the module's table);
    an empty string is no shaping. A bad item is a ValueError naming it."""
    fns = []
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
            fns.append(maker(*values))
        except ValueError as e:
            raise ValueError(f"reward shaping {item!r}: {e}") from None
    return compose(*fns)
