"""Best-of-N: of N responses to a prompt, keep the one a reward model scores highest (Kirk et
al. 2023 §3: N samples at temperature 1, the argmax of the reward model's scores).

    rows = keep_best(candidates, scores, n=16)              # generate --best_of=16: consecutive groups of N
    rows = simulate(scored_rows, n=4, repeats=8, seed=0)    # evaluate --best_of=4: from a pool per prompt

- `keep_best` (the `generate --best_of=N --reward_model=DIR` option): the candidates come in
  consecutive groups of N (a prompt's sample s is candidates s·N .. s·N + N − 1); each group
  gives one row, its highest-scored candidate (the first of equal ones).
- `simulate` (the `evaluate --best_of=N` option): from a pool of K ≥ N scored responses per
  prompt, draw N without replacement and keep the highest-scored, `repeats` times per prompt
  (`random.Random(seed)`, prompts in file order): best-of-N for many N from one pool of samples.
A row it keeps is the candidate's row with `sample` set to its index among the kept rows of its
prompt, and `score` (the reward model's), `best_of` (N) and `candidate` (its index among the
prompt's candidates) added.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from lm_human_preferences.preferences import PreferenceFileError, read_json_rows


def argmax(scores: Sequence[float]) -> int:
    """The index of the highest score (the first of equal ones)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def _kept(row: dict, *, sample: int, score: float, n: int, candidate: int) -> dict:
    return {**row, "sample": sample, "score": score, "best_of": n, "candidate": candidate}


def keep_best(candidates: Sequence[dict], scores: Sequence[float], *, n: int) -> list[dict]:
    """One row per consecutive group of `n` candidates: the highest-scored (see the module docstring)."""
    if len(candidates) != len(scores) or len(candidates) % n:
        raise ValueError(f"expected groups of {n} candidates with one score each, got {len(candidates)} candidates "
                         f"and {len(scores)} scores")
    kept = []
    for start in range(0, len(candidates), n):
        best = argmax(scores[start:start + n])
        row = candidates[start + best]
        kept.append(_kept(row, sample=row["sample"] // n, score=float(scores[start + best]), n=n,
                          candidate=row["sample"]))
    return kept


def simulate(rows: Sequence[dict], *, n: int, repeats: int, seed: int = 0) -> list[dict]:
    """`repeats` best-of-`n` draws without replacement from each prompt's pool of scored rows
    (rows with "prompt" and a numeric "score"); a pool smaller than `n` is a ValueError."""
    pools: dict[str, list[dict]] = {}
    for row in rows:
        pools.setdefault(row["prompt"], []).append(row)
    rng = random.Random(seed)
    kept = []
    for prompt, pool in pools.items():
        if len(pool) < n:
            raise ValueError(f"prompt {prompt!r:.60} has {len(pool)} scored responses; best-of-{n} draws {n} of "
                             f"them without replacement")
        for r in range(repeats):
            drawn = rng.sample(range(len(pool)), n)
            best = drawn[argmax([pool[i]["score"] for i in drawn])]
            kept.append(_kept(pool[best], sample=r, score=pool[best]["score"], n=n, candidate=best))
    return kept


def read_scored_rows(path) -> list[dict]:
    """The rows of a scored output file ({"prompt", "response", "score"} a line, as `evaluate`
    writes scores.jsonl); a problem is a PreferenceFileError naming the file, the line and the field."""
    out = []
    for where, row in read_json_rows(path):
        for field, kind in (("prompt", str), ("response", str), ("score", (int, float))):
            value = row.get(field)
            if not isinstance(value, kind) or isinstance(value, bool) or (field == "score" and not math.isfinite(value)):
                found = "missing" if field not in row else f"got {value!r:.40}"
                expected = "a finite number (score it with --reward_model=DIR)" if field == "score" else "a string"
                raise PreferenceFileError(f"{where}, field {field!r}: expected {expected}, {found}")
        out.append(dict(row))
    return out
