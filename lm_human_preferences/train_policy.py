"""PPO against a reward model with a KL penalty (the original's `train_policy.py`), docs/original.md §4, §6.

    python launch.py train_policy sentiment my_policy --rewards.trained_model=runs/my_rm

One update (`PPOTrainer.step`) reads as the paper's steps, numbered in its code: 1. sample
responses to this rank's queries, 2. analyze them with the policy and the frozen reference
policy, 3. score them (`scoring.make_score_fn`), 4. KL-penalised rewards (`rollouts`: score →
truncation penalty → shaping → score whitening → KL penalty), 5. train `noptepochs` epochs of
minibatches (whitened rewards, GAE, whitened advantages; micro-batches accumulate), 6. statistics
averaged over ranks, 7. the KL controller moves β. Its options are `policy_hparams`'; those past
the original's (a KL estimator, the KL as a loss term, shaping, score whitening, responses that
stop at EOS or a stop text, masked out of everything after the stop) default to the original.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch

from lm_human_preferences import distributed, lm_tasks, plugins, ppo, rollouts, scoring, shaping, train_reward
from lm_human_preferences.adapters import attach, save_model
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language import memory
from lm_human_preferences.logs import print0, progress, summary_line
from lm_human_preferences.optim import TFAdam
from lm_human_preferences.policy import Analysis, Policy
from lm_human_preferences.rewards import load_reward_model
from lm_human_preferences.policy_hparams import TrainPolicyHParams
from lm_human_preferences.runtime import Run
from lm_human_preferences.trainer import accumulate_and_step, run_training

ScoreFn, StatsFn = scoring.ScoreFn, scoring.StatsFn  # what `train` takes in place of a reward model


def check_memory(hp: TrainPolicyHParams, model: lm_tasks.PretrainedModel, run: Run) -> None:
    """Before anything runs: a rank's sampling batch and training micro-batch must be able to fit
    in memory (lower bounds, see `language.memory`)."""
    config, tokens = model.gpt.config, lm_tasks.context_length(hp.task, model.encoding)
    value_bytes = 2 if run.bf16 else 4
    per_rank = run.per_rank(hp.ppo.batch_size, "ppo.batch_size")
    minibatch = per_rank // hp.ppo.nminibatches
    micro = min(hp.ppo.micro_batch_size or minibatch, minibatch)
    lm_tasks.check_memory(run.device, [
        ("ppo.batch_size", memory.kv_cache_bytes(config, rows=per_rank, tokens=tokens, value_bytes=value_bytes),
         f"sampling {per_rank} responses at once (a rank's share of the batch)"),
        ("ppo.micro_batch_size" if hp.ppo.micro_batch_size else "ppo.batch_size",
         memory.training_bytes(config, rows=micro, tokens=tokens, value_bytes=value_bytes, logits=True),
         f"a training micro-batch of {micro} episodes (--ppo.micro_batch_size accumulates smaller ones)")])


class PPOTrainer:
    def __init__(self, *, run: Run, hp: TrainPolicyHParams, policy: Policy, ref_policy: Policy,
                 score_fn: scoring.ComposedScoreFn, encoding, queries):
        self.run, self.hp, self.encoding = run, hp, encoding
        self.policy = run.place(policy)
        self.ref_policy = run.place(ref_policy).eval().requires_grad_(False)
        self.score_fn = score_fn  # (queries, responses) -> (scores, postprocessed responses, stats), see scoring
        self.queries = queries
        self.ddp_policy = run.ddp(self.policy)
        self.optimizer = TFAdam(self.policy.parameters(), lr=hp.ppo.lr)
        a = hp.rewards.adaptive_kl
        self.kl_ctl = (ppo.AdaptiveKLController(hp.rewards.kl_coef, target=a.target, horizon=a.horizon) if a
                       else ppo.FixedKLController(hp.rewards.kl_coef))
        self.per_rank = run.per_rank(hp.ppo.batch_size, "ppo.batch_size")
        if self.per_rank % hp.ppo.nminibatches:
            raise HParamsError(f"per-rank batch {self.per_rank} is not divisible by {hp.ppo.nminibatches} minibatches",
                               key="ppo.nminibatches")
        self.minibatch = self.per_rank // hp.ppo.nminibatches
        self.micro = min(hp.ppo.micro_batch_size or self.minibatch, self.minibatch)
        if self.minibatch % self.micro:
            raise HParamsError(f"per-rank minibatch {self.minibatch} is not a multiple of {self.micro}",
                               key="ppo.micro_batch_size")
        # The original's ceil_div: a last partial batch is one more update (1M / 512 -> 1954).
        self.n_updates = -(-hp.ppo.total_episodes // hp.ppo.batch_size)
        self.update = 0
        self.pad = encoding.padding_token
        self.shaping = shaping.parse_shaping(hp.rewards.shaping) if hp.rewards.shaping else None

    # ---- rollout ------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The shuffled row order (per_rank,) of one optimisation epoch of the current update."""
        gen = self.run.generator("shuffle", self.update * 1000 + epoch)
        return torch.randperm(self.per_rank, generator=gen).to(self.run.device)

    @torch.no_grad()
    def analyze(self, policy: Policy, contexts, responses, order: torch.Tensor) -> Analysis:
        """Logprobs and values (no entropies), computed on the rows `order` in micro-batches of the training
        size and returned in the original row order. With `order` = the first epoch's order, the
        first minibatch's micro-batches are the very tensors training feeds the policy, so the first
        PPO ratio is exactly 1 whatever kernels a batch's composition selects (e.g. SDPA's causal
        kernel for pad-free batches, a masked one otherwise). Under `run.compile` the trained policy
        runs with gradients on (its outputs then detached), so that it takes the compiled graph
        training takes: on a GPU a compiled inference graph may round differently."""
        parts = []
        as_training = self.run.hp.compile and policy is self.policy
        for i in range(0, contexts.shape[0], self.micro):
            rows = order[i:i + self.micro]
            with torch.set_grad_enabled(as_training), self.run.autocast():
                out = policy(contexts[rows], responses[rows], temperature=self.hp.task.policy.temperature,
                             pad_token=self.pad, entropies=False)
            parts.append(out)
        inverse = torch.argsort(order)
        return Analysis(*(torch.cat([getattr(p, k).detach() for p in parts])[inverse] for k in ("logprobs", "values")),
                        entropies=None)

    @torch.no_grad()
    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's next queries (B, Lq), the policy's contexts for them (B, Tc) and its sampled
        responses (B, Lr)."""
        task = self.hp.task
        queries = next(self.queries).to(self.run.device)  # (B, Lq)
        contexts = lm_tasks.policy_contexts(queries, task=task, encoding=self.encoding)  # (B, Tc)
        # The sampling noise is drawn for the global batch from a generator every rank shares and sliced
        # to this rank's rows, so a query's response does not depend on the number of ranks.
        gen = self.run.generator("sample", self.update, shared=True)
        with self.run.autocast():
            responses = self.policy.respond(contexts, length=task.response_length, temperature=task.policy.temperature,
                                            pad_token=self.pad, generator=gen,
                                            shard=(self.run.rank, self.run.world_size))  # (B, Lr)
        return queries, contexts, responses

    # ---- training -----------------------------------------------------------------------
    def advantages(self, rewards: torch.Tensor, values: torch.Tensor, masked: dict):
        p = self.hp.ppo
        return ppo.advantages_and_returns(rewards, values, gamma=p.gamma, lam=p.lam, whiten_rewards=p.whiten_rewards,
                                          whiten_fn=rollouts.whiten_across_ranks if p.whiten_across_ranks else None,
                                          **masked)

    def train_minibatch(self, mb: dict[str, torch.Tensor], lr: float) -> dict[str, float] | None:
        """One optimizer step on a minibatch, in micro-batches; None if it was skipped (non-finite).
        The policy runs under autocast, the losses outside it (in fp32). With a response mask (in
        `mb`) every mean is over the kept tokens; with `ppo.kl_as=loss` the loss adds
        β·mean(KL estimate) of the current policy to the reference (`ppo/loss/kl`)."""
        p = self.hp.ppo
        advantages, returns = self.advantages(mb["rewards"], mb["values"], {"mask": mb["mask"]} if "mask" in mb else {})

        def losses_of(m: int) -> dict[str, torch.Tensor]:
            sl = slice(m * self.micro, (m + 1) * self.micro)
            masked = {"mask": mb["mask"][sl]} if "mask" in mb else {}
            with self.run.autocast():
                out = self.ddp_policy(mb["contexts"][sl], mb["responses"][sl],
                                      temperature=self.hp.task.policy.temperature, pad_token=self.pad)
            losses = ppo.ppo_losses(logprobs=out.logprobs, values=out.values, old_logprobs=mb["logprobs"][sl],
                                    old_values=mb["values"][sl], advantages=advantages[sl], returns=returns[sl],
                                    cliprange=p.cliprange, cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
                                    entropy=out.entropies, **masked)
            if p.kl_as == "loss":
                losses["ppo/loss/kl"] = ppo.kl_loss(out.logprobs, mb["ref_logprobs"][sl], kl_coef=self.kl_ctl.value,
                                                    estimator=p.kl_estimator, **masked)
                losses["ppo/loss/total"] = losses["ppo/loss/total"] + losses["ppo/loss/kl"]
            return losses

        return accumulate_and_step(self.run, model=self.ddp_policy, optimizer=self.optimizer, lr=lr,
                                   n_micro=self.minibatch // self.micro, loss_of=losses_of, step=self.update + 1,
                                   loss_key="ppo/loss/total", loss_name="ppo/loss/total")

    def train_epochs(self, data: dict[str, torch.Tensor], orders: list[torch.Tensor], lr: float) -> dict[str, float]:
        """`noptepochs` epochs over the batch (the original's `train`), each in its shuffled order
        of minibatches; the statistics averaged over the minibatches not skipped."""
        train_stats: dict[str, float] = {}
        n_mb = 0
        keys = ["contexts", "responses", "logprobs", "values", "rewards"]
        keys += ["mask"] * ("mask" in data) + ["ref_logprobs"] * (self.hp.ppo.kl_as == "loss")
        for order in orders:
            for start in range(0, self.per_rank, self.minibatch):
                idx = order[start:start + self.minibatch]
                mb = {k: data[k][idx] for k in keys}
                if (mb_stats := self.train_minibatch(mb, lr)) is None:
                    continue
                for k, v in mb_stats.items():
                    train_stats[k] = train_stats.get(k, 0.0) + v
                n_mb += 1
        return {k: v / n_mb for k, v in train_stats.items()}

    def omit_long(self, data: dict, stopped: torch.Tensor) -> dict:
        """With --rewards.omit_long, the rollout with the responses that lack the truncation token
        replaced by terminated ones (`rollouts.omit_long`, the length-bias paper's "omit long")."""
        if self.hp.rewards.omit_long == "off":
            return data
        task = self.hp.task
        terminated = lm_tasks.response_has_truncation(stopped, truncate_token=task.truncate_token,
                                                      truncate_after=task.truncate_after)  # (B,)
        return rollouts.omit_long(data, terminated, variant=self.hp.rewards.omit_long,
                                  generator=self.run.generator("omit_long", self.update))

    def step(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """One PPO update (the original's `PPOTrainer.step`); returns the all-reduced stats and the rollout."""
        t0 = time.time()
        p = self.hp.ppo
        # Every epoch's shuffled order is drawn first: step 2 runs on the micro-batches of the first.
        orders = [self.epoch_order(epoch) for epoch in range(p.noptepochs)]
        with torch.no_grad():
            # 1. sample: this rank's queries (`sample_queries`) and the policy's responses (`policy.respond`).
            queries, contexts, responses = self.sample()
            # 2. analyze: logprobs and values of the policy (the original's come with `respond`) and logprobs
            #    of the reference policy (`ref_policy.analyze_responses`), in the micro-batches of the first
            #    epoch, so that the first ratio is exactly 1 (see `analyze`).
            cur = self.analyze(self.policy, contexts, responses, orders[0])
            ref = self.analyze(self.ref_policy, contexts, responses, orders[0])
            # 3. score (`score_fn`): truncate the responses, score them, penalise those not truncated.
            #    A response that stops (EOS, stop text) is scored as it stops, with pads after.
            mask = lm_tasks.response_mask(responses, task=self.hp.task, encoding=self.encoding)  # (B, Lr) or None
            stopped = responses if mask is None else responses.masked_fill(~mask, self.pad)
            scores, postprocessed_responses, score_stats = self.score_fn(queries, stopped)  # (B,), (B, Lr)
        data = dict(queries=queries, contexts=contexts, responses=responses,
                    postprocessed_responses=postprocessed_responses, logprobs=cur.logprobs, values=cur.values,
                    ref_logprobs=ref.logprobs, scores=scores, score_stats=score_stats)
        if mask is not None:
            data["mask"] = mask
        data = self.omit_long(data, stopped)
        # 4. rewards (`compute_rewards`): the score (shaped, whitened: `rollouts.shape_scores`) on the last
        #    token, and -kl_coef * (logprobs - ref_logprobs) per token (the KL estimate chosen; none as a loss).
        if self.shaping is not None or p.whiten_scores != "off":
            shaped = rollouts.shape_scores(data["scores"], data["postprocessed_responses"], shaping=self.shaping,
                                           whiten=p.whiten_scores, pad_token=self.pad)
            data["shaped_scores"] = shaped
        kl_coef = self.kl_ctl.value
        data["rewards"], non_score_reward, kl = rollouts.rewards_of(
            data["logprobs"], data["ref_logprobs"], data.get("shaped_scores", data["scores"]), kl_coef=kl_coef,
            estimator=p.kl_estimator, kl_as=p.kl_as, mask=data.get("mask"))
        t_rollout = time.time() - t0
        # 5. train: `noptepochs` epochs of minibatches at the linearly annealed learning rate.
        lr = ppo.linear_lr(p.lr, step=self.update, total_steps=self.n_updates)
        stats = self.train_epochs(data, orders, lr)
        # 6. stats (`record_step_stats`): the training and rollout statistics, averaged over ranks.
        stats.update(rollouts.rollout_stats(data, non_score_reward=non_score_reward, kl=kl, kl_coef=kl_coef))
        stats.update({"ppo/lr": lr, "time/rollout": t_rollout})
        stats.update(data["score_stats"])
        stats = distributed.all_reduce_stats(stats, device=self.run.device)
        if "ppo/val/error" in stats:  # as the original: from the averages over minibatches and ranks
            stats["ppo/val/var_explained"] = ppo.var_explained(stats["ppo/val/error"], stats["ppo/returns/var"])
        if self.run.hp.skip_nonfinite:
            stats["run/skipped_batches"] = self.run.skipped_batches
        # 7. the KL controller (`kl_ctl.update`) moves β with the all-reduced KL, on every rank alike.
        self.kl_ctl.update(stats["objective/kl"], p.batch_size)
        if not math.isfinite(self.kl_ctl.value):
            raise self.run.nonfinite_error(self.update + 1, f"the KL coefficient β became {self.kl_ctl.value}")
        elapsed = time.time() - t0
        stats["elapsed/fps"] = p.batch_size * self.hp.task.response_length / elapsed
        stats["elapsed/episodes_per_s"] = p.batch_size / elapsed
        self.update += 1
        return stats, data

    # ---- the run (see trainer.run_training) ----------------------------------------------
    checkpoints = True

    @property
    def steps_done(self) -> int:
        return self.update

    @property
    def model(self) -> Policy:
        return self.policy

    def save(self, save_dir: Path) -> None:
        save_model(save_dir, gpt=self.policy.gpt, heads=self.policy.head_state(), lora_hp=self.hp.lora,
                   meta={"kind": "policy", "encoding": self.encoding.to_meta()}, base=self.hp.task.policy.initial_model)

    def saved(self, final: dict[str, float]) -> str:
        return f"policy saved to {self.run.save_dir}"

    def state_dict(self) -> dict:
        state = {"update": self.update, "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "kl_ctl": self.kl_ctl.state_dict(), "queries": self.queries.state_dict(), **self.run.guard_state()}
        if self.shaping is not None:  # a stateful shaping (running statistics) resumes where it was
            state["shaping"] = self.shaping.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.update = state["update"]
        self.run.load_guard_state(state)
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.queries.load_state_dict(state["queries"])
        if self.shaping is not None:
            self.shaping.load_state_dict(state.get("shaping", {}))

    def sample_rows(self, data, n: int) -> list[dict]:
        """samples.jsonl rows: query and (truncated) response as text to read (no special tokens),
        the score, and the token ids the texts come from (padding included)."""
        dec = self.encoding.decode
        queries, shown, scores = (data[k][:n].tolist() for k in ("queries", "postprocessed_responses", "scores"))
        return [{"query": dec(q, skip_special=True), "response": dec(r, skip_special=True), "score": float(s),
                 "query_tokens": q, "response_tokens": r} for q, r, s in zip(queries, shown, scores)]

    def train(self, logger) -> dict[str, float]:
        run = self.run
        with progress(total=self.n_updates, desc="train_policy", enabled=run.is_main, unit="update") as bar:
            bar.update(self.update)
            stats: dict[str, float] = {}
            while self.update < self.n_updates:
                stats, data = self.step()
                bar.set_postfix({"score": f"{stats['objective/score']:.3f}", "kl": f"{stats['objective/kl']:.2f}",
                                 "eps/s": f"{stats['elapsed/episodes_per_s']:.1f}"}, refresh=False)
                bar.update(1)
                if self.update % run.hp.log_interval == 0 or self.update == self.n_updates:
                    logger.log(self.update, stats)
                    logger.log_samples(self.update, self.sample_rows(data, self.hp.num_logged_samples))
                run.step_boundary(self.update, self.n_updates, self.state_dict)
        if stats:
            print0(summary_line(self.update, stats, ["objective/score", "objective/kl", "objective/kl_coef"]))
        return stats


def build_trainer(hp: TrainPolicyHParams, run: Run, *, exp_name: str, score_fn: ScoreFn | None,
                  extra_stats: StatsFn | None) -> PPOTrainer:
    """Check the inputs, load the initial policy and the scorer (the reward model, trained first
    with `rewards.train_new_model`), and make the trainer."""
    r = hp.rewards
    if score_fn is None and [bool(r.trained_model), r.train_new_model is not None, bool(r.function)].count(True) != 1:
        raise HParamsError("give exactly one of --rewards.trained_model=DIR, --rewards.train_new_model=on and "
                           "--rewards.function=MODULE:FUNCTION", key="rewards.trained_model")
    initial = lm_tasks.load_pretrained(hp.task.policy.initial_model)
    lm_tasks.check_task_fits(hp.task, initial)
    check_memory(hp, initial, run)
    encoding = initial.encoding
    if score_fn is None and r.function:
        score_fn = plugins.text_score_fn(r.function, key="rewards.function", encoding=encoding)
    elif score_fn is None:
        rm_dir = r.trained_model or train_reward.train_new_model(r.train_new_model, run=hp.run, task=hp.task,
                                                                 save_dir=run.save_dir, exp_name=exp_name)
        reward_model = run.place(load_reward_model(rm_dir, encoding=encoding)).eval().requires_grad_(False)
        score_fn = scoring.reward_model_scorer(reward_model, pad_token=encoding.padding_token, autocast=run.autocast)
    queries = lm_tasks.query_dataset(hp.task, encoding=encoding, data_dir=hp.run.data_dir,
                                     batch_size=run.per_rank(hp.ppo.batch_size, "ppo.batch_size"),
                                     rank=run.rank, world_size=run.world_size, seed=hp.run.seed)
    return PPOTrainer(run=run, hp=hp, policy=Policy(attach(copy.deepcopy(initial.gpt), hp.lora, seed=hp.run.seed)),
                      ref_policy=Policy(initial.gpt), encoding=encoding, queries=queries,
                      score_fn=scoring.make_score_fn(task=hp.task, pad_token=encoding.padding_token, scorer=score_fn,
                                                     stats_fn=extra_stats))


def train(hp: TrainPolicyHParams, *, exp_name: str, score_fn: ScoreFn | None = None,
          extra_stats: StatsFn | None = None) -> Path:
    """Train a policy. `score_fn` replaces the reward model (scripted rewards, reward shaping);
    `extra_stats` adds statistics of each rollout to the metrics (all-reduced like the rest)."""
    return run_training(hp, exp_name=exp_name,
                        build=lambda run: build_trainer(hp, run, exp_name=exp_name, score_fn=score_fn,
                                                      extra_stats=extra_stats))
