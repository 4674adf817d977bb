"""Optimiser with TensorFlow-1 Adam semantics (docs/original.md §7).

TF1's ``tf.train.AdamOptimizer`` (used by lm-human-preferences with ``epsilon=1e-5``) folds the
bias correction into the step size and adds epsilon to the *uncorrected* ``sqrt(v)``::

    t     <- t + 1
    lr_t  = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    m     <- beta1 * m + (1 - beta1) * g
    v     <- beta2 * v + (1 - beta2) * g^2
    theta <- theta - lr_t * m / (sqrt(v) + eps)

``torch.optim.Adam`` instead computes ``m_hat / (sqrt(v_hat) + eps)``, i.e. epsilon is inside the
bias correction; with ``eps=1e-5`` and small gradients this makes the early updates several times
larger, which visibly changes PPO (approxkl / clipfrac). Use this class, not ``torch.optim.Adam``.
"""

import math

import torch

__all__ = ["TFAdam"]


class TFAdam(torch.optim.Optimizer):
    """Adam with TF1 semantics (epsilon outside the bias correction).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (per group; may be changed between steps by writing ``group['lr']``).
        betas: ``(beta1, beta2)``, default ``(0.9, 0.999)``.
        eps: added to ``sqrt(v)`` (uncorrected), default ``1e-5`` (the OAI value).
        foreach: use ``torch._foreach_*`` kernels. ``None`` (default) picks them when every
            parameter of a group lives on CUDA. Both paths compute the same math.

    State per parameter: ``'step'`` (Python ``int``), ``'exp_avg'`` and ``'exp_avg_sq'`` (same
    shape/dtype/device as the parameter). ``state_dict()``/``load_state_dict()`` round-trips it
    exactly (serialise with ``torch.save`` or deep-copy: like every torch optimiser,
    ``state_dict()`` returns references to the live state tensors). No weight decay. Parameters
    whose ``.grad`` is ``None`` are skipped (their step count does not advance).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-5,
        *,
        foreach: bool | None = None,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameters: {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = group["betas"]
            eps = float(group["eps"])
            foreach = group.get("foreach")

            # Bucket params by (device, dtype, step) so one lr_t serves each bucket.
            buckets: dict[tuple, tuple[list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("TFAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = int(state["step"]) + 1
                key = (p.device, p.dtype, state["step"])
                b = buckets.setdefault(key, ([], [], [], []))
                b[0].append(p)
                b[1].append(p.grad)
                b[2].append(state["exp_avg"])
                b[3].append(state["exp_avg_sq"])

            for (device, _dtype, t), (ps, grads, exp_avgs, exp_avg_sqs) in buckets.items():
                # Bias correction folded into the step size, computed in float64 on the host.
                lr_t = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                use_foreach = foreach if foreach is not None else device.type == "cuda"
                if use_foreach:
                    torch._foreach_mul_(exp_avgs, beta1)
                    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
                    torch._foreach_mul_(exp_avg_sqs, beta2)
                    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
                    denoms = torch._foreach_sqrt(exp_avg_sqs)
                    torch._foreach_add_(denoms, eps)
                    torch._foreach_addcdiv_(ps, exp_avgs, denoms, value=-lr_t)
                else:
                    for p, g, m, v in zip(ps, grads, exp_avgs, exp_avg_sqs):
                        m.mul_(beta1).add_(g, alpha=1.0 - beta1)  # m = b1 m + (1-b1) g
                        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)  # v = b2 v + (1-b2) g^2
                        denom = v.sqrt().add_(eps)  # sqrt(v) + eps, eps OUTSIDE correction
                        p.addcdiv_(m, denom, value=-lr_t)
        return loss
