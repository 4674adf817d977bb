"""Length-bias interventions on preference data (Singhal et al. 2023, "A Long Way to Go"):
transforms of `PreferencePair` lists, and dataset cartography of a reward model's training.

    pairs = with_uids(read_pairs("pairs.jsonl"))                 # meta.uid: the row index unless set
    balanced = balance_by_length(pairs, length=word_length)       # "longer wins" ~ 50%
    augmented = random_pair_augment(pairs, ratio=0.25, seed=0)    # R-DA: n + 25% pairs
    stats = cartography(read_pair_scores("runs/rm/pair_scores.jsonl"))   # uid -> CartographyStats
    keep = select_uids(stats, max_confidence=1.0)                 # drop the easiest pairs
    kept = keep_uids(pairs, keep)

- **Length balancing** (`balance_by_length`): d = length(chosen) − length(rejected) falls in a
  bin of `width` length units, (k·width, (k+1)·width] for d > 0 and its mirror
  [−(k+1)·width, −k·width) for d < 0, up to |d| ≤ max_diff (pairs beyond are dropped). Each bin
  and its mirror keep the same number of pairs, min of the two counts, drawn at random (`seed`),
  so the chosen response is the longer one exactly as often as the shorter one; ties (d = 0) are
  all kept. `ties="released"` bins as the paper's code: (lo, lo + width] over
  (−max_diff, max_diff], a tie in (−width, 0] and so mirrored with (0, width], which leaves
  "longer wins" above 50% when ties are common (short responses, word lengths). The kept pairs
  stay in file order.
- **Random-pair augmentation** (R-DA, `random_pair_augment`): int(n · ratio) pairs drawn at
  random (`seed`) get, as their rejected response, the chosen response of a pair with another
  prompt (drawn at random); these new pairs are appended after the n originals, with meta
  `uid` "<uid>:rda" and `rda` true. A response written for another prompt should lose whatever
  its length. The paper's code rewrites the first int(n · ratio) pairs and may draw the pair
  itself; here the pairs are drawn and the partner's prompt always differs.
- **Cartography** (`cartography`): from the per-visit log of reward training
  (`pair_scores.jsonl`: epoch, step, uid, r_chosen, r_rejected), each pair's margins
  m = r_chosen − r_rejected in visit order (epoch, step), the first visit skipped (the model
  has not learned the pair yet): confidence = mean(m), variability = sample standard deviation
  of m (n − 1), correct = the fraction of m > 0. It needs at least 3 visits a pair (3 epochs).
- **Confidence-based truncation** (`select_uids`, `keep_uids`): keep the pairs whose confidence
  lies in [min_confidence, max_confidence] (the paper drops the high-confidence "easy" pairs,
  which follow the length heuristic most); the kept uids go one a line to a file that
  `keep_uids` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Callable, Iterable, Sequence

from lm_human_preferences.preferences import PreferenceFileError, PreferencePair, read_json_rows

LengthFn = Callable[[str], int]


def word_length(text: str) -> int:
    """Whitespace-separated words: the length unit of the scripted judges."""
    return len(text.split())


def token_length(encoding) -> LengthFn:
    """Tokens of `encoding` (e.g. GPT-2's BPE, the paper's unit)."""
    return lambda text: len(encoding.encode(text))


def pair_uid(pair: PreferencePair, index: int) -> str:
    """The pair's `meta.uid`, else its index in the file: the id reward training logs."""
    return str(pair.meta.get("uid", index))


def with_uids(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """The pairs with `meta.uid` set (to the row index where absent), so that later transforms
    and cartography refer to the rows of the original file."""
    return [p if "uid" in p.meta else dataclasses.replace(p, meta={**p.meta, "uid": str(i)})
            for i, p in enumerate(pairs)]


def pairs_from_outputs(rows: Sequence[dict], judge) -> list[PreferencePair]:
    """Preference pairs labeled by a judge (`judges.Judge`): an output file's rows (as
    `judges.read_output_rows` gives them) taken prompt by prompt, two consecutive samples of a
    prompt a pair (a third sample without a partner is left out); the judge's winner is chosen,
    ties are left out. meta holds the two samples' numbers."""
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"], []).append(row)
    couples = [(group[i], group[i + 1]) for group in by_prompt.values() for i in range(0, len(group) - 1, 2)]
    if not couples:
        raise PreferenceFileError("the output file holds no prompt with two samples; generate with --num_samples=2 "
                                  "or more")
    outcomes = judge.compare_batch([a["prompt"] for a, _ in couples], [a["response"] for a, _ in couples],
                                   [b["response"] for _, b in couples])
    pairs = []
    for (a, b), outcome in zip(couples, outcomes):
        if outcome != "tie":
            chosen, rejected = (a, b) if outcome == "a" else (b, a)
            pairs.append(PreferencePair(a["prompt"], chosen["response"], rejected["response"],
                                        meta={"samples": [chosen["sample"], rejected["sample"]]}))
    return pairs


# ------------------------------------------------------------------------------- balancing


def length_bin(diff: int, *, width: int = 10, max_diff: int = 200) -> int | None:
    """The index k of the bin (k·width, (k+1)·width] holding `diff`, None outside (−max_diff, max_diff]."""
    if not -max_diff < diff <= max_diff:
        return None
    return math.ceil(diff / width) - 1


def _signed_bin(diff: int, *, width: int, max_diff: int) -> int | None:
    """Bins symmetric about 0 with ties apart: k for diff in (k·width, (k+1)·width], −k − 1 for
    −diff there, None for a tie (kept whatever the bins) or beyond max_diff."""
    if diff == 0 or abs(diff) > max_diff:
        return None
    k = math.ceil(abs(diff) / width) - 1
    return k if diff > 0 else -k - 1


def balance_by_length(pairs: Sequence[PreferencePair], *, length: LengthFn = word_length, width: int = 10,
                      max_diff: int = 200, seed: int = 0, ties: str = "apart") -> list[PreferencePair]:
    """The pairs left after equalizing each length-difference bin with its mirror (module
    docstring). `ties="released"` bins as the paper's code (a tie in (−width, 0], mirrored with
    (0, width]; lengths differing by max_diff, negative, dropped); `ties="apart"` keeps every
    tie and mirrors [−(k+1)·width, −k·width) with (k·width, (k+1)·width], so that "longer wins"
    is exactly 50% over the pairs that are not ties."""
    if width < 1 or max_diff < width:
        raise ValueError(f"need width >= 1 and max_diff >= width, got {width} and {max_diff}")
    if ties not in ("apart", "released"):
        raise ValueError(f"ties must be 'apart' or 'released', got {ties!r}")
    bins: dict[int, list[int]] = {}
    kept: list[int] = []
    for i, p in enumerate(pairs):
        diff = length(p.chosen) - length(p.rejected)
        if ties == "released":
            k = length_bin(diff, width=width, max_diff=max_diff)
        else:
            k = _signed_bin(diff, width=width, max_diff=max_diff)
            if diff == 0:
                kept.append(i)
        if k is not None:
            bins.setdefault(k, []).append(i)
    rng = random.Random(seed)
    for k in sorted(b for b in bins if b < 0):
        negative, positive = bins[k], bins.get(-k - 1, [])  # bin k < 0 and its mirror -k - 1 >= 0
        n = min(len(negative), len(positive))
        kept += rng.sample(negative, n) + rng.sample(positive, n)
    return [pairs[i] for i in sorted(kept)]


def longer_wins(pairs: Iterable[PreferencePair], *, length: LengthFn = word_length) -> float:
    """The fraction of pairs whose chosen response is strictly longer: the accuracy of the
    "longer wins" heuristic (ties count half)."""
    credit = [1.0 if d > 0 else 0.5 if d == 0 else 0.0
              for d in (length(p.chosen) - length(p.rejected) for p in pairs)]
    if not credit:
        raise ValueError("longer_wins needs at least one pair")
    return sum(credit) / len(credit)


# ------------------------------------------------------------------------------- R-DA


def random_pair_augment(pairs: Sequence[PreferencePair], *, ratio: float, seed: int = 0) -> list[PreferencePair]:
    """The pairs, then int(n · ratio) new ones whose rejected response is another prompt's
    chosen response (module docstring). Needs pairs of at least two different prompts."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"rand_ratio must be in [0, 1], got {ratio}")
    count = int(len(pairs) * ratio)
    if count and len({p.prompt for p in pairs}) < 2:
        raise ValueError("random-pair augmentation needs pairs of at least two different prompts")
    rng = random.Random(seed)
    new = []
    for i in sorted(rng.sample(range(len(pairs)), count)):
        pair = pairs[i]
        while (other := pairs[rng.randrange(len(pairs))]).prompt == pair.prompt:
            pass
        meta = {**pair.meta, "uid": f"{pair_uid(pair, i)}:rda", "rda": True}
        new.append(dataclasses.replace(pair, rejected=other.chosen, chosen_prob=None, meta=meta))
    return list(pairs) + new


# ------------------------------------------------------------------------------- cartography


@dataclasses.dataclass(frozen=True)
class CartographyStats:
    confidence: float  # mean reward margin over the visits after the first
    variability: float  # their sample standard deviation
    correct: float  # the fraction of those visits with r_chosen > r_rejected
    visits: int  # visits logged, the first included


def read_pair_scores(path) -> list[dict]:
    """The rows of a `pair_scores.jsonl` log, checked: epoch and step integers, uid a string,
    r_chosen and r_rejected finite numbers."""
    rows = []
    for where, row in read_json_rows(path):
        for field, kind in (("epoch", int), ("step", int), ("uid", str), ("r_chosen", float), ("r_rejected", float)):
            value = row.get(field)
            ok = (type(value) is int if kind is int else isinstance(value, str) if kind is str
                  else isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
            if not ok:
                expected = {int: "an integer", str: "a string", float: "a finite number"}[kind]
                raise PreferenceFileError(f"{where}, field {field!r}: expected {expected}, got {value!r:.40}")
        rows.append(row)
    return rows


def cartography(rows: Iterable[dict], *, min_visits: int = 3) -> dict[str, CartographyStats]:
    """uid -> CartographyStats of a pair-score log (module docstring); a pair with fewer than
    `min_visits` visits is a ValueError naming it."""
    margins: dict[str, list[tuple[int, int, float]]] = {}
    for row in rows:
        margins.setdefault(row["uid"], []).append((row["epoch"], row["step"], row["r_chosen"] - row["r_rejected"]))
    stats = {}
    for uid, visits in margins.items():
        if len(visits) < max(min_visits, 3):
            raise ValueError(f"pair {uid!r} has {len(visits)} logged visits; cartography needs at least "
                             f"{max(min_visits, 3)} (train the reward model for 3 or more epochs)")
        m = [v for _, _, v in sorted(visits)[1:]]
        mean = sum(m) / len(m)
        std = math.sqrt(sum((x - mean) ** 2 for x in m) / (len(m) - 1))
        stats[uid] = CartographyStats(mean, std, sum(x > 0 for x in m) / len(m), len(visits))
    return stats


def select_uids(stats: dict[str, CartographyStats], *, min_confidence: float = -math.inf,
                max_confidence: float = math.inf) -> list[str]:
    """The uids whose confidence lies in [min_confidence, max_confidence], in log order."""
    return [uid for uid, s in stats.items() if min_confidence <= s.confidence <= max_confidence]


def read_uids(path) -> set[str]:
    """The uids of a kept-uid file: one a line (a JSON string is read as its value)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PreferenceFileError(f"{path}: cannot read the kept-uid file ({e})") from None
    uids = set()
    for line in filter(None, (ln.strip() for ln in lines)):
        value = json.loads(line) if line.startswith('"') else line
        uids.add(str(value))
    if not uids:
        raise PreferenceFileError(f"{path}: holds no uids; expected one uid a line")
    return uids


def keep_uids(pairs: Sequence[PreferencePair], uids: set[str], *, where: str = "kept-uid file") -> list[PreferencePair]:
    """The pairs whose uid (`pair_uid`) is in `uids`; a uid of no pair is an error."""
    kept = [p for i, p in enumerate(pairs) if pair_uid(p, i) in uids]
    found = {pair_uid(p, i) for i, p in enumerate(pairs)}
    unknown = sorted(uids - found)
    if unknown:
        raise PreferenceFileError(f"{where}: {len(unknown)} uid(s) name no pair of the file, e.g. {unknown[0]!r}; "
                                  f"expected uids of its pairs (meta.uid, or the row index)")
    return kept
