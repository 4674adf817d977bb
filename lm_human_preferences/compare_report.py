"""The report of `launch.py compare` (compare.py): markdown tables and bar charts of its results,
{name: {split: {metric: value}}}."""

from __future__ import annotations

from pathlib import Path

from lm_human_preferences.figures import save_figure
from lm_human_preferences.language.checkpoints import atomic_write_bytes

DIVERSITY_COLUMNS = ("ead", "distinct", "ngram_cosine", "embedding", "nli")
PANELS = (("judge_score", "judge score"), ("win_rate", "win rate vs reference"),
          ("ead/per_input", "per-input diversity (EAD)"), ("ead/across_input", "across-input diversity (EAD)"))


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_interval(values: dict, key: str) -> str:
    if values.get(key) is None:
        return "–"
    return f"{values[key]:.3f} [{values[key + '_low']:.3f}, {values[key + '_high']:.3f}]"


def main_table(results: dict) -> list[str]:
    """One row per output file and split: the judge, the references and the per-input diversity."""
    first = next(iter(next(iter(results.values())).values()))
    metrics = [m for m in DIVERSITY_COLUMNS if f"{m}/per_input" in first]
    has_refs = "win_rate" in first
    head = ["output", "split", "prompts", "rows", "judge score"] + (["win rate vs reference", "ROUGE-L"] if has_refs
                                                                     else []) + [f"{m} per-input" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_split in results.items():
        for split, v in by_split.items():
            cells = [name, split, str(v["prompts"]), str(v["rows"]), _with_interval(v, "judge_score")]
            if has_refs:
                cells += [_with_interval(v, "win_rate"), _number(v["rougeL"])]
            cells += [_number(v[f"{m}/per_input"]) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def diversity_table(results: dict) -> list[str]:
    """Every diversity metric in its three aggregations, per output file and split."""
    first = next(iter(next(iter(results.values())).values()))
    keys = [k for k in first if "/" in k]
    lines = ["| output | split | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, by_split in results.items():
        for split, v in by_split.items():
            lines.append(f"| {name} | {split} | " + " | ".join(_number(v[k]) for k in keys) + " |")
    return lines


def gaps(results: dict) -> list[str]:
    """The judge-score gap of each output file to the first, per split, and between the splits."""
    names = list(results)
    base = names[0]
    lines = []
    for name in names[1:]:
        shared = [s for s in results[name] if s in results[base]]
        parts = [f"{s} {results[name][s]['judge_score'] - results[base][s]['judge_score']:+.3f}" for s in shared]
        lines.append(f"- judge score, {name} − {base}: " + ", ".join(parts))
    for name in names:
        if "id" in results[name] and "ood" in results[name]:
            gap = results[name]["id"]["judge_score"] - results[name]["ood"]["judge_score"]
            lines.append(f"- judge score, {name}, id − ood: {gap:+.3f}")
    return lines


def write_markdown(path: Path, results: dict, *, judge: str, plot: str) -> None:
    lines = [f"# Comparison of {', '.join(results)}", "", f"Judge: `{judge}`. Intervals: bootstrap over prompts.", ""]
    lines += main_table(results) + ["", "## Gaps", ""] + (gaps(results) or ["- (one output file)"])
    lines += ["", "## Diversity (per-input, across-input, overall)", ""] + diversity_table(results)
    lines += ["", f"![comparison]({plot})", ""]
    atomic_write_bytes(path, "\n".join(lines).encode())


def plot_comparison(path: Path, results: dict) -> None:
    """Grouped bars (one group per split, one bar per output file) of the PANELS results has."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(next(iter(results.values())).values()))
    panels = [(key, title) for key, title in PANELS if first.get(key) is not None]
    split_names = list(dict.fromkeys(s for by_split in results.values() for s in by_split))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4 * max(1, len(panels)), 3.5), squeeze=False)
    width = 0.8 / len(results)
    for ax, (key, title) in zip(axes[0], panels):
        for i, (name, by_split) in enumerate(results.items()):
            xs = [j + i * width for j, s in enumerate(split_names) if s in by_split]
            heights = [by_split[s][key] for s in split_names if s in by_split]
            ax.bar(xs, [float("nan") if h is None else h for h in heights], width, label=name)  # None: undefined
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(split_names))], split_names)
        ax.set_title(title, fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
