"""The score seam (the original's `make_score_fn`): what a batch of responses is worth.

    score = make_score_fn(task=hp.task, pad_token=enc.padding_token,
                          scorer=reward_model_scorer(reward_model, pad_token=..., autocast=run.autocast))
    scores, postprocessed_responses, stats = score(queries, responses)

1. postprocess: each response is truncated after the task's truncation token (later tokens
   become pads), as the original shows responses to its reward model and to its labelers;
2. score the postprocessed responses: a reward model (`reward_model_scorer`), a scripted
   labeler (`labeler_scorer`), or a function of the user's (`plugins.text_score_fn`);
3. penalty: a response without the truncation token gets `task.penalty_reward_value`.
`stats` holds what an optional `stats_fn` says of the same postprocessed responses (e.g. the
labeler's gold score beside the reward model's). PPO, the pipeline's evaluation and label
collection (step 1 alone: the labeler picks among the postprocessed samples) share this chain.
"""

from __future__ import annotations

from typing import Callable

import torch

from lm_human_preferences import lm_tasks
from lm_human_preferences.labelers import Labeler
from lm_human_preferences.rewards import RewardModel

# A scorer: raw queries (B, Lq) and postprocessed responses (B, Lr) -> scores (B,).
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Statistics of a scored batch (e.g. a gold score): the same inputs -> {name: float}.
StatsFn = Callable[[torch.Tensor, torch.Tensor], dict]
# The composed function: queries, raw responses -> (scores, postprocessed responses, stats).
ComposedScoreFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]


def postprocess(responses: torch.Tensor, *, task: lm_tasks.TaskHParams, pad_token: int) -> torch.Tensor:
    """Responses (B, Lr) truncated after the task's truncation token (`lm_tasks.truncate_responses`)."""
    return lm_tasks.truncate_responses(responses, truncate_token=task.truncate_token,
                                       truncate_after=task.truncate_after, pad_token=pad_token)


def make_score_fn(*, task: lm_tasks.TaskHParams, pad_token: int, scorer: ScoreFn,
                  stats_fn: StatsFn | None = None) -> ComposedScoreFn:
    """postprocess -> `scorer` -> penalty, see the module docstring. Scores are fp32."""

    def score(queries: torch.Tensor, responses: torch.Tensor):
        postprocessed_responses = postprocess(responses, task=task, pad_token=pad_token)  # (B, Lr)
        scores = scorer(queries, postprocessed_responses).float()  # (B,)
        scores = lm_tasks.apply_penalty(scores, responses, truncate_token=task.truncate_token,
                                        truncate_after=task.truncate_after,
                                        penalty_reward_value=task.penalty_reward_value)
        stats = stats_fn(queries, postprocessed_responses) if stats_fn is not None else {}
        return scores, postprocessed_responses, stats

    return score


def reward_model_scorer(reward_model: RewardModel, *, pad_token: int, autocast) -> ScoreFn:
    """A reward model's normalized rewards, without gradients, under `autocast()`."""

    @torch.no_grad()
    def score(queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        with autocast():
            return reward_model(queries, responses, pad_token=pad_token).float()

    return score


def labeler_scorer(labeler: Labeler, *, encoding) -> ScoreFn:
    """A scripted labeler's scores of the decoded responses (as the labels it wrote were made)."""

    def score(queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        return torch.tensor(labeler.score([encoding.decode(r) for r in responses.tolist()]),
                            dtype=torch.float32, device=responses.device)

    return score
