"""The options of train_reward (`TrainRewardHParams`), and of a reward model trained first by
train_policy (`RewardTrainingHParams`, its `rewards.train_new_model` section): the label file,
batches, learning rate, epochs, held-out evaluation and best-model selection, normalization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lm_human_preferences import label_types, lm_tasks, pair_labels, templates
from lm_human_preferences.adapters import LoRAHParams
from lm_human_preferences.hparams import HParams, HParamsError, check_count, check_number
from lm_human_preferences.runtime import RunHParams


MAX_RESPONSES = 1024  # responses a label compares (the paper's: 4); more is no labeling task


@dataclass
class LabelHParams(HParams):
    type: str = "best_of_4"  # best_of_N (N >= 2), scalar_rating, scalar_compare, preference or soft_preference
    num_train: int = 4992  # labels trained on (each epoch); the rest of the file is held out
    source: str = ""  # a label or preference-pair file (path or URL); empty: the original's file for the task
    # How a pair file's prompt and response become query and response text (templates.py; auto: the format's own)
    template: str = "plain"
    # Pairwise types: each pair's rewards at each training visit, into <run>/pair_scores.jsonl
    # ({"epoch", "step", "uid", "r_chosen", "r_rejected"}; uid: the pair's meta.uid, else its row index)
    log_pair_scores: bool = False

    def _validate(self):
        try:
            label_type = label_types.get_label_type(self.type)
        except ValueError as e:
            raise HParamsError(str(e), key="type") from None
        if label_type.num_responses > MAX_RESPONSES:
            raise HParamsError(f"at most {MAX_RESPONSES} responses per label", key="type")
        check_count(self, "num_train")
        if self.template not in (*templates.TEMPLATES, pair_labels.AUTO):
            raise HParamsError(f"unknown template {self.template!r}; expected one of {', '.join(templates.TEMPLATES)} "
                               f"or {pair_labels.AUTO}", key="template")
        if self.log_pair_scores and not isinstance(label_type, label_types.Pairwise):
            raise HParamsError(f"logs the rewards of pairs: needs --labels.type=preference or soft_preference, not "
                               f"{self.type}", key="log_pair_scores")


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
    epochs: int = 1  # passes over the training labels, each in its own order; lr anneals to 0 over all of them
    eval_interval: int = 0  # steps between held-out evaluations (besides each epoch's end); 0: epoch ends only
    # Save the model of the evaluation with the best held-out accuracy (off: the final model)
    select_best: bool = False
    lora: Optional[LoRAHParams] = None  # train low-rank adapters and the head only (adapters.py)

    def _validate(self):
        for key in ("batch_size", "rollout_batch_size", "eval_batch_size", "epochs"):
            check_count(self, key)
        check_count(self, "eval_interval", at_least=0)
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
