"""Scores of an output file (`launch.py evaluate`): a reward model's, and a judge's win rate
against a baseline output file.

    python launch.py evaluate offline_sentiment my_eval --outputs=runs/tuned/outputs.jsonl \\
        --reward_model=runs/demo/reward_model --judge=sentiment --baseline=runs/base/outputs.jsonl

An output file holds one JSON object a line with string `"prompt"` and `"response"` fields, as
`generate` writes them (other fields are ignored; `sample` is copied to scores.jsonl).

- Reward model (`reward_model`): each prompt and response is encoded with the reward model's
  encoding and scored as PPO scores its rollouts (`scoring.make_score_fn`): the response cut
  after `task.truncate_token`, and `task.penalty_reward_value` for a response without it.
- Judge (`judge`, `judges.get_judge` seeded with `run.seed`): each response (A) is compared with
  the baseline file's response on the same row (B); both files must hold the same prompts in the
  same order (made from the same prompt file with the same `num_samples`). The win rate counts
  ties as half, and its interval is a percentile bootstrap over prompts
  (`judges.bootstrap_interval` of each prompt's mean): a prompt's samples are resampled together,
  as they are not independent. With one sample per prompt it is `judges.win_rate_files`'s.

- Best-of-N from a pool (`best_of=N`, `best_of_n.simulate`): for each prompt, `best_of_repeats`
  times, draw N of its scored rows without replacement and keep the highest-scored, into
  `<save_dir>/best_of.jsonl` (output rows with `score`, `best_of` and `candidate`; their mean
  score is `eval/best_of_score_mean`). The scores are the reward model's, or without one the
  `score` field of the output file's rows (e.g. the scores.jsonl of an earlier evaluate).

Writes `<save_dir>/scores.jsonl`, one row per output row (`prompt`, `response`, `sample`, and
`score` and/or `judge`: "win", "tie" or "loss" against the baseline), one row (step 0) of
metrics.jsonl (`eval/score_mean`, `eval/score_std`, `eval/penalized`, `eval/win_rate`,
`eval/win_rate_low`, `eval/win_rate_high`, `eval/wins`, `eval/ties`, `eval/losses`,
`eval/prompts`, `eval/rows`; with `judge_scores`, the judge's own mean score of the outputs over
prompts `eval/judge_score_mean` with its interval `eval/judge_score_low`/`_high`, and the
baseline's `eval/judge_score_mean_baseline`), and prints a summary line. It runs on rank 0; other ranks wait.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm_human_preferences import best_of_n, judges, lm_tasks, scoring
from lm_human_preferences.hparams import HParams, HParamsError, check_count, loaded
from lm_human_preferences.language.checkpoints import CheckpointError, atomic_write_bytes
from lm_human_preferences.language.encodings import Encoding, EncodingError, encoding_from_meta
from lm_human_preferences.logs import progress
from lm_human_preferences.rewards import RewardModel, load_reward_model
from lm_human_preferences.runtime import Run, RunHParams
from lm_human_preferences.trainer import run_training

SCORES_FILE = "scores.jsonl"
BEST_OF_FILE = "best_of.jsonl"
OUTCOME = {judges.A: "win", judges.TIE: "tie", judges.B: "loss"}  # of the outputs against the baseline


@dataclass
class EvaluateHParams(HParams):
    run: RunHParams = field(default_factory=RunHParams)  # how it runs: device, precision, seed, outputs
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)  # the responses' truncation, penalty
    outputs: str = ""  # the output file to score: JSON lines with "prompt" and "response" (generate's)
    reward_model: str = ""  # a reward model directory (train_reward's) to score every row with (empty: none)
    judge: str = ""  # a judges.JUDGES name (e.g. sentiment, harmless, preferences, friendly) or MODULE:FUNCTION (empty: none)
    baseline: str = ""  # the output file the judge compares with: the same prompts in the same order
    judge_scores: bool = False  # also the judge's mean score of the outputs (bootstrap interval) and of the baseline
    batch_size: int = 64  # rows the reward model scores at once
    num_resamples: int = 1000  # bootstrap resamples of the win rate's interval
    confidence: float = 0.95  # the win rate interval's confidence level
    best_of: int = 0  # simulate best-of-N from each prompt's pool of scored rows into best_of.jsonl (0: off)
    best_of_repeats: int = 1  # best-of-N draws (N of the pool, without replacement) per prompt

    def _validate(self):
        for key, what in (("outputs", "file"), ("baseline", "file"), ("reward_model", "directory")):
            path = Path(getattr(self, key))
            if getattr(self, key) and not (path.is_file() if what == "file" else path.is_dir()):
                raise HParamsError(f"{path}: no such {what}", key=key)
        if not self.outputs:
            raise HParamsError("no output file given; pass --outputs=FILE (e.g. runs/<exp>/outputs.jsonl of "
                               "generate)", key="outputs")
        if bool(self.judge) != bool(self.baseline):
            raise HParamsError("a judge compares the outputs with a baseline output file; pass both --judge=NAME "
                               "and --baseline=FILE", key="judge" if self.baseline else "baseline")
        if self.judge_scores and not self.judge:
            raise HParamsError("the judge's scores need a judge; pass --judge=NAME with --baseline=FILE",
                               key="judge_scores")
        if not self.reward_model and not self.judge and not self.best_of:
            raise HParamsError("nothing to evaluate with; pass --reward_model=DIR, or --judge=NAME with "
                               "--baseline=FILE, or --best_of=N on a scored file", key="reward_model")
        if self.judge:
            loaded(lambda: judges.get_judge(self.judge), key="judge")
        for key in ("batch_size", "num_resamples", "best_of_repeats"):
            check_count(self, key)
        check_count(self, "best_of", at_least=0)
        if not 0 < self.confidence < 1:
            raise HParamsError(f"must be a number between 0 and 1, both excluded (got {self.confidence})",
                               key="confidence")


def check_same_prompts(rows: list[dict], baseline: list[dict], hp: EvaluateHParams) -> None:
    """The judge pairs row i of both files: they must hold the same prompts in the same order."""
    if len(rows) != len(baseline):
        raise HParamsError(f"{hp.baseline} has {len(baseline)} rows and {hp.outputs} {len(rows)}; expected the "
                           f"same prompts in the same order (the same prompt file and --num_samples)", key="baseline")
    for i, (a, b) in enumerate(zip(rows, baseline), 1):
        if a["prompt"] != b["prompt"]:
            raise HParamsError(f"row {i}: the prompts of {hp.outputs} and {hp.baseline} differ ({a['prompt']!r:.50} "
                               f"vs {b['prompt']!r:.50}); expected the same prompts in the same order",
                               key="baseline")


def load_scorer(path: str) -> tuple[RewardModel, Encoding]:
    """A reward model saved by `train_reward` and the encoding its config.json names."""
    config = Path(path) / "config.json"
    try:
        meta = json.loads(config.read_text()) if config.is_file() else {}
        encoding = encoding_from_meta(meta.get("encoding") if isinstance(meta, dict) else None)
    except (OSError, ValueError, EncodingError) as e:
        raise CheckpointError(f"{config}: cannot read the reward model's encoding ({e})") from None
    return load_reward_model(path, encoding=encoding), encoding


def encode_rows(rows: list[dict], hp: EvaluateHParams, *, encoding: Encoding, n_ctx: int) -> list[tuple[list, list]]:
    """(prompt tokens, response tokens) of every row, checked to fit the reward model."""
    truncate = hp.task.truncate_token
    if truncate is not None and not 0 <= truncate < encoding.n_vocab:
        raise HParamsError(f"{truncate} is not a token of {hp.reward_model}'s vocabulary (0 to "
                           f"{encoding.n_vocab - 1})", key="task.truncate_token")
    encoded = []
    for i, row in enumerate(rows, 1):
        try:
            pair = encoding.encode(row["prompt"]), encoding.encode(row["response"])
        except ValueError as e:  # the 'test' encoding has no token for some characters
            raise HParamsError(f"{hp.outputs}: row {i}: {e}", key="outputs") from None
        if not 0 < len(pair[0]) + len(pair[1]) <= n_ctx:
            raise HParamsError(f"{hp.outputs}: row {i}: prompt and response take {len(pair[0]) + len(pair[1])} "
                               f"tokens; the reward model {hp.reward_model} reads 1 to {n_ctx}", key="outputs")
        encoded.append(pair)
    return encoded


def right_padded(rows: list[list[int]], pad_token: int, device) -> torch.Tensor:
    width = max(1, *map(len, rows))
    return torch.tensor([r + [pad_token] * (width - len(r)) for r in rows], device=device)


@torch.no_grad()
def reward_scores(hp: EvaluateHParams, *, run: Run, reward_model: RewardModel, encoding: Encoding,
                  encoded: list[tuple[list, list]]) -> tuple[list[float], int]:
    """Every row's score and how many rows got the penalty (see the module docstring)."""
    pad = encoding.padding_token
    score = scoring.make_score_fn(task=hp.task, pad_token=pad, scorer=scoring.reward_model_scorer(
        reward_model, pad_token=pad, autocast=run.autocast))
    scores, penalized = [], 0
    bar = progress(total=len(encoded), desc="evaluate", unit="row")
    for start in range(0, len(encoded), hp.batch_size):
        chunk = encoded[start:start + hp.batch_size]
        queries = right_padded([q for q, _ in chunk], pad, run.device)  # (B, Lq)
        responses = right_padded([r for _, r in chunk], pad, run.device)  # (B, Lr)
        batch_scores, _, _ = score(queries, responses)
        scores += batch_scores.tolist()
        penalized += int((~lm_tasks.response_has_truncation(responses, truncate_token=hp.task.truncate_token,
                                                             truncate_after=hp.task.truncate_after)).sum())
        bar.update(len(chunk))
    bar.close()
    return scores, penalized


def judge_win_rate(hp: EvaluateHParams, rows: list[dict], baseline: list[dict]) -> tuple[dict, list[str]]:
    """The judge's win rate of the outputs against the baseline, with its bootstrap interval over
    prompts, as metrics; and each row's outcome."""
    judge = judges.get_judge(hp.judge, seed=hp.run.seed)
    outcomes = judge.compare_batch([r["prompt"] for r in rows], [r["response"] for r in rows],
                                   [r["response"] for r in baseline])
    by_prompt: dict[str, list[float]] = {}
    for row, outcome in zip(rows, outcomes):
        by_prompt.setdefault(row["prompt"], []).append(judges.CREDIT[outcome])
    per_prompt = [sum(c) / len(c) for c in by_prompt.values()]
    low, high = judges.bootstrap_interval(per_prompt, num_resamples=hp.num_resamples, confidence=hp.confidence,
                                          seed=hp.run.seed)
    stats = {"eval/win_rate": sum(per_prompt) / len(per_prompt), "eval/win_rate_low": low,
             "eval/win_rate_high": high, "eval/wins": outcomes.count(judges.A), "eval/ties": outcomes.count(judges.TIE),
             "eval/losses": outcomes.count(judges.B), "eval/prompts": len(per_prompt)}
    if hp.judge_scores:
        stats.update(judge_score_means(hp, judge, rows, baseline))
    return stats, [OUTCOME[o] for o in outcomes]


def judge_score_means(hp: EvaluateHParams, judge: judges.Judge, rows: list[dict], baseline: list[dict]) -> dict:
    """The judge's mean score of the outputs (the mean over prompts of each prompt's mean), with its
    bootstrap interval over prompts, and of the baseline; from its `score_fn`, so the win rate's
    random draws are untouched."""
    prompts = [r["prompt"] for r in rows]

    def per_prompt(responses: list[str]) -> list[float]:
        by_prompt: dict[str, list[float]] = {}
        for prompt, score in zip(prompts, judge.score_fn(prompts, responses)):
            by_prompt.setdefault(prompt, []).append(float(score))
        return [sum(s) / len(s) for s in by_prompt.values()]

    ours, theirs = per_prompt([r["response"] for r in rows]), per_prompt([r["response"] for r in baseline])
    low, high = judges.bootstrap_interval(ours, num_resamples=hp.num_resamples, confidence=hp.confidence,
                                          seed=hp.run.seed)
    return {"eval/judge_score_mean": sum(ours) / len(ours), "eval/judge_score_low": low, "eval/judge_score_high": high,
            "eval/judge_score_mean_baseline": sum(theirs) / len(theirs)}


def summary(hp: EvaluateHParams, stats: dict) -> str:
    """One line: the reward model's mean score and the judge's win rate."""
    parts = []
    if "eval/score_mean" in stats:
        parts.append(f"reward model score {stats['eval/score_mean']:.3f} (std {stats['eval/score_std']:.3f})")
    if "eval/win_rate" in stats:
        parts.append(f"judge {hp.judge}: win rate {stats['eval/win_rate']:.3f} "
                     f"[{stats['eval/win_rate_low']:.3f}, {stats['eval/win_rate_high']:.3f}] "
                     f"({hp.confidence:.0%} interval over {stats['eval/prompts']} prompts; {stats['eval/wins']} wins, "
                     f"{stats['eval/ties']} ties, {stats['eval/losses']} losses) against {hp.baseline}")
    if "eval/judge_score_mean" in stats:
        parts.append(f"judge score {stats['eval/judge_score_mean']:.3f} [{stats['eval/judge_score_low']:.3f}, "
                     f"{stats['eval/judge_score_high']:.3f}], baseline {stats['eval/judge_score_mean_baseline']:.3f}")
    if "eval/best_of_score_mean" in stats:
        parts.append(f"best-of-{hp.best_of} score {stats['eval/best_of_score_mean']:.3f} ({hp.best_of_repeats} draws "
                     f"a prompt: {BEST_OF_FILE})")
    return f"{hp.outputs}, {stats['eval/rows']} rows: " + "; ".join(parts)


def evaluate(hp: EvaluateHParams, *, run: Run, rows: list[dict], baseline: list[dict] | None,
             scorer: tuple[RewardModel, Encoding] | None, encoded: list) -> tuple[dict, list[dict]]:
    """The metrics and the rows of scores.jsonl."""
    stats: dict = {"eval/rows": len(rows)}
    out = [dict(row) for row in rows]
    if scorer is not None:
        reward_model, encoding = scorer
        scores, penalized = reward_scores(hp, run=run, reward_model=run.place(reward_model).eval(),
                                          encoding=encoding, encoded=encoded)
        values = torch.tensor(scores, dtype=torch.float64)
        stats.update({"eval/score_mean": values.mean().item(), "eval/score_std": values.std(unbiased=False).item(),
                      "eval/penalized": penalized / len(rows)})
        for row, s in zip(out, scores):
            row["score"] = s
    if baseline is not None:
        judged, outcomes = judge_win_rate(hp, rows, baseline)
        stats.update(judged)
        for row, outcome in zip(out, outcomes):
            row["judge"] = outcome
    return stats, out


def simulate_best_of(hp: EvaluateHParams, scored: list[dict]) -> tuple[dict, list[dict]]:
    """best_of.jsonl's rows (`best_of_n.simulate`, seeded with `run.seed`) and their mean score
    (`build_evaluator` checked that every pool holds at least `best_of` rows)."""
    kept = best_of_n.simulate(scored, n=hp.best_of, repeats=hp.best_of_repeats, seed=hp.run.seed)
    return {"eval/best_of_score_mean": sum(r["score"] for r in kept) / len(kept)}, kept


class Evaluator:
    """`evaluate` as a trainer of `trainer.run_training`: no steps to checkpoint, no model to save."""

    checkpoints, steps_done, model = False, 0, None

    def __init__(self, *, run: Run, hp: EvaluateHParams, rows: list[dict], baseline: list[dict] | None,
                 scorer: tuple[RewardModel, Encoding] | None, encoded: list):
        self.run, self.hp, self.rows, self.baseline = run, hp, rows, baseline
        self.scorer, self.encoded = scorer, encoded
        self.scored: list[dict] = []
        self.best_of: list[dict] = []

    def train(self, logger) -> dict[str, float]:
        if not self.run.is_main:
            return {}
        stats, self.scored = evaluate(self.hp, run=self.run, rows=self.rows, baseline=self.baseline,
                                      scorer=self.scorer, encoded=self.encoded)
        if self.hp.best_of:
            best, self.best_of = simulate_best_of(self.hp, self.scored)
            stats.update(best)
        logger.log(0, stats)
        return stats

    def save(self, save_dir: Path) -> None:
        atomic_write_bytes(save_dir / SCORES_FILE, "".join(json.dumps(r) + "\n" for r in self.scored).encode())
        if self.hp.best_of:
            atomic_write_bytes(save_dir / BEST_OF_FILE, "".join(json.dumps(r) + "\n" for r in self.best_of).encode())

    def saved(self, final: dict[str, float]) -> str:
        return summary(self.hp, final) if self.run.is_main else ""  # printed on rank 0 only


def build_evaluator(hp: EvaluateHParams, run: Run) -> Evaluator:
    """Read and check the output files, load the reward model and encode the rows for it; the evaluator."""
    if hp.best_of and not hp.reward_model:  # the pool's scores come with it
        rows = [{"prompt": r["prompt"], "response": r["response"], "sample": r.get("sample"), "score": r["score"]}
                for r in best_of_n.read_scored_rows(hp.outputs)]
    else:
        rows = judges.read_output_rows(hp.outputs)
    baseline = judges.read_output_rows(hp.baseline) if hp.baseline else None
    if baseline is not None:
        check_same_prompts(rows, baseline, hp)
    if hp.best_of:
        pools = collections.Counter(row["prompt"] for row in rows)
        small = next((p for p, k in pools.items() if k < hp.best_of), None)
        if small is not None:
            raise HParamsError(f"{hp.outputs}: prompt {small!r:.60} has {pools[small]} responses; best-of-{hp.best_of} "
                               f"draws {hp.best_of} of a prompt's responses without replacement", key="best_of")
    scorer = load_scorer(hp.reward_model) if hp.reward_model else None
    encoded = encode_rows(rows, hp, encoding=scorer[1], n_ctx=scorer[0].gpt.config.n_ctx) if scorer else []
    return Evaluator(run=run, hp=hp, rows=rows, baseline=baseline, scorer=scorer, encoded=encoded)


def train(hp: EvaluateHParams, *, exp_name: str) -> Path:
    """`launch.py evaluate`: write `<save_dir>/scores.jsonl` and metrics.jsonl, print a summary
    line; returns the path of scores.jsonl. Rerunning a finished command does nothing."""
    return run_training(hp, exp_name=exp_name, build=lambda run: build_evaluator(hp, run),
                        outputs=(SCORES_FILE, BEST_OF_FILE) if hp.best_of else (SCORES_FILE,)) / SCORES_FILE
