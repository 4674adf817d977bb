"""Reward model training (the original's `train_reward.py`), docs/original.md §5.

    python launch.py train_reward sentiment my_rm --labels.source=PATH_OR_URL

1. read and validate the label file (before anything is written);
2. normalize before: raw rewards of samples from the FIXED initial policy -> gain, bias;
3. one epoch over the first `labels.num_train` labels, in a permutation shared by all ranks,
   lr annealed linearly to 0, TF-style Adam, gradient accumulation in micro-batches;
4. held-out loss/accuracy on the labels after `num_train`;
5. normalize after (target mean 0, std 1), save `model.safetensors` + `config.json`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lm_human_preferences import distributed, label_types, labels, lm_tasks, pair_labels, templates
from lm_human_preferences.adapters import LoRAHParams, attach, save_model
from lm_human_preferences.hparams import HParams, HParamsError, check_count, check_number
from lm_human_preferences.language import memory
from lm_human_preferences.logs import print0, progress
from lm_human_preferences.optim import TFAdam
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel, normalization_constants
from lm_human_preferences.runtime import Run, RunHParams
from lm_human_preferences.trainer import accumulate_and_step, run_training


MAX_RESPONSES = 1024  # responses a label compares (the paper's: 4); more is no labeling task


@dataclass
class LabelHParams(HParams):
    type: str = "best_of_4"  # best_of_N (N >= 2), scalar_rating, scalar_compare, preference or soft_preference
    num_train: int = 4992  # labels trained on (one epoch); the rest of the file is held out
    source: str = ""  # a label or preference-pair file (path or URL); empty: the original's file for the task
    template: str = "plain"  # how a pair file's prompt and response become query and response text (templates.py)

    def _validate(self):
        try:
            label_type = label_types.get_label_type(self.type)
        except ValueError as e:
            raise HParamsError(str(e), key="type") from None
        if label_type.num_responses > MAX_RESPONSES:
            raise HParamsError(f"at most {MAX_RESPONSES} responses per label", key="type")
        check_count(self, "num_train")
        if self.template not in templates.TEMPLATES:
            raise HParamsError(f"unknown template {self.template!r}; expected one of {', '.join(templates.TEMPLATES)}",
                               key="template")


@dataclass
class RewardTrainingHParams(HParams):
    """How a reward model is trained; also the `rewards.train_new_model` section of train_policy."""

    labels: LabelHParams = field(default_factory=LabelHParams)  # the label file and how much of it trains
    batch_size: int = 32  # labels per step, across all ranks
    micro_batch_size: Optional[int] = None  # per rank; gradient accumulation when smaller
    lr: float = 5e-5  # Adam learning rate, annealed linearly to 0
    rollout_batch_size: int = 512  # queries sampled per normalization batch, across ranks
    normalize_samples: int = 256  # samples used to estimate reward mean and std (0: off)
    normalize_before: bool = True  # normalize the initial policy's rewards before training (to the label type's mean, std)
    normalize_after: bool = True  # normalize them again after training (to mean 0, std 1)
    eval_batch_size: int = 64  # held-out labels per evaluation batch
    lora: Optional[LoRAHParams] = None  # train low-rank adapters and the head only (adapters.py)

    def _validate(self):
        for key in ("batch_size", "rollout_batch_size", "eval_batch_size"):
            check_count(self, key)
        if self.micro_batch_size is not None:  # None: no gradient accumulation
            check_count(self, "micro_batch_size")
        check_count(self, "normalize_samples", at_least=0)  # 0: no normalization
        check_number(self, "lr", above=0)
        if self.labels.num_train % self.batch_size:
            raise HParamsError(f"labels.num_train={self.labels.num_train} is not a multiple of "
                               f"batch_size={self.batch_size}", key="batch_size")


@dataclass
class TrainRewardHParams(RewardTrainingHParams):
    run: RunHParams = field(default_factory=RunHParams)  # how it runs: device, precision, seed, outputs, checkpoints
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)  # queries, responses, initial policy


def check_memory(hp: TrainRewardHParams, model: lm_tasks.PretrainedModel, run: Run) -> None:
    """Before anything runs: a rank's normalization sampling batch and training micro-batch must be
    able to fit in memory (lower bounds, see `language.memory`)."""
    config, value_bytes = model.gpt.config, 2 if run.bf16 else 4
    rollout = run.per_rank(hp.rollout_batch_size, "rollout_batch_size")
    per_rank = run.per_rank(hp.batch_size, "batch_size")
    micro = min(hp.micro_batch_size or per_rank, per_rank)
    rows = micro * label_types.get_label_type(hp.labels.type).num_responses
    lm_tasks.check_memory(run.device, [
        ("rollout_batch_size", memory.kv_cache_bytes(config, rows=rollout, value_bytes=value_bytes,
                                                     tokens=lm_tasks.context_length(hp.task, model.encoding)),
         f"sampling {rollout} responses at once (a rank's share of the batch)"),
        ("micro_batch_size" if hp.micro_batch_size else "batch_size",
         memory.training_bytes(config, rows=rows, tokens=hp.task.query_length + hp.task.response_length,
                               value_bytes=value_bytes, logits=False),
         f"a training micro-batch of {micro} labels ({rows} responses; micro_batch_size accumulates smaller "
         "ones)")])


def load_label_rows(hp: RewardTrainingHParams, task: lm_tasks.TaskHParams, *, encoding,
                    data_dir: str) -> tuple[label_types.LabelType, list[dict]]:
    """Resolve, download (once, cached) and validate the label file; a preference-pair file is
    rendered with `labels.template` and tokenized (`pair_labels`)."""
    label_type = label_types.get_label_type(hp.labels.type)
    if not hp.labels.source:
        raise HParamsError("no label file; pass --labels.source=PATH_OR_URL", key="labels.source")
    path = labels.resolve_label_source(hp.labels.source, cache_dir=Path(data_dir) / "labels")
    rows = pair_labels.read_label_rows(path, label_type=label_type, template=hp.labels.template,
                                       query_length=task.query_length, response_length=task.response_length,
                                       encoding=encoding)
    if len(rows) < hp.labels.num_train:
        raise labels.LabelFileError(f"{path}: {len(rows)} labels, but labels.num_train={hp.labels.num_train}")
    return label_type, rows


class RewardTrainer:
    """Trains `reward_model` on label rows; `policy` is the fixed initial policy for normalization."""

    def __init__(self, *, run: Run, hp: RewardTrainingHParams, task: lm_tasks.TaskHParams, encoding,
                 reward_model: RewardModel, policy: Policy, label_type, rows: list[dict]):
        self.run, self.hp, self.task, self.encoding = run, hp, task, encoding
        self.reward_model = run.place(reward_model)
        self.policy = run.place(policy).eval().requires_grad_(False)
        self.label_type = label_type
        all_labels = {k: v.to(run.device) for k, v in labels.labels_to_tensors(rows, label_type=label_type).items()}
        n = hp.labels.num_train
        self.train_labels = {k: v[:n] for k, v in all_labels.items()}
        self.eval_labels = {k: v[n:] for k, v in all_labels.items()}
        self.ddp_model = run.ddp(self.reward_model)
        self.optimizer = TFAdam(self.reward_model.parameters(), lr=hp.lr)
        self.per_rank = run.per_rank(hp.batch_size, "batch_size")
        self.micro = min(hp.micro_batch_size or self.per_rank, self.per_rank)
        if self.per_rank % self.micro:
            raise HParamsError(f"per-rank batch {self.per_rank} is not a multiple of {self.micro}",
                               key="micro_batch_size")
        self.queries = lm_tasks.query_dataset(task, encoding=encoding, data_dir=run.hp.data_dir,
                                              batch_size=run.per_rank(hp.rollout_batch_size, "rollout_batch_size"),
                                              rank=run.rank, world_size=run.world_size, seed=run.hp.seed)
        self.step = 0
        self.normalized_before = False

    # ---- normalization ------------------------------------------------------------------
    @torch.no_grad()
    def reward_moments(self, n_samples: int, *, step_seed: int) -> tuple[float, float]:
        """Mean and population std of raw rewards of `n_samples` fresh policy samples, over all ranks."""
        total, sq, count = 0.0, 0.0, 0
        n_batches = -(-n_samples // self.hp.rollout_batch_size)
        with self.policy.gpt.keep_decoding_weights():  # one packing of the weights for every batch (CPU)
            for i in range(n_batches):
                queries = next(self.queries).to(self.run.device)  # (b, Lq)
                # One generator for all ranks, noise drawn per global row: the same samples on any number of ranks.
                gen = self.run.generator("sample", step_seed * 1000 + i, shared=True)
                with self.run.autocast():
                    responses = lm_tasks.sample_responses(self.policy, queries, task=self.task, encoding=self.encoding,
                                                          generator=gen, shard=(self.run.rank, self.run.world_size))
                    r = self.reward_model.raw_rewards(queries, responses, pad_token=self.encoding.padding_token)
                total += float(r.double().sum())
                sq += float(r.double().square().sum())
                count += r.numel()
        sums = distributed.all_reduce_sum(torch.tensor([total, sq, count], dtype=torch.float64, device=self.run.device))
        mean = float(sums[0] / sums[2])
        var = float(sums[1] / sums[2]) - mean**2
        return mean, max(var, 0.0) ** 0.5

    def normalize(self, *, target_mean: float, target_std: float, step_seed: int) -> dict:
        self.reward_model.set_normalization(gain=1.0, bias=0.0)
        mean, std = self.reward_moments(self.hp.normalize_samples, step_seed=step_seed)
        if not (std > 0 and mean == mean):
            raise RuntimeError(f"reward normalization failed: raw rewards have mean {mean}, std {std}")
        gain, bias = normalization_constants(mean=mean, std=std, target_mean=target_mean, target_std=target_std)
        self.reward_model.set_normalization(gain=gain, bias=bias)
        print0(f"normalized rewards: raw {mean:.4f} +- {std:.4f} -> target {target_mean} +- {target_std} "
               f"(gain {gain:.4f}, bias {bias:.4f})")
        return {"mean": mean, "std": std, "gain": gain, "bias": bias}

    # ---- training -----------------------------------------------------------------------
    def reward_fn(self, model):
        pad = self.encoding.padding_token
        return lambda q, r: model(q.to(self.run.device), r.to(self.run.device), pad_token=pad)

    def train_step(self, indices: torch.Tensor, lr: float) -> dict[str, float] | None:
        """One optimizer step on this rank's `indices`, in micro-batches; None if it was skipped
        (a non-finite loss or gradient with `run.skip_nonfinite`). The loss and its backward pass
        run under autocast."""
        def loss_of(m: int) -> dict[str, torch.Tensor]:
            idx = indices[m * self.micro:(m + 1) * self.micro]
            batch = {k: v[idx] for k, v in self.train_labels.items()}
            return self.label_type.loss(self.reward_fn(self.ddp_model), batch)

        return accumulate_and_step(self.run, model=self.ddp_model, optimizer=self.optimizer, lr=lr,
                                   n_micro=len(indices) // self.micro, loss_of=loss_of, step=self.step + 1,
                                   backward_in_autocast=True)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the held-out labels (this rank's share), averaged over ranks."""
        n = len(next(iter(self.eval_labels.values())))
        mine = torch.arange(n)[self.run.rank::self.run.world_size]
        sums: dict[str, float] = {}
        for start in range(0, len(mine), self.hp.eval_batch_size):
            idx = mine[start:start + self.hp.eval_batch_size]
            batch = {k: v[idx] for k, v in self.eval_labels.items()}
            with self.run.autocast():
                out = self.label_type.loss(self.reward_fn(self.reward_model), batch)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
        # Rank 0 has labels whenever any rank has; a rank with none must still reduce the same keys.
        keys = distributed.broadcast_object(sorted(sums))
        totals = distributed.all_reduce_sum(torch.tensor([sums.get(k, 0.0) for k in keys] + [float(len(mine))],
                                                         dtype=torch.float64, device=self.run.device))
        count = float(totals[-1])
        return {f"eval/{k}": float(totals[i]) / count for i, k in enumerate(keys)} if count else {}

    # ---- the run (see trainer.run_training) ----------------------------------------------
    checkpoints = True

    @property
    def steps_done(self) -> int:
        return self.step

    @property
    def model(self) -> RewardModel:
        return self.reward_model

    def save(self, save_dir: Path) -> None:
        save_reward_model(save_dir, self.reward_model, encoding=self.encoding.to_meta(), lora_hp=self.hp.lora,
                          base=self.task.policy.initial_model)

    def saved(self, final: dict[str, float]) -> str:
        return (f"reward model saved to {self.run.save_dir} "
                + " ".join(f"{k}={v:.4f}" for k, v in final.items() if k.startswith("eval/")))

    def state_dict(self) -> dict:
        return {"step": self.step, "normalized_before": self.normalized_before,
                "model": self.reward_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "queries": self.queries.state_dict(), "skipped_batches": self.run.skipped_batches}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.run.skipped_batches = state.get("skipped_batches", 0)
        self.normalized_before = state["normalized_before"]
        self.reward_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.queries.load_state_dict(state["queries"])

    def train(self, logger) -> dict[str, float]:
        hp, run = self.hp, self.run
        n_steps = hp.labels.num_train // hp.batch_size
        target_mean, target_std = self.label_type.target_stats(self.train_labels)
        if hp.normalize_before and hp.normalize_samples and not self.normalized_before:
            norm = self.normalize(target_mean=target_mean, target_std=target_std, step_seed=0)
            logger.log(0, {f"normalize/before/{k}": v for k, v in norm.items()})
            self.normalized_before = True
        perm = torch.randperm(hp.labels.num_train, generator=run.generator("shuffle", shared=True))
        with progress(total=n_steps, desc="train_reward", enabled=run.is_main, unit="step") as bar:
            bar.update(self.step)
            last: dict[str, float] = {}
            while self.step < n_steps:
                start = self.step * hp.batch_size
                ours = perm[start:start + hp.batch_size][run.rank::run.world_size]
                lr = hp.lr * (1 - start / hp.labels.num_train)
                stats = distributed.all_reduce_stats(self.train_step(ours, lr) or {}, device=run.device)
                stats["lr"] = lr
                self.step += 1
                bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if k != "lr"}, refresh=False)
                bar.update(1)
                skipped = {"run/skipped_batches": run.skipped_batches} if run.hp.skip_nonfinite else {}
                if self.step % run.hp.log_interval == 0 and self.step < n_steps:  # the last step: below
                    logger.log(self.step, {**{f"train/{k}": v for k, v in stats.items()}, **skipped})
                run.step_boundary(self.step, n_steps, self.state_dict)
                last = {**{f"train/{k}": v for k, v in stats.items()}, **skipped}
        final = dict(last)  # the last step's statistics, with the evaluation: one row
        final.update(self.evaluate())
        if hp.normalize_after and hp.normalize_samples:
            norm = self.normalize(target_mean=0.0, target_std=1.0, step_seed=1)
            final.update({f"normalize/after/{k}": v for k, v in norm.items()})
        logger.log(n_steps, final)
        return final


def build_reward_model(initial: lm_tasks.PretrainedModel, *, seed: int, lora_hp=None) -> RewardModel:
    """A reward model whose trunk starts from the initial policy's weights; seeded head (and
    adapters with `lora_hp`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RewardModel(attach(copy.deepcopy(initial.gpt), lora_hp, seed=seed))


def save_reward_model(out_dir, reward_model: RewardModel, *, encoding: str | dict, lora_hp=None, base: str = ""):
    return save_model(out_dir, gpt=reward_model.gpt, heads=reward_model.head_state(),
                      meta={"kind": "reward", "encoding": encoding}, lora_hp=lora_hp, base=base)


def build_trainer(hp: TrainRewardHParams, run: Run) -> RewardTrainer:
    """Check the inputs, read the labels, load the initial policy and make the trainer."""
    initial = lm_tasks.load_pretrained(hp.task.policy.initial_model)
    lm_tasks.check_task_fits(hp.task, initial)
    check_memory(hp, initial, run)
    label_type, rows = load_label_rows(hp, hp.task, encoding=initial.encoding, data_dir=hp.run.data_dir)
    return RewardTrainer(run=run, hp=hp, task=hp.task, encoding=initial.encoding, policy=Policy(initial.gpt),
                         reward_model=build_reward_model(initial, seed=hp.run.seed, lora_hp=hp.lora),
                         label_type=label_type, rows=rows)


def train(hp: TrainRewardHParams, *, exp_name: str) -> Path:
    return run_training(hp, exp_name=exp_name, build=lambda run: build_trainer(hp, run))


def train_new_model(hp: RewardTrainingHParams, *, run: RunHParams, task: lm_tasks.TaskHParams, save_dir: Path,
                    exp_name: str) -> Path:
    """train_policy's `rewards.train_new_model` (`hp`): train a reward model in <run>/reward_model
    with the policy run's `run` and `task` settings; one finished there with the same settings is
    reused (`Run.already_finished`), unless --run.resume=never."""
    rhp = TrainRewardHParams()
    rhp.override_from_dict(hp.to_dict())
    rhp.run = copy.deepcopy(run)
    rhp.run.save_dir = str(save_dir / "reward_model")
    rhp.run.resume = "never" if run.resume == "never" else "auto"  # a PATH names a policy checkpoint
    rhp.task = copy.deepcopy(task)
    try:
        return train(rhp, exp_name=f"{exp_name}/reward_model")
    except HParamsError as e:  # name the key as train_policy takes it (run and task are shared)
        if e.key is None or e.key.startswith(("run.", "task.")):
            raise
        key = f"rewards.train_new_model.{e.key}"
        raise HParamsError(e.message.replace(f"--{e.key}", f"--{key}"), key=key) from None
