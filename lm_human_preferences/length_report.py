"""`launch.py length_report`: how much of a policy's reward gain is length, as a report with plots.

    python launch.py length_report OUT_DIR --before=runs/eval_base/scores.jsonl \\
        --after=ppo=runs/eval_ppo/scores.jsonl --after=len_only=runs/eval_len/scores.jsonl \\
        [--pairs=pairs.jsonl --rm_metrics=runs/rm/metrics.jsonl] [--bin_width=2] [--length_unit=words]

`--before` and each `--after` (NAME=FILE, repeatable) are score files of `evaluate` (rows with
"prompt", "response", "score" and, with a judge, "judge"). For each it gives the mean length, the
mean reward-model score, the judge's win rate, the length–score correlations (pooled and per
prompt, `length_analysis.correlations`), and for each `--after` the total gain over `--before`
and the weighted reward gain (WRG). `--pairs` adds the accuracy of "longer wins" on a preference
file, beside the reward model's held-out accuracy (`eval/accuracy`, the last row of
`--rm_metrics`, train_reward's metrics.jsonl) when given. Writes OUT_DIR/report.md,
OUT_DIR/length_report.json and OUT_DIR/lengths.png (length histograms; mean score by length).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lm_human_preferences import judges, length_analysis, length_data, preferences
from lm_human_preferences.figures import save_figure
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language.checkpoints import atomic_write_bytes
from lm_human_preferences.preferences import PreferenceFileError, read_json_rows
from lm_human_preferences.prep_pairs import length_fn


def read_scored(path: str) -> list[dict]:
    """The rows of an evaluate score file, each with a finite "score"."""
    rows = judges.read_output_rows(path)
    for (where, raw), row in zip(read_json_rows(path), rows):
        score = raw.get("score")
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            raise PreferenceFileError(f"{where}, field 'score': expected a finite number (evaluate with "
                                      f"--reward_model), got {score!r:.40}")
        row["score"] = float(score)
        if "judge" in raw:
            row["judge"] = raw["judge"]
    return rows


def rm_accuracy(path: str) -> float:
    """The last `eval/accuracy` of a train_reward metrics.jsonl."""
    values = [row["eval/accuracy"] for _, row in read_json_rows(path) if "eval/accuracy" in row]
    if not values:
        raise PreferenceFileError(f"{path}: no row with 'eval/accuracy'; expected train_reward's metrics.jsonl")
    return float(values[-1])


def analyse(ns) -> dict:
    length = length_fn(ns.length_unit)
    runs = {"before": read_scored(ns.before)}
    for item in ns.after:
        name, sep, path = item.partition("=")
        if not sep or not name or name in runs:
            raise HParamsError(f"--after {item!r}: expected NAME=FILE with a new NAME", key="after")
        runs[name] = read_scored(path)
    report: dict = {"runs": {}}
    for name, rows in runs.items():
        entry = {**length_analysis.summarize(rows, length=length),
                 **length_analysis.correlations(rows, length=length)}
        if name != "before":
            entry.update(length_analysis.weighted_reward_gain(runs["before"], rows, length=length,
                                                              width=ns.bin_width))
        report["runs"][name] = entry
    if ns.pairs:
        report["longer_wins"] = length_data.longer_wins(preferences.read_pairs(ns.pairs), length=length)
    if ns.rm_metrics:
        report["rm_accuracy"] = rm_accuracy(ns.rm_metrics)
    return {"report": report, "runs": runs, "length": length}


def markdown(report: dict, ns) -> str:
    columns = [("length_mean", "mean length"), ("score_mean", "RM score"), ("gain", "gain"), ("wrg", "WRG"),
               ("pearson", "r (pooled)"), ("kendall", "τ (pooled)"), ("pearson_per_prompt", "r (per prompt)"),
               ("kendall_per_prompt", "τ (per prompt)"), ("win_rate", "judge win rate")]
    lines = ["# Length report", "", f"Length unit: {ns.length_unit}; WRG bins of {ns.bin_width}.", "",
             "| run | " + " | ".join(c for _, c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, entry in report["runs"].items():
        cells = [f"{entry[k]:.3f}" if k in entry and not math.isnan(entry[k]) else "–" for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "longer_wins" in report:
        lines += ["", f"\"Longer wins\" accuracy on {ns.pairs}: {report['longer_wins']:.3f}"
                  + (f"; reward model held-out accuracy: {report['rm_accuracy']:.3f}" if "rm_accuracy" in report
                     else "") + "."]
    return "\n".join(lines + ["", "![lengths](lengths.png)", ""])


def plot(out_dir: Path, runs: dict[str, list[dict]], length, width: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in runs.items():
        lengths = [length(r["response"]) for r in rows]
        left.hist(lengths, bins=20, alpha=0.5, label=name)
        by_bin: dict[int, list[float]] = {}
        for n, r in zip(lengths, rows):
            by_bin.setdefault(length_analysis.length_bin(n, width), []).append(r["score"])
        keys = sorted(by_bin)
        right.plot([(k + 1) * width for k in keys], [sum(by_bin[k]) / len(by_bin[k]) for k in keys], "o-", label=name)
    left.set_xlabel("response length")
    left.set_ylabel("responses")
    right.set_xlabel("response length (bin's upper edge)")
    right.set_ylabel("mean reward-model score")
    left.legend()
    right.legend()
    fig.tight_layout()
    save_figure(fig, out_dir / "lengths.png")


def cmd_length_report(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="launch.py length_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--before", required=True, help="evaluate's scores.jsonl of the initial policy")
    p.add_argument("--after", action="append", default=[], help="NAME=FILE: a trained policy's scores.jsonl")
    p.add_argument("--pairs", default="", help="a preference file for the 'longer wins' accuracy")
    p.add_argument("--rm_metrics", default="", help="train_reward's metrics.jsonl (held-out accuracy)")
    p.add_argument("--bin_width", type=float, default=2.0, help="length bin width of the WRG")
    p.add_argument("--length_unit", default="words", help="words (whitespace) or gpt2 (BPE tokens)")
    ns = p.parse_args(argv)
    result = analyse(ns)
    out_dir = Path(ns.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "length_report.json", json.dumps(result["report"], indent=1).encode())
    plot(out_dir, result["runs"], result["length"], ns.bin_width)
    text = markdown(result["report"], ns)
    atomic_write_bytes(out_dir / "report.md", text.encode())
    print(text)
