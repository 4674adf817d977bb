"""Next-token cross-entropy through the tied LM head, without the (N, V) logits in memory at once.

    loss = head_cross_entropy(hidden, weight, targets)   # hidden (..., D), weight (V, D), targets (...)

equals, up to rounding,

    F.cross_entropy(kernels.lm_head(hidden, weight).reshape(-1, V), targets.reshape(-1), ignore_index=-100)

forward and backward, in fp32 and under bf16 autocast: the logits are computed in fp32 as
`lm_head` computes them (`kernels.fp32_linear`), and under bf16 autocast with gradients the two backward
products run in bf16 with fp32 inputs rounded once, as `lm_head`'s backward does. The difference
is the order of the work: only positions whose target is not ignored enter the head at all; they
go through in chunks of rows, and each chunk's gradients (softmax minus one-hot, divided by the
number of targets) are taken while its logits are at hand, so the head's gradients are ready
when the forward pass ends and no logits, log-softmax or logit gradients stay alive. Under bf16
autocast the chunks' logit gradients, rounded to bf16, are gathered for up to
`BF16_GROUP_ELEMENTS` of them and meet the weights in one product each (up to 1335 rows of GPT-2's
vocabulary: the same products as `lm_head`'s backward). The whole
head's work is one product forward and two backward, as unfused; the loss's backward only scales
the gradients kept by the incoming gradient (a scalar). Peak memory for the head is one chunk's
logits (`CHUNK_ELEMENTS`) instead of three or four (N, V) buffers (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lm_human_preferences.language import kernels

CHUNK_ELEMENTS = 2 ** 24  # logits per chunk (64 MiB in fp32): 333 rows of GPT-2's vocabulary
BF16_GROUP_ELEMENTS = 2 ** 26  # bf16 logit gradients per product (128 MiB): 1335 rows of GPT-2's vocabulary


def chunk_rows(n_vocab: int) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS logits, and at least 64 rows (products stay efficient)."""
    return max(64, CHUNK_ELEMENTS // n_vocab)


def _chunk_losses(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's log-softmax (c, V) fp32 (F.cross_entropy's own kernel) and its losses (c,)."""
    logp = torch.log_softmax(kernels.fp32_linear(h, w, None), 1)  # (c, V)
    return logp, -logp.gather(1, t[:, None]).squeeze(1)


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    """[start, end) of about `rows` rows each, as equal as can be (no small remainder chunk: each
    chunk's weight gradient costs a pass over a (V, D) buffer whatever its rows)."""
    size = -(-n // -(-n // rows))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _logit_grads(logp: torch.Tensor, targets: torch.Tensor, n: int) -> torch.Tensor:
    """d(mean loss over n rows)/d(logits) of a chunk: (softmax - one-hot) / n, in place of `logp`."""
    g = logp.exp_()
    g[torch.arange(len(targets), device=g.device), targets] -= 1.0
    return g.mul_(1.0 / n)


def _times_weight(g: torch.Tensor, w: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """g (c, V) @ w (V, D) as fp32: bf16 operands for a bf16 `g` (`w` rounded to bf16 into
    `scratch`, a (V, D) bf16 buffer), or fp32 ones through `kernels.fp32_linear` (oneDNN or MKL on
    CPU, see `kernels.fp32_onednn`)."""
    return (g @ scratch.copy_(w)).float() if g.dtype == torch.bfloat16 else kernels.fp32_linear(g, w.t(), None)


def _add_outer(acc: torch.Tensor | None, g: torch.Tensor, h: torch.Tensor, scratch: torch.Tensor | None, *,
               first: bool) -> torch.Tensor:
    """acc + g^T (V, c) @ h (c, D) as fp32 (`first`: zero + ...; `acc` is overwritten). For a bf16
    `g`: bf16 operands, the product into `scratch` (V, D) bf16, then into `acc` (an fp32 buffer)
    without an fp32 copy of it; else fp32 through `kernels.fp32_linear` / `kernels.fp32_linear_add`
    (`acc` None when `first`; the sum fused into the product or made in place)."""
    if g.dtype == torch.bfloat16:
        p = torch.mm(g.t(), h.bfloat16(), out=scratch)
        return acc.copy_(p) if first else acc.add_(p)
    return kernels.fp32_linear(g.t(), h.t(), None) if first else kernels.fp32_linear_add(g.t(), h.t(), acc)


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of rows `h` (n, D) against `targets` (n,) through `w` (V, D), with the
    gradients computed chunk by chunk in the forward pass (see the module docstring)."""

    @staticmethod
    def forward(ctx, h, w, targets, bf16_backward: bool, rows: int):
        n, V = h.shape[0], w.shape[0]
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if want_h else None
        total = h.new_zeros(())
        # bf16: the logits' gradients of a group of chunks (BF16_GROUP_ELEMENTS) meet the weights in
        # one product each, fewer passes over the (V, D) weight gradient; fp32: a group is a chunk.
        group = max(rows, BF16_GROUP_ELEMENTS // V) if bf16_backward else rows
        grad_w, scratch, group_grads = None, None, None
        if bf16_backward:  # every large buffer made once, first: reused, not stacked above freed ones
            grad_w = torch.empty_like(w) if want_w else None
            scratch = torch.empty_like(w, dtype=torch.bfloat16)  # the bf16 weight, then each product
            group_grads = torch.empty(min(group, n), V, dtype=torch.bfloat16, device=h.device)
        for i, (g_start, g_end) in enumerate(_chunks(n, group)):
            grads = None if group_grads is None else group_grads[:g_end - g_start]
            for start, end in _chunks(g_end - g_start, rows):
                hc, tc = h[g_start + start:g_start + end], targets[g_start + start:g_start + end]
                logp, losses = _chunk_losses(hc, w, tc)
                total += losses.sum()
                g = _logit_grads(logp, tc, n)
                if grads is not None:  # rounded once, as lm_head's backward rounds the logits' gradient
                    grads[start:end] = g
                else:
                    grads = g
                del logp, g  # this chunk's (c, V) buffer is free before the next one's are made
            if want_h:
                grad_h[g_start:g_end] = _times_weight(grads, w, scratch)
            if want_w:
                grad_w = _add_outer(grad_w, grads, h[g_start:g_end], scratch, first=not i)
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad, None if grad_w is None else grad_w * grad,
                None, None, None)


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       ignore_index: int = -100, rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden (..., D) @ weight (V, D)^T` against `targets` (...),
    positions whose target is `ignore_index` left out (see the module docstring); fp32 scalar.
    `rows`: rows per chunk (default `chunk_rows(V)`)."""
    dev = hidden.device.type
    bf16_backward = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16
    with torch.autocast(dev, enabled=False):
        h, w = hidden.float().reshape(-1, hidden.shape[-1]), weight.float()
        t = targets.reshape(-1)
        keep = (t != ignore_index).nonzero().squeeze(1)
        if not len(keep):  # nothing to predict: F.cross_entropy's own answer (nan) and gradients
            return F.cross_entropy(kernels.lm_head(h, w), t, ignore_index=ignore_index)
        h, t = h.index_select(0, keep), t.index_select(0, keep)
        rows = rows or chunk_rows(w.shape[0])
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            return _HeadCrossEntropy.apply(h, w, t, bf16_backward, rows)
        return sum(_chunk_losses(h[s:e], w, t[s:e])[1].sum() for s, e in _chunks(len(t), rows)) / len(t)
