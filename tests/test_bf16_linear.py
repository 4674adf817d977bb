"""Linear layers under CPU bf16 autocast with gradients (`kernels._BF16Linear`): results and
gradients bit for bit autocast's `layer(x)`, without keeping bf16 weight copies for the backward."""

import pytest
import torch

from lm_human_preferences.language import kernels
from lm_human_preferences.language.gpt import GPT, GPTConfig
from tiny import bf16_lm_step

PAD = 53  # outside the tiny vocabulary


def forward_backward(fn, layer, x, *, backward_in_autocast=False):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(layer, x)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        if backward_in_autocast:
            y.backward(dy)
    if not backward_in_autocast:
        y.backward(dy)
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad]


@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_equals_autocast_layer_bit_for_bit(shape, dtype, backward_in_autocast):
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 20)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = forward_backward(lambda m, t: m(t), layer, x, backward_in_autocast=backward_in_autocast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels._bf16_training(layer, x.requires_grad_())  # the case under test
    got = forward_backward(kernels.linear, layer, x, backward_in_autocast=backward_in_autocast)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_keeps_no_bf16_weight_copy_for_backward():
    layer = torch.nn.Linear(12, 20)
    x = torch.randn(2, 5, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kernels.linear(layer, x, then_gelu=True)
    assert any(t is layer.weight for t in saved)  # the fp32 weight itself, cast again in the backward
    assert not any(t.dtype == torch.bfloat16 and t.shape in ((20, 12), (12, 20)) for t in saved)


def test_other_products_are_the_layer_itself():
    layer = torch.nn.Linear(12, 20)
    x = torch.randn(2, 5, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels._bf16_training(layer, x)
        assert not kernels._bf16_training(layer, x.transpose(0, 1))  # not one addmm in F.linear
        with torch.no_grad():
            assert not kernels._bf16_training(layer, x)
    assert not kernels._bf16_training(layer, x)  # fp32: oneDNN's own path (`fp32_linear`)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels._bf16_training(torch.nn.Linear(12, 20, bias=False), x)


@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_gpt_bf16_loss_and_gradients_unchanged(backward_in_autocast, monkeypatch):
    """A tiny GPT's bf16 next-token loss (with pads) and every parameter's gradient, bit for bit as
    with autocast's `layer(x)` in every block."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_vocab=50, n_ctx=40, n_embd=24, n_head=3, n_layer=2)).train()
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(3))
    tokens[0, 2:4] = PAD
    batch = {"tokens": tokens, "mask": tokens[:, 1:] != PAD}

    def step():
        return bf16_lm_step(model, batch, pad_token=PAD, backward_in_autocast=backward_in_autocast)

    calls = []
    apply = kernels._BF16Linear.apply
    monkeypatch.setattr(kernels._BF16Linear, "apply", lambda *a: calls.append(1) or apply(*a))
    got = step()
    assert len(calls) == 4 * 2  # every block's four products
    monkeypatch.setattr(kernels, "_bf16_training", lambda layer, x: False)
    want = step()
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def mlp_forward_backward(fn, fc, proj, x, *, backward_in_autocast=False):
    fc.zero_grad(set_to_none=True)
    proj.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(fc, proj, x)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        if backward_in_autocast:
            y.backward(dy)
    if not backward_in_autocast:
        y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for m in (fc, proj) for p in (m.weight, m.bias)]


@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_mlp_equals_autocast_layers_bit_for_bit_keeping_no_gelu_output(backward_in_autocast):
    """`kernels.mlp`: c_proj(gelu(c_fc(x))) with the GELU inside c_proj's product, as autocast's
    layers compute it; the backward keeps c_fc's output, not the GELU's as well."""
    torch.manual_seed(0)
    fc, proj = torch.nn.Linear(12, 48), torch.nn.Linear(48, 12)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    want = mlp_forward_backward(lambda f, p, t: p(kernels.gelu(f(t))), fc, proj, x,
                                backward_in_autocast=backward_in_autocast)
    got = mlp_forward_backward(kernels.mlp, fc, proj, x, backward_in_autocast=backward_in_autocast)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kernels.mlp(fc, proj, x.requires_grad_())
    hidden = [t for t in saved if t.shape == (2, 5, 48)]
    assert len({t.untyped_storage().data_ptr() for t in hidden}) == 1  # c_fc's output, kept once
