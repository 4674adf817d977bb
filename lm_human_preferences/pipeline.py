"""The whole RLHF pipeline in one command, for the offline tasks (or any task with a labeler).

    python launch.py pipeline offline_sentiment demo

  1. pretrain the base language model (`train_sft`), unless it is already cached;
  2. collect best-of-4 labels from the scripted labeler (`collect_labels`);
  3. train the reward model on them (`train_reward`);
  4. train the policy with PPO against the reward model (`train_policy`), logging the
     labeler's gold score alongside the reward model's score;
  5. evaluate the initial and final policies on fixed held-out queries and write
     `report.md` + `curves.png` into runs/<experiment>/.

Each stage writes its own run directory under runs/<experiment>/ and is skipped when that run
finished (its status.json says so and its final output exists), so rerunning after a crash
continues where it stopped.
Stage options: `--<stage>.<key>=value` (stage: train_sft, collect_labels, train_reward,
train_policy); `--run.<key>` applies to every stage, `--task.<key>` to every stage but
train_sft.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lm_human_preferences import (collect_labels, distributed, labelers, lm_tasks, rewards, scoring, train_policy,
                                  train_reward, train_sft)
from lm_human_preferences.hparams import MAX_COUNT, HParamsError
from lm_human_preferences.figures import save_figure
from lm_human_preferences.language.checkpoints import CheckpointError, atomic_write_bytes
from lm_human_preferences.logs import print0
from lm_human_preferences.policy import Policy
from lm_human_preferences.run_status import changed_settings, list_changes, run_finished

STAGES = ("train_sft", "collect_labels", "train_reward", "train_policy")
EVAL_SEED = 12345


def split_args(args: list[str]) -> dict[str, list[str]]:
    """Route `--stage.key=v` to its stage; `--run.*` goes to every stage, `--task.*` to every
    stage with a task (all but train_sft). Any other option is an error."""
    per_stage: dict[str, list[str]] = {s: [] for s in STAGES}
    for a in args:
        key = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        head = key.split(".", 1)[0]
        if head in STAGES:
            per_stage[head].append("--" + a[2 + len(head) + 1:])
        elif head in ("run", "task"):
            for s in STAGES:
                if head == "run" or s != "train_sft":
                    per_stage[s].append(a)
        else:
            raise HParamsError(f"unknown pipeline option {a!r}; use --<stage>.<key>=value with a stage "
                               f"in {STAGES}, or --run.<key> / --task.<key>")
    return per_stage


@torch.no_grad()
def evaluate(policy: Policy, ref_policy: Policy, *, score_fn: scoring.ComposedScoreFn, labeler, queries: torch.Tensor,
             task, encoding, device, seed: int) -> dict:
    """Reward-model score, gold score and KL(policy || reference) on fixed queries."""
    queries = queries.to(device)
    contexts = lm_tasks.policy_contexts(queries, task=task, encoding=encoding)
    gen = torch.Generator(device=device).manual_seed(seed)
    responses = policy.respond(contexts, length=task.response_length, temperature=task.policy.temperature,
                               pad_token=encoding.padding_token, generator=gen)
    scores, postprocessed_responses, _ = score_fn(queries, responses)
    gold = scoring.labeler_scorer(labeler, encoding=encoding)(queries, postprocessed_responses)  # as labels were made
    texts = [encoding.decode(r, skip_special=True) for r in postprocessed_responses.tolist()]  # for the report
    kw = dict(temperature=task.policy.temperature, pad_token=encoding.padding_token)
    kl = (policy(contexts, responses, **kw).logprobs - ref_policy(contexts, responses, **kw).logprobs).sum(1)
    return {"score": float(scores.mean()), "gold": float(gold.mean()), "gold_std": float(gold.std()),
            "kl": float(kl.mean()), "texts": texts, "gold_each": gold.tolist(), "scores_each": scores.tolist()}


def plot_curves(policy_metrics: Path, reward_metrics: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in policy_metrics.read_text().splitlines() if line.strip()]
    rm_rows = [json.loads(line) for line in reward_metrics.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("objective/score", "reward model score"), ("objective/gold", "gold score (labeler)"),
              ("objective/kl", "KL(policy || initial)"), ("objective/kl_coef", "KL coefficient β")]
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(title)
        ax.set_xlabel("PPO update")
    rm = [(r["step"], r["train/loss"]) for r in rm_rows if r.get("train/loss") is not None]
    if rm:
        inset = axes[0, 0].inset_axes([0.6, 0.08, 0.37, 0.35])
        inset.plot(*zip(*rm), color="gray")
        inset.set_title("reward model loss", fontsize=7)
        inset.tick_params(labelsize=6)
    fig.tight_layout()
    save_figure(fig, out)


def _held_out_accuracy(reward_eval: dict) -> str:
    """The saved reward model's held-out accuracy, and the step it is from under select_best."""
    if "best/step" in reward_eval:
        accuracy, step = reward_eval["best/eval/accuracy"], reward_eval["best/step"]
        return f"{accuracy:.3f} (the best evaluation's model, from step {step})"
    return f"{reward_eval.get('eval/accuracy', float('nan')):.3f}"


def write_report(path: Path, *, task_name: str, before: dict, after: dict, query_texts: list[str],
                 timings: dict[str, float | None], reward_eval: dict, reused: frozenset[str] = frozenset(),
                 n_samples: int = 6) -> None:
    """report.md; `timings`: seconds per stage, those in `reused` taken by the run that made its
    output (None: unknown, e.g. a base model cached by another experiment)."""
    lines = [f"# RLHF pipeline report: {task_name}", "",
             f"Held-out queries: {len(query_texts)}. Scores are means over one sample per query.", "",
             "| policy | reward-model score | gold score (labeler) | KL to initial |", "|---|---|---|---|",
             f"| initial | {before['score']:.3f} | {before['gold']:.3f} | {before['kl']:.3f} |",
             f"| final | {after['score']:.3f} | {after['gold']:.3f} | {after['kl']:.3f} |", "",
             f"Gold score change: **{after['gold'] - before['gold']:+.3f}**. "
             f"Reward model held-out accuracy: {_held_out_accuracy(reward_eval)} (chance {1 / 4:.2f}).", "", "![learning curves](curves.png)", "", "## Samples", "",
             "| query | initial policy | final policy |", "|---|---|---|"]

    def cell(text: str, gold: float) -> str:
        return text.replace("|", "\\|").replace("\n", " ") + f" *({gold:+.2f})*"

    for i in range(min(n_samples, len(query_texts))):
        lines.append(f"| {cell(query_texts[i], float('nan')).rsplit(' *(', 1)[0]} | "
                     f"{cell(before['texts'][i], before['gold_each'][i])} | {cell(after['texts'][i], after['gold_each'][i])} |")
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {'—' if v is None else f'{v:.0f}'}{' (reused)' if k in reused else ''} |"
              for k, v in timings.items()]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def earlier_seconds(summary: Path) -> dict[str, float]:
    """Seconds per stage recorded in an earlier run's summary.json ({} without one)."""
    try:
        seconds = json.loads(summary.read_text())["seconds"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: v for k, v in seconds.items() if isinstance(v, (int, float))} if isinstance(seconds, dict) else {}


def finished(stage_dir: Path, output: Path, hp, *, inputs: tuple[Path, ...] = (),
             remedy: str = "delete it, or use another experiment name, to run it with these") -> bool:
    """Whether a stage's run finished with its `output`, to be reused (`run_status.run_finished`);
    an error if that run (hparams.json in `stage_dir`) had other settings than `hp`, or if one of
    the `inputs` it was built from (an earlier stage's output) was written after it, which a rerun
    would otherwise silently mix."""
    if not run_finished(stage_dir, (output.name,)):
        return False
    changed = changed_settings(stage_dir / "hparams.json", hp)
    if changed:
        raise HParamsError(f"{stage_dir} holds a finished stage with other settings ({list_changes(changed)}); "
                           f"{remedy}")
    for newer in (p for p in inputs if p.is_file() and p.stat().st_mtime > output.stat().st_mtime):
        raise HParamsError(f"{stage_dir} was built from an earlier {newer} (written again since); {remedy}")
    return True


@dataclass
class PipelineRuns:
    """The four stages' settings, each with its run directory under `root`."""

    sft: train_sft.TrainSFTHParams
    labels: collect_labels.CollectLabelsHParams
    reward: train_reward.TrainRewardHParams
    policy: train_policy.TrainPolicyHParams
    root: Path

    @property
    def labels_path(self) -> Path:
        return Path(self.labels.run.save_dir) / "labels.json"


class StageTimes:
    """Seconds per stage for the report. A reused stage keeps the time of the run that made its
    output (when known, from the `earlier` summary), not ~0 s."""

    def __init__(self, earlier: dict[str, float]):
        self.earlier = earlier
        self.seconds: dict[str, float | None] = {}
        self.reused: set[str] = set()

    def took(self, stage: str, since: float, *, was_reused: bool) -> None:
        if was_reused:
            self.reused.add(stage)
        self.seconds[stage] = self.earlier.get(stage) if was_reused else time.time() - since


def run_pipeline(task_name: str, exp_name: str, args: list[str], *, presets: dict, eval_queries: int = 64) -> Path:
    """`presets`: stage -> dotted overrides (params.PIPELINE[task]), applied before `args`."""
    runs = configure_runs(exp_name, split_args(args), presets=presets, eval_queries=eval_queries)
    times = StageTimes(earlier_seconds(runs.root / "summary.json"))
    pretrain(runs, exp_name, has_sft_preset=bool(presets.get("train_sft")), times=times)
    inputs = collect_and_train(runs, exp_name, times=times)
    labeler, initial = train_ppo(runs, exp_name, inputs=inputs, times=times)
    if distributed.launch_rank() != 0:  # evaluation and report, on the first process only
        return runs.root / "report.md"
    return evaluate_and_report(runs, task_name, labeler=labeler, initial=initial, eval_queries=eval_queries,
                               times=times)


def configure_runs(exp_name: str, per_stage: dict[str, list[str]], *, presets: dict,
                   eval_queries: int) -> PipelineRuns:
    """Every stage's settings, checked before the first stage starts, with the run directories
    and the models each stage reads from the one before set."""
    def configure(stage: str, hp):
        hp.override_from_dict(presets.get(stage, {}))
        hp.override_from_args(per_stage[stage])
        hp.validate()
        return hp

    if not 1 <= eval_queries <= MAX_COUNT:
        raise HParamsError(f"must be >= 1 and <= 2**40 (got {eval_queries})", key="eval_queries")
    policy_hp = configure("train_policy", train_policy.TrainPolicyHParams())
    if policy_hp.rewards.function is not None:
        raise HParamsError("the pipeline trains the policy against the reward model it trains; run train_policy "
                           "for PPO against a function of your own", key="train_policy.rewards.function")
    runs = PipelineRuns(sft=configure("train_sft", train_sft.TrainSFTHParams()),
                        labels=configure("collect_labels", collect_labels.CollectLabelsHParams()),
                        reward=configure("train_reward", train_reward.TrainRewardHParams()), policy=policy_hp,
                        root=Path(policy_hp.run.save_dir or Path(f"runs/{exp_name}")))
    runs.labels.run.save_dir = str(runs.root / "labels")
    runs.reward.run.save_dir = str(runs.root / "reward_model")
    runs.reward.labels.source = str(runs.labels_path)
    policy_hp.run.save_dir = str(runs.root / "policy")
    policy_hp.rewards.trained_model = runs.reward.run.save_dir
    policy_hp.rewards.train_new_model = None
    return runs


def pretrain(runs: PipelineRuns, exp_name: str, *, has_sft_preset: bool, times: StageTimes) -> None:
    """1. The base language model, cached across runs; first, the later stages a run finished
    before are checked against their settings."""
    t = time.time()
    try:
        found = lm_tasks.resolve_model_dir(runs.policy.task.policy.initial_model)  # where training will look
    except CheckpointError as e:
        if not has_sft_preset:  # only the offline tasks pretrain their base model here
            raise CheckpointError(f"{e}. The pipeline pretrains a base model only for tasks with a "
                                  f"train_sft preset (the offline_* tasks)") from None
        found = None
    # Stages 2-4 done before, checked before anything runs (with their settings; base model age later).
    for hp, output in ((runs.labels, "labels.json"), (runs.reward, "config.json"), (runs.policy, "config.json")):
        finished(Path(hp.run.save_dir), Path(hp.run.save_dir) / output, hp)
    shared = ("it is shared by every experiment of the task: delete it to pretrain again with these, or pass "
              "--task.policy.initial_model=DIR for a base model of their own")
    base_reused = found is not None and finished(found, found / "config.json", runs.sft, remedy=shared)
    base_model = Path(runs.policy.task.policy.initial_model)
    if base_reused:
        print0(f"[1/5] base model: reusing {found}")
    else:
        print0(f"[1/5] pretraining the base model into {base_model}")
        runs.sft.run.save_dir = str(base_model)
        train_sft.train(runs.sft, exp_name=f"{exp_name}/train_sft")
    times.took("pretrain", t, was_reused=base_reused)


def run_stage(stage: str, hp, output: Path, *, inputs: tuple[Path, ...], reusing: str, running: str,
              train, since: float, times: StageTimes) -> None:
    """Reuse the stage's finished run (`finished`) or `train()` it, saying which."""
    was_reused = finished(output.parent, output, hp, inputs=inputs)
    print0(reusing if was_reused else running)
    if not was_reused:
        train()
    times.took(stage, since, was_reused=was_reused)


def collect_and_train(runs: PipelineRuns, exp_name: str, *, times: StageTimes) -> tuple[Path, Path]:
    """2. Labels from the scripted labeler; 3. the reward model. Returns what the policy is
    built from: (the base model's config.json, the reward model's)."""
    t = time.time()
    base = lm_tasks.resolve_model_dir(runs.policy.task.policy.initial_model) / "config.json"
    run_stage("collect_labels", runs.labels, runs.labels_path, inputs=(base,),
              reusing=f"[2/5] labels: reusing {runs.labels_path}", running="[2/5] collecting labels",
              train=lambda: collect_labels.train(runs.labels, exp_name=f"{exp_name}/labels"), since=t, times=times)
    rm_dir = runs.reward.run.save_dir
    run_stage("train_reward", runs.reward, Path(rm_dir) / "config.json", inputs=(base, runs.labels_path),
              reusing=f"[3/5] reward model: reusing {rm_dir}", running="[3/5] training the reward model",
              train=lambda: train_reward.train(runs.reward, exp_name=f"{exp_name}/reward_model"), since=time.time(),
              times=times)
    return base, Path(rm_dir) / "config.json"


def train_ppo(runs: PipelineRuns, exp_name: str, *, inputs: tuple[Path, Path], times: StageTimes):
    """4. PPO, with the labeler's gold score logged beside the reward model's. Returns the
    labeler and the initial model, for the evaluation."""
    t = time.time()
    labeler = labelers.get_labeler(runs.labels.labeler)
    initial = lm_tasks.load_pretrained(runs.policy.task.policy.initial_model)
    enc = initial.encoding

    def gold_stats(queries, postprocessed_responses):
        texts = [enc.decode(r) for r in postprocessed_responses.tolist()]
        return {"objective/gold": sum(labeler.score(texts)) / len(texts)}

    policy_dir = runs.policy.run.save_dir
    run_stage("train_policy", runs.policy, Path(policy_dir) / "config.json", inputs=inputs,
              reusing=f"[4/5] policy: reusing {policy_dir}", running="[4/5] training the policy with PPO",
              train=lambda: train_policy.train(runs.policy, exp_name=f"{exp_name}/policy", extra_stats=gold_stats),
              since=t, times=times)
    return labeler, initial


def evaluate_and_report(runs: PipelineRuns, task_name: str, *, labeler, initial: lm_tasks.PretrainedModel,
                        eval_queries: int, times: StageTimes) -> Path:
    """5. The initial and final policies on fixed held-out queries; report.md, curves.png and
    summary.json in the root run directory. Returns the report's path."""
    t = time.time()
    print0("[5/5] evaluating")
    task, enc = runs.policy.task, initial.encoding
    reward_model = rewards.load_reward_model(runs.reward.run.save_dir, encoding=enc).eval()
    scorer = scoring.reward_model_scorer(reward_model, pad_token=enc.padding_token,
                                         autocast=lambda: torch.autocast("cpu", enabled=False))
    score_fn = scoring.make_score_fn(task=task, pad_token=enc.padding_token, scorer=scorer)
    queries = next(lm_tasks.query_dataset(copy.deepcopy(task), encoding=enc, data_dir=runs.policy.run.data_dir,
                                          batch_size=eval_queries, rank=0, world_size=1, seed=EVAL_SEED))
    ref = Policy(initial.gpt).eval()
    final = Policy(lm_tasks.load_pretrained(runs.policy.run.save_dir).gpt).eval()
    kw = dict(score_fn=score_fn, labeler=labeler, queries=queries, task=task, encoding=enc, device="cpu",
              seed=EVAL_SEED)
    before = evaluate(ref, ref, **kw)
    after = evaluate(final, ref, **kw)
    times.seconds["evaluate"] = time.time() - t
    rm_metrics, report = Path(runs.reward.run.save_dir) / "metrics.jsonl", runs.root / "report.md"
    plot_curves(Path(runs.policy.run.save_dir) / "metrics.jsonl", rm_metrics, runs.root / "curves.png")
    rm_final = [json.loads(x) for x in rm_metrics.read_text().splitlines() if x]
    reward_eval = {k: v for r in rm_final for k, v in r.items() if k.startswith(("eval/", "best/"))}
    write_report(report, task_name=task_name, before=before, after=after,
                 query_texts=[enc.decode(q, skip_special=True) for q in queries.tolist()], timings=times.seconds,
                 reward_eval=reward_eval, reused=frozenset(times.reused))
    summary = {"initial": {k: before[k] for k in ("score", "gold", "kl")},
               "final": {k: after[k] for k in ("score", "gold", "kl")}, "seconds": times.seconds}
    atomic_write_bytes(runs.root / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    print0(f"gold score {before['gold']:+.3f} -> {after['gold']:+.3f}, reward-model score "
           f"{before['score']:+.3f} -> {after['score']:+.3f}, KL {after['kl']:.2f}")
    print0(f"report: {report}")
    return report
