"""PPO math for policy training, following OpenAI's lm-human-preferences (docs/original.md §6).

Everything here is a pure function on tensors (or a tiny plain-float controller object): no
config objects, no global state, no environment reads. Shapes are written as ``B`` (batch of
episodes), ``T`` (response length) and ``V`` (vocabulary size).

Conventions that match the OAI TensorFlow code:

* every mean/variance is over *all* ``B*T`` elements (no masking), variances are biased
  (population) as in ``tf.nn.moments``; an optional ``mask`` ``(B, T)`` (True at a response's
  real tokens, e.g. up to its EOS) restricts them to its True positions, and zeroes the rest;
* GAE bootstraps with ``V_T = 0`` and ``returns = advantages + values`` (before the advantages
  are whitened);
* clip fractions count strict ``>`` between the clipped and unclipped losses.
"""

from typing import Callable

import torch

from lm_human_preferences.kl import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_estimate,
                                     kl_loss, kl_penalty_rewards)

__all__ = [
    "masked_mean", "whiten", "gae", "advantages_and_returns", "policy_loss", "value_loss", "ppo_losses",
    "kl_penalty_rewards", "KL_ESTIMATORS", "kl_estimate", "kl_loss", "FixedKLController",
    "AdaptiveKLController", "linear_lr", "var_explained", "entropy_from_logits", "logprobs_and_entropies",
    "logprobs_from_logits",
]


# --------------------------------------------------------------------------------------------
# Whitening and GAE
# --------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``torch.mean(x)``, or the mean over the True positions of ``mask`` (of x's shape)."""
    return torch.mean(x) if mask is None else (x * mask).sum() / mask.sum().clamp(min=1)


def _var_mean(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased ``torch.var_mean(x)``, or over the True positions of ``mask``."""
    if mask is None:
        return torch.var_mean(x, correction=0)
    mean = masked_mean(x, mask)
    return masked_mean(torch.square(x - mean), mask), mean


def whiten(values: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise ``values`` to zero mean / unit variance over ALL elements.

    ``(x - mean(x)) / sqrt(var(x) + eps)`` with the biased (population) variance, as OAI's
    ``utils.whiten``. With ``shift_mean=False`` the mean is added back, i.e. only the scale is
    normalised.

    Args:
        values: floating tensor of any shape, e.g. ``(B, T)``.
        shift_mean: if False, the result keeps the original mean.
        eps: added to the variance inside the square root.
        mask: optional bool, statistics over its True positions; the result is 0 elsewhere.

    Returns:
        Tensor of the same shape and dtype as ``values``.
    """
    var, mean = _var_mean(values, mask)  # scalars
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened if mask is None else whitened * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation with a zero bootstrap after the last position.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V_T = 0``),
    ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns = A + V``.
    Vectorised over the batch; a reverse loop over time (same accumulation order as OAI).

    Args:
        rewards: ``(B, T)`` per-token rewards (float).
        values: ``(B, T)`` value estimates of the rollout (float, no grad needed).
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` in the dtype of ``rewards``; NOT whitened.
    """
    if rewards.shape != values.shape or rewards.dim() != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must both be (B, T)")
    values = values.to(rewards.dtype)
    T = rewards.shape[1]
    next_values = torch.zeros_like(values)  # (B, T)
    next_values[:, :-1] = values[:, 1:]  # V_{t+1}, V_T = 0
    deltas = rewards + gamma * next_values - values  # (B, T)
    advantages = torch.empty_like(deltas)  # (B, T)
    lastgaelam = torch.zeros_like(deltas[:, 0])  # (B,)
    for t in reversed(range(T)):
        lastgaelam = deltas[:, t] + gamma * lam * lastgaelam  # (B,)
        advantages[:, t] = lastgaelam
    returns = advantages + values  # (B, T)
    return advantages, returns


def advantages_and_returns(
    rewards: torch.Tensor,
    values: torch.Tensor,
    *,
    gamma: float,
    lam: float,
    whiten_rewards: bool,
    whiten_fn: Callable[..., torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-minibatch preprocessing of OAI's ``PPOTrainer.loss`` (docs/original.md §6).

    If ``whiten_rewards``: ``R <- whiten(R, shift_mean=False)``; then GAE; ``returns = A + V``;
    finally ``A <- whiten(A)``. All statistics are local to the given minibatch.

    Args:
        rewards: ``(B, T)`` per-token rewards of the minibatch.
        values: ``(B, T)`` rollout (old) values of the minibatch.
        gamma, lam: GAE parameters.
        whiten_rewards: whether to rescale the rewards first.
        whiten_fn: replaces ``whiten`` (same signature), e.g. with statistics over several ranks.
        mask: optional ``(B, T)`` bool: rewards and values are zeroed outside it before GAE (so
            nothing after a response's end reaches its advantages) and whitened over it.

    Returns:
        ``(advantages, returns)``, ``(B, T)`` each, detached; advantages are whitened.
    """
    whiten_fn = whiten_fn or whiten
    rewards = rewards.detach()
    values = values.detach()
    masked = {} if mask is None else {"mask": mask}
    if mask is not None:
        rewards, values = rewards * mask, values * mask
    if whiten_rewards:
        rewards = whiten_fn(rewards, shift_mean=False, **masked)  # (B, T)
    advantages, returns = gae(rewards, values, gamma=gamma, lam=lam)  # (B, T), (B, T)
    advantages = whiten_fn(advantages, **masked)  # (B, T)
    return advantages, returns


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    cliprange: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate, OAI form.

    ``ratio = exp(logp - logp_old)``; ``pg_losses = -A * ratio``;
    ``pg_losses2 = -A * clip(ratio, 1 - c, 1 + c)``; ``loss = mean(max(pg_losses, pg_losses2))``.

    Args:
        logprobs: ``(B, T)`` log-probabilities under the current policy (requires grad).
        old_logprobs: ``(B, T)`` log-probabilities recorded at rollout time.
        advantages: ``(B, T)`` (normally whitened) advantages.
        cliprange: ``c`` above.
        mask: optional ``(B, T)`` bool; the means are over its True positions.

    Returns:
        ``(loss, stats)``: scalar loss with graph; ``stats`` holds detached scalars
        ``'approxkl'`` = ``0.5 * mean((logp - logp_old)^2)``, ``'clipfrac'`` =
        ``mean(pg_losses2 > pg_losses)`` and ``'ratio_mean'``.
    """
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    logratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(logratio)  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses2), mask)  # ()
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(torch.square(logratio), mask),
            "clipfrac": masked_mean(torch.gt(pg_losses2, pg_losses).to(logratio.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    cliprange_value: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, OAI form.

    ``vclip = clip(V, V_old - c, V_old + c)``;
    ``loss = 0.5 * mean(max((V - ret)^2, (vclip - ret)^2))``.

    Args:
        values: ``(B, T)`` current value predictions (requires grad).
        old_values: ``(B, T)`` values recorded at rollout time.
        returns: ``(B, T)`` GAE returns.
        cliprange_value: ``c`` above.
        mask: optional ``(B, T)`` bool; the means are over its True positions.

    Returns:
        ``(loss, stats)``: scalar loss with graph; detached scalars ``'clipfrac'`` =
        ``mean(vf_losses2 > vf_losses1)``, ``'error'`` = ``mean((V - ret)^2)`` and
        ``'vpred'`` = ``mean(V)``.
    """
    old_values = old_values.detach()
    returns = returns.detach()
    vpredclipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)  # (B, T)
    vf_losses1 = torch.square(values - returns)  # (B, T)
    vf_losses2 = torch.square(vpredclipped - returns)  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(vf_losses1, vf_losses2), mask)  # ()
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(torch.gt(vf_losses2, vf_losses1).to(values.dtype), mask),
            "error": masked_mean(vf_losses1, mask),
            "vpred": masked_mean(values, mask),
        }
    return loss, stats


def _explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``1 - var(target - pred) / var(target)`` (biased variances); NaN if ``var(target) == 0``."""
    def var(x):
        return torch.var(x, correction=0) if mask is None else _var_mean(x, mask)[0]
    var_target = var(target)
    ev = 1.0 - var(target - pred) / var_target
    return torch.where(var_target == 0, torch.full_like(ev, float("nan")), ev)


def var_explained(error: float, returns_var: float) -> float:
    """The original's logged ``ppo/val/var_explained``: ``1 - error / returns_var``, from the
    value error ``mean((V - ret)^2)`` and the returns' variance, each averaged over the
    minibatches of an update first; NaN if ``returns_var == 0``."""
    return 1.0 - error / returns_var if returns_var else float("nan")


def ppo_losses(
    *,
    logprobs: torch.Tensor,
    values: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    entropy: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Total PPO loss plus the logged statistics, with the docs/original.md §6 / OAI names.

    ``total = pg_loss + vf_coef * vf_loss`` (no entropy bonus). ``advantages`` and ``returns``
    are what :func:`advantages_and_returns` produced for this minibatch.

    Args:
        logprobs: ``(B, T)`` current-policy log-probs of the response tokens (with graph).
        values: ``(B, T)`` current value predictions (with graph).
        old_logprobs: ``(B, T)`` rollout log-probs.
        old_values: ``(B, T)`` rollout values.
        advantages: ``(B, T)`` whitened advantages.
        returns: ``(B, T)`` returns.
        cliprange, cliprange_value, vf_coef: PPO hyper-parameters.
        entropy: optional ``(B, T)`` per-token entropies of the current policy; if given its
            mean is reported as ``ppo/policy/entropy``.
        mask: optional ``(B, T)`` bool; every mean is over its True positions.

    Returns:
        Dict of 0-dim tensors. ``'ppo/loss/total'``, ``'ppo/loss/policy'`` and
        ``'ppo/loss/value'`` keep the autograd graph (call ``.backward()`` on the total); every
        other entry is detached: ``ppo/policy/{approxkl,clipfrac,ratio_mean[,entropy]}``,
        ``ppo/val/{clipfrac,error,vpred,mean,var,var_explained}`` (``mean``/``var`` are of the
        rollout values as in OAI; ``var_explained`` = ``1 - var(returns - values)/var(returns)``
        with the current predictions, for this minibatch alone: the trainer logs
        :func:`var_explained` of the averages instead), ``ppo/returns/{mean,var}``,
        ``ppo/policy/advantages_{mean,var}``.
    """
    pg_loss, pg_stats = policy_loss(logprobs, old_logprobs, advantages, cliprange=cliprange, mask=mask)
    vf_loss, vf_stats = value_loss(values, old_values, returns, cliprange_value=cliprange_value, mask=mask)
    total = pg_loss + vf_coef * vf_loss  # ()

    out: dict[str, torch.Tensor] = {
        "ppo/loss/policy": pg_loss,
        "ppo/loss/value": vf_loss,
        "ppo/loss/total": total,
        "ppo/policy/approxkl": pg_stats["approxkl"],
        "ppo/policy/clipfrac": pg_stats["clipfrac"],
        "ppo/policy/ratio_mean": pg_stats["ratio_mean"],
        "ppo/val/clipfrac": vf_stats["clipfrac"],
        "ppo/val/error": vf_stats["error"],
        "ppo/val/vpred": vf_stats["vpred"],
    }
    out.update(_minibatch_stats(values=values, old_values=old_values, advantages=advantages, returns=returns,
                                entropy=entropy, mask=mask))
    return out


@torch.no_grad()
def _minibatch_stats(*, values: torch.Tensor, old_values: torch.Tensor, advantages: torch.Tensor,
                     returns: torch.Tensor, entropy: torch.Tensor | None,
                     mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The detached statistics of :func:`ppo_losses` that are not of a loss: the returns', the
    rollout values', the advantages' mean and variance, the explained variance and the entropy."""
    returns = returns.detach()
    ret_var, ret_mean = _var_mean(returns, mask)
    val_var, val_mean = _var_mean(old_values.detach(), mask)
    adv_var, adv_mean = _var_mean(advantages.detach(), mask)
    out = {"ppo/returns/mean": ret_mean, "ppo/returns/var": ret_var, "ppo/val/mean": val_mean, "ppo/val/var": val_var,
           "ppo/val/var_explained": _explained_variance(values.detach(), returns, mask),
           "ppo/policy/advantages_mean": adv_mean, "ppo/policy/advantages_var": adv_var}
    if entropy is not None:
        out["ppo/policy/entropy"] = masked_mean(entropy.detach(), mask)
    return out


def linear_lr(base_lr: float, *, step: int, total_steps: int) -> float:
    """Linearly annealed learning rate ``base_lr * (1 - step / total_steps)``, clipped at 0.

    ``step`` is the 0-based index of the PPO update (batch); all epochs/minibatches of one batch
    share it.
    """
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    return max(0.0, base_lr * (1.0 - step / total_steps))


# --------------------------------------------------------------------------------------------
# Logits helpers
# --------------------------------------------------------------------------------------------


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution given by ``logits``, computed in float32.

    ``H = logsumexp(z) - sum(softmax(z) * z)`` (the OAI formula).

    Args:
        logits: ``(B, T, V)`` any floating dtype (cast to float32 first).

    Returns:
        ``(B, T)`` float32 (float64 if the input is float64).
    """
    logits = logits.float() if logits.dtype != torch.float64 else logits  # (B, T, V)
    pd = torch.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)  # (B, T)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``tokens`` under ``logits``, computed in float32.

    The logits are cast to float32 BEFORE the log-softmax (bf16 log-softmax is too coarse for
    PPO ratios); the same function must be used at sampling and at training time so that the
    first PPO ratio is exactly 1.

    Args:
        logits: ``(B, T, V)`` any floating dtype.
        tokens: ``(B, T)`` int64 token ids.

    Returns:
        ``(B, T)`` float32 (float64 if the input is float64).
    """
    return logprobs_and_entropies(logits, tokens, entropies=False)[0]


def logprobs_and_entropies(logits: torch.Tensor, tokens: torch.Tensor, *,
                           entropies: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logprobs_from_logits` and, from the same log-softmax, the entropies
    ``H = -sum(exp(logp) * logp)`` without gradient (a logged statistic): one pass over the
    vocabulary fewer than `entropy_from_logits` after it, and no (B, T, V) softmax beside the
    log-softmax. The log-probabilities are those of `logprobs_from_logits`, bit for bit.

    Returns:
        ``(B, T)`` log-probabilities, and ``(B, T)`` entropies or None without ``entropies``.
    """
    logits = logits.float() if logits.dtype != torch.float64 else logits  # (B, T, V)
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    picked = torch.gather(logp, -1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    if not entropies:
        return picked, None
    with torch.no_grad():
        return picked, -(logp.exp() * logp).sum(-1)  # (B, T)
