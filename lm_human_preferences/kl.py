"""KL between the policy and the reference policy (docs/original.md §6): per-token estimators, the KL
penalty folded into the rewards (the original's way) or added to the loss, and the fixed and
adaptive controllers of its coefficient β. Pure functions on tensors and two small plain-float
controllers, re-exported by `ppo`; shapes as there (``B`` episodes, ``T`` response tokens).
In a PPO step (`rollouts`) the penalty comes last: score → truncation penalty → shaping
(`shaping`) → score whitening → KL penalty.
"""

import torch

KL_ESTIMATORS = ("k1", "k2", "k3", "k1_clamped")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probabilities of sampled tokens.

    With ``log_ratio = logp - ref_logp``:
    ``k1 = log_ratio`` (the original's; unbiased, negative for some tokens),
    ``k2 = 0.5 * log_ratio^2`` (biased, >= 0, low variance),
    ``k3 = exp(-log_ratio) - 1 + log_ratio`` (unbiased, >= 0),
    ``k1_clamped = max(log_ratio, 0)``.

    Args:
        logprobs, ref_logprobs: ``(B, T)`` log-probs of the same tokens under the policy and the reference.
        estimator: one of ``KL_ESTIMATORS``.

    Returns:
        ``(B, T)`` in the dtype of ``logprobs``.
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * torch.square(log_ratio)
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if estimator == "k1_clamped":
        return torch.clamp(log_ratio, min=0.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def kl_penalty_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    *,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards ``R_t = -kl_coef * (logp_t - ref_logp_t)``, plus the score on the last
    position: ``R[:, -1] += score`` (the last of the T positions, even after truncation).

    Args:
        logprobs: ``(B, T)`` rollout policy log-probs.
        ref_logprobs: ``(B, T)`` reference-policy log-probs of the same tokens.
        scores: ``(B,)`` reward-model scores.
        kl_coef: beta (a float or 0-dim tensor).
        estimator: the per-token KL of ``kl_estimate`` (default ``k1``, the original's).
        mask: optional ``(B, T)`` bool, True at a response's real tokens (e.g. up to and including
            its first EOS, ``lm_tasks.eos_mask``): the KL is zero elsewhere and the score goes on
            the last True position of each row (which must have one). None: every position, as
            the original.

    Returns:
        ``(rewards, non_score_reward, kl)``, each ``(B, T)``; ``kl`` the estimate (``logp - ref_logp``
        for k1), ``non_score_reward = -kl_coef * kl``.
    """
    kl = logprobs - ref_logprobs if estimator == "k1" else kl_estimate(logprobs, ref_logprobs, estimator=estimator)
    if mask is not None:
        kl = kl * mask.to(kl.dtype)  # (B, T)
    non_score_reward = -kl_coef * kl  # (B, T)
    rewards = non_score_reward.clone()  # (B, T)
    if mask is None:
        rewards[:, -1] += scores.to(rewards.dtype)
    else:
        last = mask.shape[1] - 1 - mask.long().flip(1).argmax(1)  # (B,) index of the last True
        rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, non_score_reward, kl


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    kl_coef: float | torch.Tensor,
    estimator: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The KL as a loss term instead of a reward penalty: ``kl_coef * mean(kl_estimate)`` over all
    ``B*T`` tokens, or over the True positions of ``mask``. Gradients flow through ``logprobs``
    (the current policy's); ``k3`` is the usual choice here, as k1's expected gradient under the
    sampling policy is zero.

    Returns:
        A 0-dim tensor with graph.
    """
    kl = kl_estimate(logprobs, ref_logprobs.detach(), estimator=estimator)  # (B, T)
    if mask is None:
        return kl_coef * kl.mean()
    mask = mask.to(kl.dtype)
    return kl_coef * (kl * mask).sum() / mask.sum().clamp(min=1.0)


class FixedKLController:
    """Constant KL coefficient. ``value`` is a Python float."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional KL controller of Ziegler et al. (OAI ``AdaptiveKLController``).

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``value *= 1 + e * n_steps / horizon``.
    ``current_kl`` must be the all-reduced ``objective/kl`` (mean over episodes of the summed
    per-token KL), and every rank must call ``update`` with the same number.
    """

    def __init__(self, init_kl_coef: float, *, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one update after a batch of ``n_steps`` episodes; returns the new coefficient."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return self.value

    def state_dict(self) -> dict[str, float]:
        """``{'value', 'target', 'horizon'}`` as plain floats."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient (and target/horizon when present)."""
        self.value = float(state["value"])
        if "target" in state:
            self.target = float(state["target"])
        if "horizon" in state:
            self.horizon = float(state["horizon"])


