"""Data preparation for reward training: `launch.py prep_pairs` and `launch.py cartography`.

    python launch.py prep_pairs OUT.jsonl --pairs=IN.jsonl [--balance_len] [--rand_ratio=0.25]
                                [--keep_uids=FILE] [--length_unit=words|gpt2] [--seed=0]
    python launch.py prep_pairs OUT.jsonl --from_outputs=runs/base/outputs.jsonl --judge=length_biased
    python launch.py cartography runs/rm/pair_scores.jsonl OUT_DIR [--max_confidence=X] [--min_confidence=Y]

`prep_pairs` writes a new preference-pair file (any `preferences.FORMATS` format, `--format`;
default `pairs`) for `train_reward --labels.source`: the pairs of `--pairs` (any format), or
pairs a judge labels from an output file of `generate` with 2 samples a prompt
(`--from_outputs`, `--judge`, `length_data.pairs_from_outputs`; `--length_weight` is the
`length_biased` judge's score per word); every pair gets `meta.uid`
(its row index unless it has one), then, in this order, `--keep_uids` (confidence-based
truncation), `--balance_len` (length balancing in `--bin_width` bins up to ±`--max_diff`, ties
apart; `--released_bins`: the paper code's bins) and
`--rand_ratio` (R-DA) apply (`length_data`). Lengths are whitespace-separated words
(`--length_unit=words`) or GPT-2 BPE tokens (`gpt2`). It prints the counts and the accuracy of
"longer wins" before and after.

`cartography` reads the per-visit log of a reward training run (`pair_scores.jsonl`, 3 or more
epochs) and writes into OUT_DIR `cartography.jsonl` (uid, confidence, variability, correct,
visits), `cartography.png` (the data map: variability against confidence) and `keep_uids.txt`
(the uids with confidence within [--min_confidence, --max_confidence]), the file
`prep_pairs --keep_uids` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from lm_human_preferences import judges, length_data, preferences
from lm_human_preferences.figures import save_figure
from lm_human_preferences.hparams import HParamsError, loaded
from lm_human_preferences.language.checkpoints import atomic_write_bytes


def length_fn(unit: str) -> length_data.LengthFn:
    if unit == "words":
        return length_data.word_length
    if unit == "gpt2":
        from lm_human_preferences.language.encodings import get_encoding
        return length_data.token_length(get_encoding("gpt2"))
    raise HParamsError(f"unknown length unit {unit!r}; expected words or gpt2", key="length_unit")


def source_pairs(ns) -> list[preferences.PreferencePair]:
    if bool(ns.pairs) == bool(ns.from_outputs):
        raise HParamsError("give exactly one of --pairs=FILE and --from_outputs=FILE", key="pairs")
    if ns.pairs:
        return preferences.read_pairs(ns.pairs)
    if not ns.judge:
        raise HParamsError("--from_outputs needs --judge=NAME (length_biased, length_neutral, sentiment or "
                           "MODULE:FUNCTION) to label the pairs", key="judge")
    judge = loaded(lambda: judges.get_judge(ns.judge, seed=ns.seed, length_weight=ns.length_weight), key="judge")
    return length_data.pairs_from_outputs(judges.read_output_rows(ns.from_outputs), judge)


def prepare(ns) -> tuple[list[preferences.PreferencePair], list[str]]:
    """The output pairs and the lines of the summary."""
    length = length_fn(ns.length_unit)
    pairs = length_data.with_uids(source_pairs(ns))
    lines = [f"{len(pairs)} pairs, longer wins {length_data.longer_wins(pairs, length=length):.3f}"]
    if ns.keep_uids:
        pairs = length_data.keep_uids(pairs, length_data.read_uids(ns.keep_uids), where=ns.keep_uids)
        lines.append(f"kept uids of {ns.keep_uids}: {len(pairs)} pairs")
    try:
        if ns.balance_len:
            pairs = length_data.balance_by_length(pairs, length=length, width=ns.bin_width, max_diff=ns.max_diff,
                                                  seed=ns.seed, ties="released" if ns.released_bins else "apart")
            lines.append(f"length-balanced: {len(pairs)} pairs")
        if ns.rand_ratio:
            pairs = length_data.random_pair_augment(pairs, ratio=ns.rand_ratio, seed=ns.seed)
            lines.append(f"random-pair augmentation: {len(pairs)} pairs")
    except ValueError as e:
        raise HParamsError(str(e)) from None
    if not pairs:
        raise HParamsError("no pairs left to write")
    lines.append(f"wrote {len(pairs)} pairs to {ns.out}, longer wins {length_data.longer_wins(pairs, length=length):.3f}")
    return pairs, lines


def cmd_prep_pairs(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="launch.py prep_pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the preference-pair file to write")
    p.add_argument("--pairs", default="", help="a preference-pair file (any format preferences.py reads)")
    p.add_argument("--from_outputs", default="", help="an output file of generate, 2 samples a prompt")
    p.add_argument("--judge", default="", help="the judge that labels --from_outputs")
    p.add_argument("--length_weight", type=float, default=0.05, help="the length_biased judge's score per word")
    p.add_argument("--format", default="pairs", choices=list(preferences.FORMATS), help="the output's format")
    p.add_argument("--keep_uids", default="", help="keep only the pairs with these uids (one a line)")
    p.add_argument("--balance_len", action="store_true", help="balance the chosen-minus-rejected length bins")
    p.add_argument("--bin_width", type=int, default=10, help="length-difference bin width")
    p.add_argument("--max_diff", type=int, default=200, help="length differences kept: |d| <= max_diff")
    p.add_argument("--released_bins", action="store_true",
                   help="bin as the paper's code (ties mirrored with (0, bin_width]) instead of ties apart")
    p.add_argument("--rand_ratio", type=float, default=0.0, help="R-DA: append this fraction of random pairs")
    p.add_argument("--length_unit", default="words", help="words (whitespace) or gpt2 (BPE tokens)")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    pairs, lines = prepare(ns)
    preferences.write_pairs(ns.out, pairs, format=ns.format)
    print("\n".join(lines))


def write_cartography(out_dir: Path, stats: dict[str, length_data.CartographyStats], keep: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = "".join(json.dumps({"uid": uid, **dataclasses.asdict(s)}) + "\n" for uid, s in stats.items())
    atomic_write_bytes(out_dir / "cartography.jsonl", rows.encode())
    atomic_write_bytes(out_dir / "keep_uids.txt", "".join(f"{u}\n" for u in keep).encode())
    fig, ax = plt.subplots(figsize=(5, 4))
    values = list(stats.values())
    points = ax.scatter([s.variability for s in values], [s.confidence for s in values],
                        c=[s.correct for s in values], cmap="viridis", s=6, vmin=0, vmax=1)
    fig.colorbar(points, label="correct")
    ax.set_xlabel("variability (std of the reward margin)")
    ax.set_ylabel("confidence (mean reward margin)")
    ax.set_title("data map")
    fig.tight_layout()
    save_figure(fig, out_dir / "cartography.png")


def cmd_cartography(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="launch.py cartography", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="pair_scores.jsonl of a reward training run of 3 or more epochs")
    p.add_argument("out_dir", help="where cartography.jsonl, cartography.png and keep_uids.txt go")
    p.add_argument("--min_confidence", type=float, default=float("-inf"))
    p.add_argument("--max_confidence", type=float, default=float("inf"))
    ns = p.parse_args(argv)
    try:
        stats = length_data.cartography(length_data.read_pair_scores(ns.log))
    except ValueError as e:
        if isinstance(e, preferences.PreferenceFileError):
            raise
        raise preferences.PreferenceFileError(f"{ns.log}: {e}") from None
    keep = length_data.select_uids(stats, min_confidence=ns.min_confidence, max_confidence=ns.max_confidence)
    write_cartography(Path(ns.out_dir), stats, keep)
    confidences = sorted(s.confidence for s in stats.values())
    print(f"{len(stats)} pairs: confidence median {confidences[len(confidences) // 2]:.3f} "
          f"[{confidences[0]:.3f}, {confidences[-1]:.3f}]; kept {len(keep)} in {Path(ns.out_dir) / 'keep_uids.txt'}")
