"""The options of train_policy (`TrainPolicyHParams`): how it runs, the task, the reward (reward
model or function, shaping, KL penalty) and PPO's optimisation. `train_policy` trains with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from lm_human_preferences import lm_tasks, plugins, shaping
from lm_human_preferences.adapters import LoRAHParams
from lm_human_preferences.hparams import HParams, HParamsError, check_count, check_number
from lm_human_preferences.runtime import RunHParams
from lm_human_preferences.reward_hparams import RewardTrainingHParams


@dataclass
class AdaptiveKLParams(HParams):
    target: float = 6.0  # the KL to the initial policy (nats per response) that β steers toward
    horizon: int = 10000  # episodes over which β closes the gap to the target

    def _validate(self):
        check_count(self, "horizon")
        check_number(self, "target", above=0)


@dataclass
class RewardsHParams(HParams):
    kl_coef: float = 0.2  # β, the weight of the KL penalty in the reward (its start under adaptive_kl)
    adaptive_kl: Optional[AdaptiveKLParams] = None  # adapt β toward a target KL (off: β stays kl_coef)
    trained_model: Optional[str] = None  # a reward model directory (train_reward output)
    train_new_model: Optional[RewardTrainingHParams] = None  # train one first, into <run>/reward_model
    function: Optional[str] = None  # or MODULE:FUNCTION, fn(queries, responses) -> scores on texts (plugins.py)
    # Shaping of the scores after the truncation penalty, before the KL penalty (shaping.parse_shaping syntax,
    # e.g. "length_penalty=0.01,clip=-3:3"; empty: none)
    shaping: str = ""
    # off, released or corrected: replace each response without the truncation token by a terminated one of the
    # batch, with its own score (corrected) or the long one's (released, the length-bias paper's code)
    omit_long: str = "off"

    def _validate(self):
        check_number(self, "kl_coef", at_least=0)
        if self.omit_long not in ("off", "released", "corrected"):
            raise HParamsError(f"expected off, released or corrected, got {self.omit_long!r}", key="omit_long")
        if self.function is not None:
            plugins.load_function(self.function, key="function")
        try:
            shaping.parse_shaping(self.shaping)
        except ValueError as e:
            raise HParamsError(str(e), key="shaping") from None


@dataclass
class PPOHParams(HParams):
    total_episodes: int = 2_000_000  # episodes (queries answered) over the whole run
    batch_size: int = 64  # episodes per update, across all ranks
    nminibatches: int = 1  # minibatches each batch is split into, per epoch
    noptepochs: int = 4  # optimisation epochs over each batch
    micro_batch_size: Optional[int] = None  # per rank; gradient accumulation when smaller
    lr: float = 5e-6  # Adam learning rate, annealed linearly to 0
    vf_coef: float = 0.1  # weight of the value loss
    cliprange: float = 0.2  # clip range of the policy ratio
    cliprange_value: float = 0.2  # clip range of the value prediction around its rollout value
    gamma: float = 1.0  # discount factor
    lam: float = 0.95  # GAE λ
    whiten_rewards: bool = True  # whiten each batch's rewards (scale only) before GAE
    # Whitening statistics over the minibatch of every rank together (the original: each rank alone).
    whiten_across_ranks: bool = False
    # Whiten the scores over the batch of every rank before the KL penalty: shift (to mean 0, std 1),
    # no_shift (std 1, the mean kept; AlpacaFarm's) or off (the original)
    whiten_scores: Literal["off", "shift", "no_shift"] = "off"
    # The per-token KL estimate (kl.kl_estimate) penalised, controlled and logged; k1: the original's
    kl_estimator: Literal["k1", "k2", "k3", "k1_clamped"] = "k1"
    # The KL as a per-token penalty in the rewards (the original) or as a loss term β·mean(KL) beside PPO's
    kl_as: Literal["penalty", "loss"] = "penalty"

    def _validate(self):
        for key in ("total_episodes", "batch_size", "nminibatches", "noptepochs"):
            check_count(self, key)
        if self.total_episodes < self.batch_size:
            raise HParamsError(f"fewer episodes than one batch ({self.batch_size})", key="total_episodes")
        if self.batch_size % self.nminibatches:
            raise HParamsError(f"batch_size={self.batch_size} is not divisible by nminibatches={self.nminibatches}",
                               key="nminibatches")
        if self.micro_batch_size is not None:  # None: no gradient accumulation
            check_count(self, "micro_batch_size")
        check_number(self, "lr", above=0)
        for key in ("vf_coef", "cliprange", "cliprange_value"):
            check_number(self, key, at_least=0)
        for key in ("gamma", "lam"):
            check_number(self, key, at_least=0, at_most=1)


@dataclass
class TrainPolicyHParams(HParams):
    run: RunHParams = field(default_factory=RunHParams)  # how it runs: device, precision, seed, outputs, checkpoints
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)  # queries, responses, initial policy
    rewards: RewardsHParams = field(default_factory=RewardsHParams)  # the reward: reward model and KL penalty
    ppo: PPOHParams = field(default_factory=PPOHParams)  # PPO optimisation
    num_logged_samples: int = 4  # samples.jsonl rows per logged update
    lora: Optional[LoRAHParams] = None  # train low-rank adapters and the value head only (adapters.py)

    def _validate(self):
        check_count(self, "num_logged_samples", at_least=0)
        if self.rewards.omit_long != "off" and self.task.truncate_token is None:
            raise HParamsError("omit_long replaces the responses without the truncation token; set "
                               "--task.truncate_token", key="rewards.omit_long")
