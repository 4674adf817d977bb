"""Several output files side by side, on in- and out-of-distribution prompts (`launch.py compare`):
a judge's score, its win rate against references, ROUGE, and the diversity of the outputs
(Kirk et al. 2023: SFT vs best-of-N vs PPO).

    python launch.py compare offline_sentiment my_cmp --outputs=sft=runs/a/outputs.jsonl,ppo=runs/b/outputs.jsonl \\
        --references=examples/id_ood_prompts.jsonl --split=field

`outputs` names each output file (`NAME=FILE`, comma-separated; the first is the baseline the
others' gaps are measured from). Each file's rows (`judges.read_output_rows`) are put in a split
by their prompt (`splits.parse_split` of `split`: `length:N`, `words:W1|W2|...`, or `field`, the
references file's "split" field; empty: one split, "all"), and for each file and split:
- `judge_score`: the mean of the judge's score of the responses (`judge`, as `evaluate`'s: the
  sentiment judge scores VADER's compound score), with a percentile bootstrap interval over
  prompts (a prompt's samples resampled together);
- with `references` (a prompt file with "prompt" and "reference" a line, every prompt of the
  outputs in it): `win_rate`, how often the judge prefers the response to the prompt's reference
  (ties half, with its interval), and the mean `rouge1`, `rouge2` and `rougeL` against it;
- for each diversity metric of `metrics` (`diversity.py`; `embedding` embeds with `embedder`, a
  model directory or MODULE:FUNCTION, default `task.policy.initial_model`; `nli` with the
  `nli` function): `<metric>/per_input`, `<metric>/across_input` and `<metric>/overall`.
Writes `<save_dir>/comparison.json` ({name: {split: {metric: value}}}), `compare.md` (the
tables, and the judge-score gaps to the baseline and between the splits), `compare.png` (bar
charts of the judge score, the win rate and the per-input and across-input EAD), one row of
metrics.jsonl (`compare/<name>/<split>/<metric>`), and prints the path of compare.md.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lm_human_preferences import diversity, judges, lm_tasks, rouge, splits, text_embeddings
from lm_human_preferences.compare_report import plot_comparison, write_markdown
from lm_human_preferences.hparams import HParams, HParamsError, check_count, loaded
from lm_human_preferences.language.checkpoints import atomic_write_bytes
from lm_human_preferences.runtime import Run, RunHParams
from lm_human_preferences.trainer import run_training

RESULTS_FILE, REPORT_FILE, PLOT_FILE = "comparison.json", "compare.md", "compare.png"
METRIC_NAMES = (*diversity.METRICS, "embedding", "nli")


@dataclass
class CompareHParams(HParams):
    run: RunHParams = field(default_factory=RunHParams)  # how it runs: device, precision, seed, outputs
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)  # task.policy.initial_model embeds
    outputs: str = ""  # the output files as NAME=FILE,NAME=FILE,... (the first is the baseline of the gaps)
    references: str = ""  # a .jsonl of {"prompt", "reference"[, "split"]}: win rates and ROUGE against them
    judge: str = "sentiment"  # scores each response: sentiment, length_biased, length_neutral or MODULE:FUNCTION
    split: str = ""  # in/out of distribution: length:N, words:W1|W2|..., field (the references' "split"); empty: one
    metrics: str = "distinct,ead,ngram_cosine,embedding"  # diversity metrics (diversity.py), comma-separated
    embedder: str = ""  # embeddings of `embedding`: a model directory or MODULE:FUNCTION (empty: the initial model)
    nli: str = ""  # the NLI function (MODULE:FUNCTION) of the `nli` metric: (premises, hypotheses) -> scores
    max_texts: int = 256  # texts a pairwise metric's overall aggregation reads at most (a seeded draw)
    num_resamples: int = 1000  # bootstrap resamples of each interval
    confidence: float = 0.95  # the intervals' confidence level

    def _validate(self):
        named = parse_outputs(self.outputs)
        for name, path in named:
            if not path.is_file():
                raise HParamsError(f"{path} (output file {name!r}): no such file", key="outputs")
        if self.references and not Path(self.references).is_file():
            raise HParamsError(f"{self.references}: no such file", key="references")
        unknown = [m for m in self.metric_names() if m not in METRIC_NAMES]
        if unknown:
            raise HParamsError(f"unknown diversity metric(s) {unknown}; expected some of {', '.join(METRIC_NAMES)}",
                               key="metrics")
        if ("nli" in self.metric_names()) != bool(self.nli):
            raise HParamsError("the nli metric needs an NLI function; pass both --nli=MODULE:FUNCTION and nli in "
                               "--metrics", key="nli")
        if "embedding" in self.metric_names() and not (self.embedder or self.task.policy.initial_model):
            raise HParamsError("the embedding metric needs an embedding model; pass --embedder=DIR or "
                               "MODULE:FUNCTION", key="embedder")
        splits.parse_split(self.split, fields={} if self.references else None)
        loaded(lambda: judges.get_judge(self.judge), key="judge")
        for key in ("max_texts", "num_resamples"):
            check_count(self, key)
        if not 0 < self.confidence < 1:
            raise HParamsError(f"must be a number between 0 and 1, both excluded (got {self.confidence})",
                               key="confidence")

    def metric_names(self) -> list[str]:
        return [m.strip() for m in self.metrics.split(",") if m.strip()]


def parse_outputs(spec: str) -> list[tuple[str, Path]]:
    """[(name, file)] of `NAME=FILE,NAME=FILE,...`, at least one, names distinct."""
    if not spec:
        raise HParamsError("no output files given; pass --outputs=NAME=FILE,NAME=FILE,... (generate's outputs.jsonl)",
                           key="outputs")
    named = []
    for item in spec.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise HParamsError(f"expected NAME=FILE, got {item!r}", key="outputs")
        named.append((name.strip(), Path(path.strip())))
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise HParamsError(f"output names must differ, got {names}", key="outputs")
    return named


def interval(per_prompt: list[float], hp: CompareHParams) -> tuple[float, float, float]:
    """(mean, low, high) of the per-prompt values: their mean and its bootstrap interval."""
    low, high = judges.bootstrap_interval(per_prompt, num_resamples=hp.num_resamples, confidence=hp.confidence,
                                          seed=hp.run.seed)
    return float(np.mean(per_prompt)), low, high


def by_prompt(rows: list[dict], values: list[float]) -> list[float]:
    """The mean of `values` over each prompt's rows, prompts in order of first appearance."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row, value in zip(rows, values):
        groups[row["prompt"]].append(value)
    return [float(np.mean(v)) for v in groups.values()]


def split_results(hp: CompareHParams, rows: list[dict], *, judge: judges.Judge, references: dict[str, str],
                  metrics: dict[str, diversity.Metric]) -> dict[str, float | None]:
    """Every number of one output file on one split (see the module docstring)."""
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    out: dict[str, float | None] = {"prompts": len(set(prompts)), "rows": len(rows)}
    scores = [float(s) for s in judge.score_fn(prompts, responses)]
    out["judge_score"], out["judge_score_low"], out["judge_score_high"] = interval(by_prompt(rows, scores), hp)
    if references:
        refs = [references[p] for p in prompts]
        credit = [judges.CREDIT[o] for o in judge.compare_batch(prompts, responses, refs)]
        out["win_rate"], out["win_rate_low"], out["win_rate_high"] = interval(by_prompt(rows, credit), hp)
        each = [rouge.rouge(r, ref) for r, ref in zip(responses, refs)]
        out.update({k: float(np.mean([e[k] for e in each])) for k in ("rouge1", "rouge2", "rougeL")})
    out.update(diversity.diversity_report(metrics, diversity.group_by_prompt(rows), max_texts=hp.max_texts,
                                          seed=hp.run.seed))
    return out


def compare(hp: CompareHParams, outputs: dict[str, list[dict]], *, references: dict[str, str],
            in_split, metrics: dict[str, diversity.Metric]) -> dict[str, dict[str, dict]]:
    """{name: {split: split_results}} of every output file (splits in the order id, ood, all)."""
    results = {}
    for name, rows in outputs.items():
        judge = judges.get_judge(hp.judge, seed=hp.run.seed)
        parts: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            parts[in_split(row["prompt"])].append(row)
        results[name] = {s: split_results(hp, parts[s], judge=judge, references=references, metrics=metrics)
                         for s in (*splits.SPLITS, "all") if parts.get(s)}
    return results


def build_metrics(hp: CompareHParams) -> dict[str, diversity.Metric]:
    metrics = {}
    for name in hp.metric_names():
        if name == "embedding":
            embed = text_embeddings.get_embedder(hp.embedder or hp.task.policy.initial_model, key="embedder")
            metrics[name] = diversity.embedding_diversity(embed)
        elif name == "nli":
            metrics[name] = diversity.load_nli(hp.nli, key="nli")
        else:
            metrics[name] = diversity.METRICS[name]
    return metrics


class Comparer:
    """`compare` as a trainer of `trainer.run_training`: no steps to checkpoint, no model to save."""

    checkpoints, steps_done, model = False, 0, None

    def __init__(self, *, run: Run, hp: CompareHParams, outputs: dict[str, list[dict]], references: dict[str, str],
                 in_split, metrics: dict[str, diversity.Metric]):
        self.run, self.hp, self.outputs, self.references = run, hp, outputs, references
        self.in_split, self.metrics = in_split, metrics
        self.results: dict = {}

    def train(self, logger) -> dict[str, float]:
        if not self.run.is_main:
            return {}
        self.results = compare(self.hp, self.outputs, references=self.references, in_split=self.in_split,
                               metrics=self.metrics)
        stats = {f"compare/{name}/{split}/{key}": value for name, by_split in self.results.items()
                 for split, values in by_split.items() for key, value in values.items()}
        logger.log(0, stats)
        return stats

    def save(self, save_dir: Path) -> None:
        atomic_write_bytes(save_dir / RESULTS_FILE, (json.dumps(self.results, indent=1) + "\n").encode())
        write_markdown(save_dir / REPORT_FILE, self.results, judge=self.hp.judge, plot=PLOT_FILE)
        plot_comparison(save_dir / PLOT_FILE, self.results)

    def saved(self, final: dict[str, float]) -> str:
        return f"comparison of {len(self.outputs)} output files in {self.run.save_dir / REPORT_FILE}"


def build_comparer(hp: CompareHParams, run: Run) -> Comparer:
    """Read the output files and the references, check that they cover every prompt, load the
    embedding model and the NLI function; the comparer."""
    outputs = {name: judges.read_output_rows(path) for name, path in parse_outputs(hp.outputs)}
    references, fields = splits.read_references(hp.references) if hp.references else ({}, None)
    in_split = splits.parse_split(hp.split, fields=fields)
    for name, rows in outputs.items():
        for prompt in dict.fromkeys(r["prompt"] for r in rows):
            if references and prompt not in references:
                raise HParamsError(f"{hp.references}: has no reference for the prompt {prompt!r:.60} of output file "
                                   f"{name!r}", key="references")
            if hp.split == "field" and prompt not in fields:
                raise HParamsError(f"{hp.references}: has no \"split\" for the prompt {prompt!r:.60} of output file "
                                   f"{name!r}", key="split")
    return Comparer(run=run, hp=hp, outputs=outputs, references=references, in_split=in_split,
                    metrics=build_metrics(hp))


def train(hp: CompareHParams, *, exp_name: str) -> Path:
    """`launch.py compare`: write comparison.json, compare.md and compare.png into the run
    directory; returns the path of compare.md. Rerunning a finished command does nothing."""
    return run_training(hp, exp_name=exp_name, build=lambda run: build_comparer(hp, run),
                        outputs=(RESULTS_FILE, REPORT_FILE, PLOT_FILE)) / REPORT_FILE
