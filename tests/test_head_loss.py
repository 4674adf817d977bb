"""The chunked next-token loss (`language/head_loss.py`, `GPT.lm_loss`, `train_sft.lm_loss`) against
the plain path it replaces: logits of every position from `lm_head`, then `F.cross_entropy`.
Losses and gradients agree to fp32 rounding in fp32; under bf16 autocast the loss still does
(the head's forward stays fp32) and the gradients to the rounding of bf16 products."""

import math

import pytest
import torch
import torch.nn.functional as F
from live_bytes import LiveBytes

from lm_human_preferences import train_sft
from lm_human_preferences.language import head_loss, kernels
from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.language.head_loss import chunk_rows, head_cross_entropy

N, D, V = 37, 16, 101


def plain_loss(hidden, weight, targets):
    return F.cross_entropy(kernels.lm_head(hidden, weight).reshape(-1, V), targets.reshape(-1), ignore_index=-100)


def loss_and_grads(fn, hidden, weight, targets, *, bf16: bool, scale: float = 1.0):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fn(h, w, targets)
    (scale * loss).backward()
    return loss.detach(), h.grad, w.grad


def inputs(seed=0, shape=(N,)):
    g = torch.Generator().manual_seed(seed)
    hidden = 2 * torch.randn(*shape, D, generator=g)
    weight = 0.5 * torch.randn(V, D, generator=g)
    targets = torch.randint(0, V, shape, generator=g)
    targets.view(-1)[::3] = -100  # ignored positions
    return hidden, weight, targets


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("rows", [1, 5, 64, 1000])
def test_fp32_loss_and_gradients_equal_the_plain_path(rows):
    hidden, weight, targets = inputs(shape=(3, 13))
    new = loss_and_grads(lambda h, w, t: head_cross_entropy(h, w, t, rows=rows), hidden, weight, targets,
                         bf16=False, scale=0.375)
    old = loss_and_grads(plain_loss, hidden, weight, targets, bf16=False, scale=0.375)
    torch.testing.assert_close(new[0], old[0], rtol=1e-6, atol=0)
    for a, b in zip(new[1:], old[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not new[1].view(-1, D)[::3].any()  # ignored positions get no gradient


@pytest.mark.parametrize("rows", [4, 1000])
def test_bf16_autocast_loss_is_fp32_and_gradients_are_the_bf16_backward(rows):
    hidden, weight, targets = inputs(1)
    new = loss_and_grads(lambda h, w, t: head_cross_entropy(h, w, t, rows=rows), hidden, weight, targets, bf16=True)
    old = loss_and_grads(plain_loss, hidden, weight, targets, bf16=True)
    exact = loss_and_grads(plain_loss, hidden, weight, targets, bf16=False)
    torch.testing.assert_close(new[0], old[0], rtol=1e-6, atol=0)  # the forward is fp32 either way
    torch.testing.assert_close(new[1], old[1], rtol=1e-6, atol=1e-7)  # one bf16 product per row, as before
    # The weight's gradient: sums of bf16 products per chunk (one chunk: the same product as before).
    assert relative(new[2], old[2]) < (1e-6 if rows >= N else 1e-2)
    for a, b in zip(new[1:], exact[1:]):
        assert a.dtype == torch.float32 and relative(a, b) < 1e-2  # bf16 products, not fp32 ones


def test_without_gradients_and_with_one_input_requiring_them():
    hidden, weight, targets = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(head_cross_entropy(hidden, weight, targets, rows=7),
                                   plain_loss(hidden, weight, targets), rtol=1e-6, atol=0)
    w = weight.clone().requires_grad_()
    head_cross_entropy(hidden, w, targets, rows=7).backward()
    w_old = weight.clone().requires_grad_()
    plain_loss(hidden, w_old, targets).backward()
    torch.testing.assert_close(w.grad, w_old.grad, rtol=1e-5, atol=1e-6)


def test_all_positions_ignored_gives_what_cross_entropy_gives():
    hidden, weight, _ = inputs(3)
    targets = torch.full((N,), -100)
    assert math.isnan(head_cross_entropy(hidden, weight, targets).item())
    assert math.isnan(plain_loss(hidden, weight, targets).item())


def test_chunks_hold_about_a_fixed_number_of_logits():
    assert chunk_rows(50257) == 333 and chunk_rows(64) == 2 ** 24 // 64 and chunk_rows(10 ** 7) == 64


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_vocab=V, n_ctx=32, n_embd=D, n_head=2, n_layer=2))


def old_lm_loss(model, batch, *, pad_token):
    """train_sft.lm_loss as it was: every position's logits, then F.cross_entropy."""
    tokens, mask = batch["tokens"], batch["mask"]
    logits = model(tokens[:, :-1], pad_token=pad_token).logits
    targets = tokens[:, 1:].masked_fill(~mask, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("bf16", [False, True])
def test_train_sft_loss_and_gradients_equal_the_logits_path(bf16, monkeypatch):
    pad = V + 3
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, V, (3, 12), generator=g)
    tokens[1, 8:] = pad  # a padded row, its pads masked as prompt/response data masks them
    mask = torch.rand(3, 11, generator=g) > 0.3
    mask[1, 7:] = False
    batch = {"tokens": tokens, "mask": mask}
    results = []
    for fn in (old_lm_loss, train_sft.lm_loss):
        model = tiny_gpt()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fn(model, batch, pad_token=pad)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        if fn is old_lm_loss:  # the new path never computes every position's logits
            monkeypatch.setattr(GPT, "lm_logits", lambda *a, **k: pytest.fail("lm_loss computed all logits"))
    (old_loss, old_grads), (new_loss, new_grads) = results
    torch.testing.assert_close(new_loss, old_loss, rtol=1e-6, atol=0)
    for name, grad in old_grads.items():
        if bf16:
            assert relative(new_grads[name], grad) < 1e-2, name
        else:
            torch.testing.assert_close(new_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD"])
def test_fp32_either_product_kernel(vendor, monkeypatch):
    """The same comparison with the fp32 products on MKL and on oneDNN (`kernels.fp32_onednn`)."""
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: vendor)
    before = kernels.set_fp32_products("vendor")  # MKL on Intel CPUs
    try:
        test_fp32_loss_and_gradients_equal_the_plain_path(rows=5)
    finally:
        kernels.set_fp32_products(before)


def _old_times_weight(g, w_g):
    """`head_loss._times_weight` as it was, on a bf16 copy of the weight made once per call."""
    return (g @ w_g).float() if g.dtype == torch.bfloat16 else kernels.fp32_linear(g, w_g.t(), None)


def _old_add_outer(acc, g, h):
    """`head_loss._add_outer` as it was: each bf16 product made fp32, then added."""
    if g.dtype == torch.bfloat16:
        p = (g.t() @ h.bfloat16()).float()
        return p if acc is None else acc.add_(p)
    return kernels.fp32_linear(g.t(), h.t(), None) if acc is None else kernels.fp32_linear_add(g.t(), h.t(), acc)


def _bf16_head(hidden, weight, targets, rows):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return loss_and_grads(lambda h, w, t: head_cross_entropy(h, w, t, rows=rows), hidden, weight, targets,
                              bf16=True)


def test_bf16_groups_bit_for_bit_as_before_with_less_memory(monkeypatch):
    """Under bf16 autocast the weight is rounded for each group's product and each group's bf16
    weight-gradient product is added to the fp32 sum as it is: the same numbers as rounding the
    weight once and adding fp32 copies of the products, with at most 7 bytes a weight element
    alive at once (the fp32 sum, one bf16 product or weight copy, and change) instead of 12."""

    monkeypatch.setattr(head_loss, "BF16_GROUP_ELEMENTS", 8 * V)  # several groups of 8 rows
    hidden, weight, targets = inputs(4)
    got = _bf16_head(hidden, weight, targets, rows=4)
    w_g = weight.bfloat16()
    monkeypatch.setattr(head_loss, "_times_weight", lambda g, w, scratch: _old_times_weight(g, w_g))
    monkeypatch.setattr(head_loss, "_add_outer", lambda acc, g, h, scratch, first: _old_add_outer(None if first else acc, g, h))
    want = _bf16_head(hidden, weight, targets, rows=4)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    monkeypatch.undo()

    monkeypatch.setattr(head_loss, "BF16_GROUP_ELEMENTS", 8 * 1000)
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(40, 256, generator=g).requires_grad_(), torch.randn(1000, 256, generator=g).requires_grad_()
    t = torch.randint(0, 1000, (40,), generator=g)
    live = LiveBytes()
    with live, torch.autocast("cpu", dtype=torch.bfloat16):
        head_cross_entropy(h, w, t, rows=8)
    assert live.peak < 7 * w.numel()
