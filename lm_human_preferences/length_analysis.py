"""How much of a reward, and of a reward gain, is length (Singhal et al. 2023, "A Long Way to Go").

    pearson(lengths, scores); kendall_tau(lengths, scores)
    correlations(rows, length=word_length)        # pooled and per-prompt Pearson r and Kendall τ_b
    weighted_reward_gain(before, after, length=word_length, width=2)   # the gain within length bins
    summarize(rows)                                # mean length, mean score, judge win rate

`rows` are dicts with "prompt", "response" and a number under "score" (the rows of
`evaluate`'s scores.jsonl; a "judge" outcome, "win", "tie" or "loss", is counted when present).

- Correlation of length and score: Pearson's r and Kendall's τ_b over all rows (pooled), and
  per prompt (the mean over prompts with at least two rows and some spread in both; the paper's
  "per-prompt" correlation, which a prompt's topic cannot inflate).
- Weighted reward gain (WRG): the rows before and after training are put in bins of `width`
  length units, (k·width, (k+1)·width]; in each bin that holds rows of both, the gain is the
  after mean score minus the before mean score; WRG is their mean weighted by each bin's number
  of rows (before and after). A WRG close to the total gain (mean after − mean before) means
  the gain holds at a fixed length; a WRG far below it means the gain came from moving to
  lengths that score higher.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from lm_human_preferences.length_data import LengthFn, word_length


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; nan when either has no spread."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size != y.size or x.size < 2:
        raise ValueError(f"pearson needs two sequences of the same length >= 2, got {x.size} and {y.size}")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denominator) if denominator > 0 else math.nan


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ_b = (concordant − discordant) / sqrt((n0 − ties_x)(n0 − ties_y)) over all
    pairs i < j (n0 of them); nan when either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size != y.size or x.size < 2:
        raise ValueError(f"kendall_tau needs two sequences of the same length >= 2, got {x.size} and {y.size}")
    i, j = np.triu_indices(x.size, k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n0 = i.size
    tied_x, tied_y = int((sx == 0).sum()), int((sy == 0).sum())
    denominator = math.sqrt((n0 - tied_x) * (n0 - tied_y))
    return float((sx * sy).sum() / denominator) if denominator > 0 else math.nan


def _by_prompt(rows: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt"], []).append(row)
    return groups


def correlations(rows: Sequence[dict], *, length: LengthFn = word_length, key: str = "score") -> dict[str, float]:
    """Pooled and per-prompt (mean over prompts) Pearson r and Kendall τ_b of length and `key`."""
    lengths = [length(r["response"]) for r in rows]
    scores = [float(r[key]) for r in rows]
    out = {"pearson": pearson(lengths, scores), "kendall": kendall_tau(lengths, scores)}
    per_prompt: dict[str, list[float]] = {"pearson": [], "kendall": []}
    for group in _by_prompt(rows).values():
        if len(group) < 2:
            continue
        lx, sy = [length(r["response"]) for r in group], [float(r[key]) for r in group]
        if len(set(lx)) > 1 and len(set(sy)) > 1:
            per_prompt["pearson"].append(pearson(lx, sy))
            per_prompt["kendall"].append(kendall_tau(lx, sy))
    for name, values in per_prompt.items():
        out[f"{name}_per_prompt"] = float(np.mean(values)) if values else math.nan
    out["prompts_correlated"] = len(per_prompt["pearson"])
    return out


def length_bin(value: float, width: float) -> int:
    """k for the bin (k·width, (k+1)·width]."""
    return math.ceil(value / width) - 1


def weighted_reward_gain(before: Sequence[dict], after: Sequence[dict], *, length: LengthFn = word_length,
                         width: float = 2, key: str = "score") -> dict[str, float]:
    """Total gain, WRG and the share of bins compared (module docstring)."""
    if not before or not after or not width > 0:
        raise ValueError("weighted_reward_gain needs rows before and after and a width > 0")
    bins: dict[int, tuple[list[float], list[float]]] = {}
    for side, rows in enumerate((before, after)):
        for row in rows:
            bins.setdefault(length_bin(length(row["response"]), width), ([], []))[side].append(float(row[key]))
    shared = [(b, a) for b, a in bins.values() if b and a]
    total = float(np.mean([float(r[key]) for r in after]) - np.mean([float(r[key]) for r in before]))
    if not shared:
        return {"gain": total, "wrg": math.nan, "rows_in_shared_bins": 0.0}
    weights = np.array([len(b) + len(a) for b, a in shared], dtype=np.float64)
    gains = np.array([np.mean(a) - np.mean(b) for b, a in shared])
    return {"gain": total, "wrg": float((weights * gains).sum() / weights.sum()),
            "rows_in_shared_bins": float(weights.sum() / (len(before) + len(after)))}


def summarize(rows: Sequence[dict], *, length: LengthFn = word_length, key: str = "score") -> dict[str, float]:
    """Rows, mean and std of the length, mean score (when rows have `key`) and the judge's win
    rate, ties half (when rows have "judge")."""
    lengths = np.array([length(r["response"]) for r in rows], dtype=np.float64)
    out = {"rows": float(len(rows)), "length_mean": float(lengths.mean()), "length_std": float(lengths.std())}
    if all(key in r for r in rows):
        out["score_mean"] = float(np.mean([float(r[key]) for r in rows]))
    if all("judge" in r for r in rows):
        credit = {"win": 1.0, "tie": 0.5, "loss": 0.0}
        out["win_rate"] = float(np.mean([credit[r["judge"]] for r in rows]))
    return out
