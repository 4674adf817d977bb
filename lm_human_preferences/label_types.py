"""Label types: what a labeler is shown, what it answers, and the reward-model loss for it.

A label type fixes the fields of one label row (`label_schema`) and turns a batch of rows into
a reward-model loss (`loss`). The reward model is passed in as a plain function

    reward_fn(queries, responses) -> rewards    # (B, Lq) long, (B, Lr) long -> (B,) float32

so label types know nothing about transformers, devices or checkpoints.

Schema kinds: "tokens" (a 1-D list of token ids, pad allowed), "int" (a scalar index of one
of the responses, in `[0, num_responses)`), "float" (a finite scalar), "probability" (a number
in [0, 1]).

The pairwise losses are also plain functions of reward tensors (`bradley_terry_loss`,
`soft_label_loss`, `pairwise_accuracy`), for trainers that score pairs their own way.
"""

import abc
import dataclasses
import re
from typing import Callable

import torch
import torch.nn.functional as F

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Schema = dict[str, tuple[str, tuple[int, ...]]]


class LabelType(abc.ABC):
    """A labeler's question (`query` + response fields) and answer (target fields)."""

    target_mean: float = 0.0  # reward normalization targets (docs/original.md §5)
    target_std: float = 1.0

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The name `get_label_type` accepts, e.g. "best_of_4"."""

    @property
    @abc.abstractmethod
    def response_fields(self) -> tuple[str, ...]:
        """Names of the response fields, in order; `num_responses` of them."""

    @property
    @abc.abstractmethod
    def target_fields(self) -> dict[str, str]:
        """The labeler's answer: field name -> kind ("int" or "float")."""

    @abc.abstractmethod
    def loss(self, reward_fn: RewardFn, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reward-model loss on a batch of labels: {'loss': scalar, differentiable, **stats}."""

    @property
    def num_responses(self) -> int:
        return len(self.response_fields)

    @property
    def field_kinds(self) -> dict[str, str]:
        """Every field of a label row -> its kind, in file order."""
        return {"query": "tokens", **{f: "tokens" for f in self.response_fields}, **self.target_fields}

    def label_schema(self, *, query_length: int, response_length: int) -> Schema:
        """Every field of a label row -> (kind, shape)."""
        shapes = {"query": (query_length,), **{f: (response_length,) for f in self.response_fields}}
        return {f: (kind, shapes.get(f, ())) for f, kind in self.field_kinds.items()}

    def target_stats(self, labels: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Mean and std the normalized reward should have before training (docs/original.md §5)."""
        return self.target_mean, self.target_std

    def int_range(self, field: str) -> tuple[int, int]:
        """Valid half-open range of an "int" target field: an index into the responses."""
        return 0, self.num_responses

    def _rewards(self, reward_fn: RewardFn, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """r(query, response_i) for every response field in ONE reward_fn call -> (B, n)."""
        queries = labels["query"]  # (B, Lq)
        responses = torch.stack([labels[f] for f in self.response_fields])  # (n, B, Lr)
        n, batch, response_length = responses.shape
        rewards = reward_fn(queries.repeat(n, 1), responses.reshape(n * batch, response_length))  # (n*B,)
        if rewards.shape != (n * batch,):
            raise ValueError(f"reward_fn must return shape ({n * batch},), got {tuple(rewards.shape)}")
        return rewards.float().reshape(n, batch).t()  # (B, n)


@dataclasses.dataclass(frozen=True)
class BestOfN(LabelType):
    """The labeler sees n responses and picks the best one (the paper's best_of_4)."""

    n: int

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 2:
            raise ValueError(f"BestOfN needs an integer n >= 2, got {self.n!r}")

    @property
    def name(self) -> str:
        return f"best_of_{self.n}"

    @property
    def response_fields(self) -> tuple[str, ...]:
        return tuple(f"sample{i}" for i in range(self.n))

    @property
    def num_responses(self) -> int:  # without building n field names
        return self.n

    @property
    def target_fields(self) -> dict[str, str]:
        return {"best": "int"}

    def loss(self, reward_fn, labels):
        logits = self._rewards(reward_fn, labels)  # (B, n)
        best = labels["best"].long()  # (B,)
        loss = F.cross_entropy(logits, best)
        accuracy = (logits.argmax(dim=-1) == best).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}


@dataclasses.dataclass(frozen=True)
class ScalarRating(LabelType):
    """The labeler scores one response; the reward regresses onto the score."""

    @property
    def name(self) -> str:
        return "scalar_rating"

    @property
    def response_fields(self) -> tuple[str, ...]:
        return ("sample",)

    @property
    def target_fields(self) -> dict[str, str]:
        return {"score": "float"}

    def target_stats(self, labels):
        """As the original: the scale of the labelers' own scores."""
        scores = labels["score"].double()
        return float(scores.mean()), float(scores.std(unbiased=False))

    def loss(self, reward_fn, labels):
        rewards = self._rewards(reward_fn, labels)[:, 0]  # (B,)
        return {"loss": F.mse_loss(rewards, labels["score"].float())}


@dataclasses.dataclass(frozen=True)
class ScalarCompare(LabelType):
    """The labeler says how much better sample1 is than sample0; r1 - r0 regresses onto it."""

    @property
    def name(self) -> str:
        return "scalar_compare"

    @property
    def response_fields(self) -> tuple[str, ...]:
        return ("sample0", "sample1")

    @property
    def target_fields(self) -> dict[str, str]:
        return {"difference": "float"}

    def loss(self, reward_fn, labels):
        rewards = self._rewards(reward_fn, labels)  # (B, 2)
        predicted = rewards[:, 1] - rewards[:, 0]  # (B,)
        difference = labels["difference"].float()  # (B,)
        agreement = (torch.sign(predicted) == torch.sign(difference)).float().mean()
        return {"loss": F.mse_loss(predicted, difference), "accuracy": agreement.detach()}


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry loss: mean over pairs of -log σ(r_c - r_r); (B,), (B,) -> () fp32."""
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()


def soft_label_loss(rewards_1: torch.Tensor, rewards_2: torch.Tensor, win2_prob: torch.Tensor) -> torch.Tensor:
    """Soft-label loss: binary cross-entropy with logits r_2 - r_1 and target `win2_prob`, the
    probability that response 2 wins (RLCD's and AlpacaFarm's orientation), averaged over pairs:
    mean(-(p log σ(r_2 - r_1) + (1 - p) log σ(r_1 - r_2))). With p = 1 it is the Bradley–Terry
    loss of response 2 as the chosen one; (B,), (B,), (B,) -> () fp32."""
    return F.binary_cross_entropy_with_logits(rewards_2.float() - rewards_1.float(), win2_prob.float())


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Share of pairs with r_c > r_r, strictly: a tie counts as wrong; (B,), (B,) -> () fp32."""
    return (chosen_rewards > rejected_rewards).float().mean()


@dataclasses.dataclass(frozen=True)
class Pairwise(LabelType):
    """Label type "preference": the labeler prefers `chosen` to `rejected`; the loss is
    Bradley–Terry's, -log σ(r_c - r_r)."""

    @property
    def name(self) -> str:
        return "preference"

    @property
    def response_fields(self) -> tuple[str, ...]:
        return ("chosen", "rejected")

    @property
    def target_fields(self) -> dict[str, str]:
        return {}

    def loss(self, reward_fn, labels):
        rewards = self._rewards(reward_fn, labels)  # (B, 2)
        chosen, rejected = rewards[:, 0], rewards[:, 1]  # (B,), (B,)
        return {"loss": bradley_terry_loss(chosen, rejected),
                "accuracy": pairwise_accuracy(chosen, rejected).detach()}


@dataclasses.dataclass(frozen=True)
class SoftPairwise(Pairwise):
    """Label type "soft_preference": `chosen_prob`, the probability that `chosen` wins. The loss is
    `soft_label_loss` with rejected as response 1, chosen as response 2 and win2_prob =
    chosen_prob; accuracy is still the share of pairs with r_c > r_r."""

    @property
    def name(self) -> str:
        return "soft_preference"

    @property
    def target_fields(self) -> dict[str, str]:
        return {"chosen_prob": "probability"}

    def loss(self, reward_fn, labels):
        rewards = self._rewards(reward_fn, labels)  # (B, 2)
        chosen, rejected = rewards[:, 0], rewards[:, 1]  # (B,), (B,)
        return {"loss": soft_label_loss(rejected, chosen, labels["chosen_prob"]),
                "accuracy": pairwise_accuracy(chosen, rejected).detach()}


def get_label_type(name: str) -> LabelType:
    """The label type named `name`: best_of_N (any integer N >= 2), scalar_rating, scalar_compare,
    preference (`Pairwise`) or soft_preference (`SoftPairwise`)."""
    match = re.fullmatch(r"best_of_([1-9][0-9]*)", name)
    if match and int(match.group(1)) >= 2:
        return BestOfN(int(match.group(1)))
    named = {"scalar_rating": ScalarRating, "scalar_compare": ScalarCompare, "preference": Pairwise,
             "soft_preference": SoftPairwise}
    if name in named:
        return named[name]()
    raise ValueError(
        f"unknown label type {name!r}; valid: 'best_of_N' for an integer N >= 2 "
        "(e.g. 'best_of_4'), 'scalar_rating', 'scalar_compare', 'preference', 'soft_preference'"
    )
