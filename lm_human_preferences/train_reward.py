"""Reward model training (the original's `train_reward.py`), docs/original.md §5.

    python launch.py train_reward sentiment my_rm --labels.source=PATH_OR_URL

1. read and validate the label file (before anything is written);
2. normalize before: raw rewards of samples from the FIXED initial policy -> gain, bias;
3. `epochs` (default one, the original's) over the first `labels.num_train` labels, each in a
   permutation shared by all ranks, lr annealed linearly to 0 over all of them, TF-style Adam,
   gradient accumulation in micro-batches; held-out evaluations every `eval_interval` steps and
   at each epoch's end (`select_best` keeps the model of the best one, `reward_tracking`);
   `labels.log_pair_scores` writes each pair's rewards at each visit;
4. held-out loss/accuracy on the labels after `num_train`;
5. normalize after (target mean 0, std 1), save `model.safetensors` + `config.json`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lm_human_preferences import distributed, label_types, labels, lm_tasks, pair_labels, reward_tracking
from lm_human_preferences.adapters import attach, save_model
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language import memory
from lm_human_preferences.logs import print0, progress
from lm_human_preferences.optim import TFAdam
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel, normalization_constants
from lm_human_preferences.reward_hparams import RewardTrainingHParams, TrainRewardHParams
from lm_human_preferences.runtime import Run, RunHParams
from lm_human_preferences.trainer import accumulate_and_step, run_training


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


def label_path(hp: RewardTrainingHParams, *, data_dir: str) -> Path:
    """The label file `labels.source` names (downloaded once, cached)."""
    if not hp.labels.source:
        raise HParamsError("no label file; pass --labels.source=PATH_OR_URL", key="labels.source")
    return labels.resolve_label_source(hp.labels.source, cache_dir=Path(data_dir) / "labels")


def load_label_rows(hp: RewardTrainingHParams, task: lm_tasks.TaskHParams, *, encoding,
                    data_dir: str) -> tuple[label_types.LabelType, list[dict]]:
    """Resolve, download (once, cached) and validate the label file; a preference-pair file is
    rendered with `labels.template` and tokenized (`pair_labels`)."""
    label_type = label_types.get_label_type(hp.labels.type)
    path = label_path(hp, data_dir=data_dir)
    rows = pair_labels.read_label_rows(path, label_type=label_type, template=hp.labels.template,
                                       query_length=task.query_length, response_length=task.response_length,
                                       encoding=encoding)
    if len(rows) < hp.labels.num_train:
        raise labels.LabelFileError(f"{path}: {len(rows)} labels, but labels.num_train={hp.labels.num_train}")
    return label_type, rows


class RewardTrainer:
    """Trains `reward_model` on label rows; `policy` is the fixed initial policy for normalization."""

    def __init__(self, *, run: Run, hp: RewardTrainingHParams, task: lm_tasks.TaskHParams, encoding,
                 reward_model: RewardModel, policy: Policy, label_type, rows: list[dict],
                 uids: list[str] | None = None):
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
        self.uids = uids  # each label row's name in pair_scores.jsonl (labels.log_pair_scores)
        self.best = reward_tracking.BestModel() if hp.select_best else None
        self.visits: list | None = None  # the rewards of this step's pairs, with labels.log_pair_scores

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
        run under autocast. A list in `self.visits` gets the pairs' rewards (`reward_tracking.recording`)."""
        visits = self.visits
        def loss_of(m: int) -> dict[str, torch.Tensor]:
            idx = indices[m * self.micro:(m + 1) * self.micro]
            batch = {k: v[idx] for k, v in self.train_labels.items()}
            reward_fn = self.reward_fn(self.ddp_model)
            if visits is not None:
                reward_fn = reward_tracking.recording(reward_fn, visits)
            return self.label_type.loss(reward_fn, batch)

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
        best = f" (the best held-out accuracy: step {final['best/step']})" if "best/step" in final else ""
        return (f"reward model saved to {self.run.save_dir}{best} "
                + " ".join(f"{k}={v:.4f}" for k, v in final.items() if k.startswith(("eval/", "best/eval/"))))

    def state_dict(self) -> dict:
        state = {"step": self.step, "normalized_before": self.normalized_before,
                 "model": self.reward_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "queries": self.queries.state_dict(), **self.run.guard_state()}
        if self.best is not None:
            state["best"] = self.best.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.run.load_guard_state(state)
        self.normalized_before = state["normalized_before"]
        self.reward_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.queries.load_state_dict(state["queries"])
        if self.best is not None:
            self.best.load_state_dict(state["best"])

    def train(self, logger) -> dict[str, float]:
        hp = self.hp
        n_steps = hp.labels.num_train // hp.batch_size * hp.epochs
        target_mean, target_std = self.label_type.target_stats(self.train_labels)
        if hp.normalize_before and hp.normalize_samples and not self.normalized_before:
            norm = self.normalize(target_mean=target_mean, target_std=target_std, step_seed=0)
            logger.log(0, {f"normalize/before/{k}": v for k, v in norm.items()})
            self.normalized_before = True
        pair_log = (reward_tracking.PairScoreLog(self.run.save_dir / reward_tracking.PAIR_SCORES_FILE, uids=self.uids,
                                                 resume_step=self.step, enabled=self.run.is_main)
                    if hp.labels.log_pair_scores else None)
        try:
            last = self.train_steps(logger, n_steps, pair_log)
        finally:
            if pair_log is not None:
                pair_log.close()
        final = dict(last)  # the last step's statistics, with the evaluation: one row
        final.update(self.evaluate_and_offer(n_steps))
        if self.best is not None:  # the saved model is the best evaluation's
            if self.best.step != n_steps:
                self.best.restore(self.reward_model)
            final.update(self.best.summary())
        if hp.normalize_after and hp.normalize_samples:
            norm = self.normalize(target_mean=0.0, target_std=1.0, step_seed=1)
            final.update({f"normalize/after/{k}": v for k, v in norm.items()})
        logger.log(n_steps, final)
        return final

    def train_steps(self, logger, n_steps: int, pair_log) -> dict[str, float]:
        """The steps left of `n_steps` (epoch after epoch, each in its own permutation), with the
        evaluations due before the last; the last step's statistics."""
        hp, run = self.hp, self.run
        per_epoch = hp.labels.num_train // hp.batch_size
        perm, perm_epoch = None, None
        with progress(total=n_steps, desc="train_reward", enabled=run.is_main, unit="step") as bar:
            bar.update(self.step)
            last: dict[str, float] = {}
            while self.step < n_steps:
                epoch, start = self.step // per_epoch, self.step % per_epoch * hp.batch_size
                if epoch != perm_epoch:  # epoch 0's is the original's one permutation
                    perm = torch.randperm(hp.labels.num_train, generator=run.generator("shuffle", epoch, shared=True))
                    perm_epoch = epoch
                ours = perm[start:start + hp.batch_size][run.rank::run.world_size]
                lr = hp.lr * (1 - self.step * hp.batch_size / (hp.labels.num_train * hp.epochs))
                self.visits = [] if pair_log is not None else None
                stats = distributed.all_reduce_stats(self.train_step(ours, lr) or {}, device=run.device)
                stats["lr"] = lr
                self.step += 1
                if pair_log is not None:
                    pair_log.write(epoch=epoch, step=self.step, indices=ours, rewards=torch.cat(self.visits))
                bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if k != "lr"}, refresh=False)
                bar.update(1)
                skipped = {"run/skipped_batches": run.skipped_batches} if run.hp.skip_nonfinite else {}
                last = {**{f"train/{k}": v for k, v in stats.items()}, **skipped}
                if self.step < n_steps:  # the last step: logged by `train`, with the final evaluation
                    row = dict(last) if self.step % run.hp.log_interval == 0 else {}
                    if self.step % per_epoch == 0 or (hp.eval_interval and self.step % hp.eval_interval == 0):
                        row.update(self.evaluate_and_offer(self.step))
                    if row:
                        logger.log(self.step, row)
                run.step_boundary(self.step, n_steps, self.state_dict)
        return last

    def evaluate_and_offer(self, step: int) -> dict[str, float]:
        """`evaluate`, the result offered to the best-model selection (`select_best`)."""
        stats = self.evaluate()
        if self.best is not None:
            self.best.offer(step, stats, self.reward_model)
        return stats


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
    if hp.select_best and (len(rows) == hp.labels.num_train or isinstance(label_type, label_types.ScalarRating)):
        raise HParamsError("selects the model by held-out accuracy: needs labels after labels.num_train="
                           f"{hp.labels.num_train} (the file has {len(rows)}) and a label type with an accuracy "
                           f"(not scalar_rating)", key="select_best")
    uids = (pair_labels.row_uids(label_path(hp, data_dir=hp.run.data_dir), len(rows))
            if hp.labels.log_pair_scores else None)
    return RewardTrainer(run=run, hp=hp, task=hp.task, encoding=initial.encoding, policy=Policy(initial.gpt),
                         reward_model=build_reward_model(initial, seed=hp.run.seed, lora_hp=hp.lora),
                         label_type=label_type, rows=rows, uids=uids)


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
