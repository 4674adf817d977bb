"""From a scored batch of responses to PPO's per-token rewards, and the batch's statistics
(steps 3 and 4 of `train_policy.PPOTrainer.step`, and the `objective/` half of step 6):

    scores = shape_scores(scores, postprocessed_responses, shaping=shape, whiten="off", pad_token=pad)
    rewards, non_score_reward, kl = rewards_of(logprobs, ref_logprobs, scores, kl_coef=β, estimator="k1",
                                               kl_as="penalty", mask=None)

The order, each step optional but the score: score → the task's truncation penalty (`scoring`)
→ shaping (`shaping.parse_shaping`, on the scores and the response lengths) → score whitening
over the batch of every rank → KL penalty (`kl.kl_penalty_rewards`; none with `kl_as="loss"`,
where `train_policy` adds β·mean(KL) to the loss instead). A `mask` (B, T), True at a response's
tokens up to its stop (`lm_tasks.response_mask`: EOS, stop text), keeps the KL and the score on
those; None is the original's fixed-length responses, computed exactly as before.
"""

from __future__ import annotations

import torch

from lm_human_preferences import distributed, ppo
from lm_human_preferences.shaping import Shaping, omit_long_indices


def whiten_across_ranks(x: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """`ppo.whiten` with mean and (biased) variance over every rank's elements (those True in `mask`,
    the result 0 elsewhere)."""
    if mask is None:
        s = distributed.all_reduce_sum(torch.stack([x.sum(), x.square().sum(),
                                                    torch.tensor(float(x.numel()), device=x.device)]))
    else:
        m = mask.to(x.dtype)
        s = distributed.all_reduce_sum(torch.stack([(x * m).sum(), (x.square() * m).sum(), m.sum()]))
    mean = s[0] / s[2]
    var = s[1] / s[2] - mean.square()
    out = (x - mean) * torch.rsqrt(var + eps)
    out = out if shift_mean else out + mean
    return out if mask is None else out * mask


def response_lengths(postprocessed_responses: torch.Tensor, *, pad_token: int) -> torch.Tensor:
    """(B,) the tokens of each response up to its truncation or stop (the ones not padding)."""
    return (postprocessed_responses != pad_token).sum(1)


def shape_scores(scores: torch.Tensor, postprocessed_responses: torch.Tensor, *, shaping: Shaping | None,
                 whiten: str, pad_token: int) -> torch.Tensor:
    """(B,) scores after `shaping` (fn(scores, lengths), None: none) and `whiten`: "off", "shift"
    (mean 0 and std 1 over every rank's batch) or "no_shift" (std 1, the mean kept)."""
    if shaping is not None:
        scores = shaping(scores, response_lengths(postprocessed_responses, pad_token=pad_token))
    if whiten != "off":
        scores = whiten_across_ranks(scores, shift_mean=whiten == "shift")
    return scores


def omit_long(data: dict, terminated: torch.Tensor, *, variant: str,
              generator: torch.Generator | None) -> dict:
    """The rollout `data` with each row that did not terminate ((B,) `terminated` False) replaced
    by a terminated row drawn at random, every (B, ...) tensor gathered alike; the scores move
    with the sample ("corrected") or stay the long row's ("released"; `shaping.omit_long_indices`).
    `objective/omitted` (in score_stats) is the fraction replaced."""
    sample_index, score_index = omit_long_indices(terminated, generator=generator, variant=variant)
    batch = terminated.numel()
    out = {k: v[sample_index] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v
           for k, v in data.items()}
    out["scores"] = data["scores"][score_index]
    out["score_stats"] = {**data["score_stats"], "objective/omitted": float((~terminated).float().mean())}
    return out


def rewards_of(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, *, kl_coef: float,
               estimator: str, kl_as: str, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """`(rewards, non_score_reward, kl)`, each (B, T): the score on each response's last token,
    with -β·KL per token when `kl_as="penalty"` (none with "loss"); `kl` is the estimate of
    `estimator`, zero outside `mask` (k1 without a mask: the original's rewards, exactly)."""
    return ppo.kl_penalty_rewards(logprobs, ref_logprobs, scores, kl_coef=kl_coef if kl_as == "penalty" else 0.0,
                                  estimator=estimator, mask=mask)


def rollout_stats(data: dict[str, torch.Tensor], *, non_score_reward: torch.Tensor, kl: torch.Tensor,
                  kl_coef: float) -> dict[str, float]:
    """This rank's `objective/` statistics of the rollout (the original's `record_step_stats`);
    `objective/kl` is the mean over responses of the summed KL estimate. With shaped or whitened
    scores in `data["shaped_scores"]` (those rewarded), `objective/score` stays the scorer's and
    `objective/shaped_score` is their mean. With a response mask in `data["mask"]` the entropy
    counts the kept tokens, and `objective/response_length` is their mean number."""
    scores, mask = data["scores"], data.get("mask")
    rewarded = data.get("shaped_scores", scores)
    neglogp = -data["logprobs"] if mask is None else -data["logprobs"] * mask
    stats = {
        "objective/kl": float(kl.sum(1).mean()),
        "objective/kl_coef": kl_coef,
        "objective/entropy": float(neglogp.sum(1).mean()),
        "objective/score": float(scores.mean()),
        "objective/score_total": float((non_score_reward.sum(1) + rewarded).mean()),
        "objective/non_score_reward": float(non_score_reward.sum(1).mean()),
        "objective/scores_std": float(scores.std(unbiased=False)),
        "objective/truncated_frac": float((data["postprocessed_responses"] != data["responses"]).any(1).float().mean()),
    }
    if "shaped_scores" in data:
        stats["objective/shaped_score"] = float(rewarded.mean())
    if mask is not None:
        stats["objective/response_length"] = float(mask.sum(1).float().mean())
    return stats
