"""bf16 attention on CPU (`kernels._BF16Attention`, several queries a row): the forward output
and the gradients of q, k and v bit for bit those of the plain autograd expression it replaced,
alone and inside a GPT's training step."""

import math

import pytest
import torch

from lm_human_preferences.language import kernels
from lm_human_preferences.language.gpt import GPT, GPTConfig
from tiny import bf16_lm_step

PAD = 53  # outside the tiny vocabulary
kernels_attention = kernels.attention  # before any test replaces it


def plain_attention(q, k, v, mask):
    """`kernels.attention` as it was for T > 1 in bf16 on CPU: autograd keeps what it keeps."""
    T = q.shape[-2]
    if T == 1 or q.dtype != torch.bfloat16:
        return kernels_attention(q, k, v, mask)
    if mask is None:
        mask = torch.ones(T, k.shape[-2], dtype=torch.bool, device=q.device).tril()
    with torch.autocast("cpu", enabled=False):
        scores = q.float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, nh, T, S)
        scores = scores.masked_fill(~mask, -math.inf)
        p = torch.softmax(scores, -1)
        return p.to(v.dtype) @ v


def qkv(B, nh, T, S, hs, *, split: bool, seed=0):
    """bf16 q (B, nh, T, hs), k, v (B, nh, S, hs) leaves; `split`: views of one (B, T, 3 C) tensor as
    the model makes them (needs S == T)."""
    g = torch.Generator().manual_seed(seed)
    if split:
        x = torch.randn(B, T, 3 * nh * hs, generator=g).bfloat16().requires_grad_()
        parts = [t.view(B, T, nh, hs).transpose(1, 2) for t in x.split(nh * hs, dim=2)]
        return x, parts
    leaves = [torch.randn(B, nh, n, hs, generator=g).bfloat16().requires_grad_() for n in (T, S, S)]
    return leaves, leaves


def pad_mask(B, T, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, 1, T, S, generator=g) < 0.6) & torch.ones(T, S, dtype=torch.bool).tril(S - T)
    mask[..., 0] = True  # every row sees a key
    return mask


def run(fn, shape, mask_kind, split):
    B, nh, T, S, hs = shape
    leaves, (q, k, v) = qkv(*shape, split=split)
    mask = None if mask_kind == "causal" else pad_mask(B, T, S)
    y = fn(q, k, v, mask)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    y.backward(dy.transpose(1, 2).contiguous().transpose(1, 2))  # as the model's grads arrive: (B, T, C) strides
    grads = [leaves.grad] if split else [t.grad for t in leaves]
    return [y.detach()] + grads


@pytest.mark.parametrize("mask_kind", ["causal", "pad"])
@pytest.mark.parametrize("shape,split", [((2, 3, 7, 7, 8), True), ((2, 2, 5, 5, 16), False),
                                         ((1, 2, 4, 9, 8), False)])
def test_output_and_gradients_equal_the_plain_expression(shape, split, mask_kind):
    if mask_kind == "causal" and shape[2] != shape[3]:
        pytest.skip("causal without a mask is for T == S")
    want = run(plain_attention, shape, mask_kind, split)
    got = run(kernels.attention, shape, mask_kind, split)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_backward_called_under_autocast_equals_the_plain_expression_there():
    """Reward training runs its backward pass under autocast, where autograd's products of the
    plain expression's backward run in bf16: so do ours."""
    shape = (2, 3, 6, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = run(plain_attention, shape, "pad", True)
        got = run(kernels.attention, shape, "pad", True)
    outside = run(kernels.attention, shape, "pad", True)
    assert not torch.equal(outside[1], got[1])  # the case is one where autocast matters
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_keeps_only_its_inputs_and_the_mask_for_backward():
    (q, k, v) = qkv(2, 3, 6, 6, 8, split=False)[1]
    mask = pad_mask(2, 6, 6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.attention(q, k, v, mask)
    assert {t.untyped_storage().data_ptr() for t in saved} == {t.untyped_storage().data_ptr() for t in (q, k, v, mask)}


@pytest.mark.parametrize("pads", [False, True])
@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_gpt_bf16_loss_and_gradients_unchanged(pads, backward_in_autocast, monkeypatch):
    """A tiny GPT's bf16 next-token loss and every parameter's gradient, bit for bit as with the
    plain expression, with the backward pass outside autocast (train_sft, PPO) or in it (reward
    training)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_vocab=50, n_ctx=40, n_embd=24, n_head=3, n_layer=2)).train()
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(3))
    if pads:
        tokens[0, 2:4], tokens[2, 7] = PAD, PAD
    batch = {"tokens": tokens, "mask": tokens[:, 1:] != PAD}

    def step():
        return bf16_lm_step(model, batch, pad_token=PAD, backward_in_autocast=backward_in_autocast)

    got = step()
    monkeypatch.setattr(kernels, "attention", plain_attention)
    want = step()
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
