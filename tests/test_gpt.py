"""GPT-2: parity with transformers, the original's padding semantics, KV-cache decoding."""

import os

import pytest
import torch

from lm_human_preferences.language import gpt as gpt_module
from lm_human_preferences.language import kernels
from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.language.kernels import linear

PAD = 53  # outside the tiny vocab, like 50259 for GPT-2


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_vocab=50, n_ctx=40, n_embd=24, n_head=3, n_layer=2)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_named_configs():
    assert GPTConfig.named("gpt2") == GPTConfig(n_layer=12, n_head=12, n_embd=768)
    assert GPTConfig.named("774M").n_head == 20
    assert GPTConfig.named("gpt2-xl").n_embd == 1600
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        GPTConfig.named("gpt5")


def test_positions_example_from_spec():
    """query [23073, PAD, PAD] + response [11, 339, 561] -> positions [0, 1, 1, 1, 2, 3]."""
    model = tiny(n_vocab=50257, n_embd=12, n_head=2)
    pad = 50259
    seen = {}

    def hook(module, args, out):
        seen["pos"] = args[0].clone()

    model.wpe.register_forward_hook(hook)
    model(torch.tensor([[23073, pad, pad, 11, 339, 561]]), pad_token=pad)
    assert seen["pos"].tolist() == [[0, 1, 1, 1, 2, 3]]


@torch.no_grad()
def test_pads_anywhere_leave_real_logits_unchanged():
    model = tiny()
    real = torch.randint(0, 50, (1, 12))
    base = model(real).logits
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        keep = torch.rand(20, generator=gen) < 0.6
        keep[0] = True
        keep[keep.cumsum(0) > 12] = False
        n = int(keep.sum())
        tokens = torch.full((1, 20), PAD)
        tokens[0, keep] = real[0, :n]
        out = model(tokens, pad_token=PAD).logits
        torch.testing.assert_close(out[0, keep], base[0, :n], atol=1e-5, rtol=0)
        # a pad's output is the output of the most recent real token
        idx = torch.where(keep, torch.arange(20), -1).cummax(0).values
        torch.testing.assert_close(out[0], out[0, idx], atol=0, rtol=0)


@torch.no_grad()
def test_batch_rows_with_different_padding():
    model = tiny()
    a = torch.tensor([[5, 6, 7, PAD, PAD, 8, 9]])
    b = torch.tensor([[5, 6, 7, 8, 9, PAD, PAD]])
    both = model(torch.cat([a, b]), pad_token=PAD).logits
    torch.testing.assert_close(both[0, [0, 1, 2, 5, 6]], both[1, :5], atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[7, 1, 1, 1, 1, 1], [1] * 12, [3, 4, 5]])
@pytest.mark.parametrize("pads", [True, False])
@pytest.mark.parametrize("spare", [0, 5])  # cache slots never written
@pytest.mark.parametrize("slots", ["all", "written"])  # CPU (one-token steps read every slot) / other devices
def test_kv_cache_equals_full_forward(chunks, pads, spare, slots, monkeypatch):
    if slots == "written":  # what a GPU runs: the written slots, and SDPA for every call
        monkeypatch.setattr(gpt_module.KVCache, "keys", lambda self, new, device: self.length + new)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(kernels, "attention",
                            lambda q, k, v, mask: sdpa(q, k, v, attn_mask=mask, is_causal=mask is None))
    model = tiny()
    tokens = torch.randint(0, 50, (3, sum(chunks)))
    if pads:
        tokens[0, 2:4] = PAD
        tokens[1, 7] = PAD
        tokens[2, 9:11] = PAD
    full = model(tokens, pad_token=PAD)
    cache = model.new_cache(3, tokens.shape[1] + spare)
    outs, start = [], 0
    for n in chunks:
        outs.append(model(tokens[:, start:start + n], pad_token=PAD, cache=cache))
        start += n
    torch.testing.assert_close(torch.cat([o.logits for o in outs], 1), full.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([o.hidden for o in outs], 1), full.hidden, atol=1e-5, rtol=0)


def test_context_overflow_is_an_error():
    model = tiny(n_ctx=8)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 9, dtype=torch.long))


@torch.no_grad()
def test_bf16_autocast_gives_fp32_logits_close_to_fp32():
    model = tiny()
    tokens = torch.randint(0, 50, (2, 10))
    ref = model(tokens).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, pad_token=PAD)
    assert out.logits.dtype == torch.float32
    assert (out.logits - ref).abs().max() < 0.1


@pytest.mark.parametrize("rows", [1, 16, 300])
def test_linear_equals_the_layer_with_its_gradients(rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(rows, 1, 24, requires_grad=True)
    got, want = linear(layer, x), layer(x)
    assert got.shape == want.shape == (rows, 1, 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(want)

    def grads(y):
        x.grad = layer.weight.grad = layer.bias.grad = None
        (y * dy).sum().backward()
        return x.grad, layer.weight.grad, layer.bias.grad

    for g, w in zip(grads(got), grads(want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(layer, x).dtype == layer(x).dtype == torch.bfloat16


def test_linear_on_empty_inputs():
    layer = torch.nn.Linear(24, 40)
    for shape in ((0, 24), (2, 0, 24)):
        x = torch.zeros(shape, requires_grad=True)
        y = linear(layer, x)
        assert y.shape == (*shape[:-1], 40)
        y.sum().backward()
        assert x.grad.shape == shape


def test_decoding_steps_never_read_tensors_on_the_host(monkeypatch):
    """A GPU decoding loop only queues kernels if no step waits for a value (bool/int/item)."""
    model = tiny()
    context = torch.tensor([[1, 2, PAD, 3], [PAD, PAD, 4, 5]])
    cache = model.new_cache(2, 8)
    model(context, pad_token=PAD, cache=cache)

    def host_read(*_):
        raise AssertionError("a tensor was read on the host during a decoding step")

    for name in ("__bool__", "__int__", "__index__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    outs = [model(torch.tensor([[6], [7]]), pad_token=PAD, cache=cache).logits for _ in range(3)]
    monkeypatch.undo()
    full = model(torch.tensor([[1, 2, PAD, 3, 6, 6, 6], [PAD, PAD, 4, 5, 7, 7, 7]]), pad_token=PAD).logits
    torch.testing.assert_close(torch.cat(outs, 1), full[:, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [4, 300])  # both `_head` layouts
def test_bf16_autocast_head_keeps_fp32_logits_and_runs_its_backward_in_bf16(rows):
    model = tiny(n_vocab=700)
    h = torch.randn(rows, 24, requires_grad=True)
    with torch.no_grad():
        want = model.lm_logits(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.lm_logits(h)
    assert torch.equal(logits, want)  # the forward is the fp32 product, bit for bit
    dlogits = torch.randn_like(logits)
    (logits * dlogits).sum().backward()
    got_h, got_w = h.grad, model.wte.weight.grad
    exact_h, exact_w = dlogits @ model.wte.weight.detach(), dlogits.t() @ h.detach()
    for got, exact in ((got_h, exact_h), (got_w, exact_w)):
        assert got.dtype == torch.float32
        rel = ((got - exact).norm() / exact.norm()).item()
        assert 0 < rel < 1e-2  # bf16 products: close, not exact
    h.grad = model.wte.weight.grad = None
    model.lm_logits(h).mul(dlogits).sum().backward()  # no autocast: the exact fp32 backward
    torch.testing.assert_close(h.grad, exact_h, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("pack", [False, True])
def test_linear_then_gelu_equals_gelu_of_the_layer(pack, bf16):
    if pack and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(5, 1, 24) * 3  # pre-activations well into both tails of the GELU
    dtype = torch.bfloat16 if bf16 else torch.float32
    packed = {layer: (kernels.onednn_pack(layer.weight.to(dtype), 5), layer.bias.to(dtype))} if pack else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got = linear(layer, x, packed, then_gelu=True)
        want = kernels.gelu(layer(x))
    assert got.dtype == want.dtype == dtype
    # bf16: the fused GELU rounds once (from fp32), the unfused one twice; one bf16 step apart at most
    tol = dict(rtol=2**-7, atol=2**-7) if bf16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("bf16", [False, True])
def test_packed_decoding_equals_plain_decoding(bf16, monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(kernels, "PACK_MIN_BYTES", 0)  # the tiny model is below the size where packing pays
    model = tiny()
    context = torch.tensor([[1, 2, PAD, 3], [PAD, PAD, 4, 5]])
    steps = torch.tensor([[6, 7, 8], [9, PAD, 10]])

    def decode(pack: bool):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            cache = model.new_cache(2, 7)
            if pack:
                model.pack_for_decoding(cache)
                assert cache.packed is not None and len(cache.packed) == 4 * 2 + 1  # 4 linears a block + head
            model(context, pad_token=PAD, cache=cache, logits=False)
            outs = [model(steps[:, i:i + 1], pad_token=PAD, cache=cache) for i in range(3)]
            return torch.cat([o.logits for o in outs], 1), torch.cat([o.hidden for o in outs], 1)

    (logits, hidden), (want_logits, want_hidden) = decode(True), decode(False)
    assert logits.dtype == torch.float32
    tol = dict(rtol=0, atol=0.05) if bf16 else dict(rtol=1e-5, atol=1e-5)  # bf16: output rounding differs
    torch.testing.assert_close(logits, want_logits, **tol)
    torch.testing.assert_close(hidden, want_hidden, **tol)


def test_small_models_are_not_packed():
    model = tiny()
    cache = model.new_cache(2, 7)
    model.pack_for_decoding(cache)
    assert cache.packed is None


def test_kept_decoding_weights_are_reused_until_the_weights_change(monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    from lm_human_preferences.language.sample import sample_sequence

    monkeypatch.setattr(kernels, "PACK_MIN_BYTES", 0)
    model = tiny()
    context = torch.tensor([[1, 2, PAD, 3], [PAD, PAD, 4, 5]])
    packs = []
    pack = kernels.onednn_pack
    monkeypatch.setattr(kernels, "onednn_pack", lambda w, rows: packs.append(w) or pack(w, rows))

    def sample():
        return sample_sequence(model, context, length=4, temperature=0.7, pad_token=PAD,
                               generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def decode(packed: bool = True, bf16: bool = False):
        """(the packed weights used, the logits of a prefill and one step)"""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            cache = model.new_cache(2, 6)
            if packed:
                model.pack_for_decoding(cache)
            model(context, pad_token=PAD, cache=cache, logits=False)
            return cache.packed, model(torch.tensor([[6], [7]]), pad_token=PAD, cache=cache).logits

    plain = sample()
    assert decode()[0] is not decode()[0]  # outside the block: packed afresh on every call
    packs.clear()
    with model.keep_decoding_weights():
        first, _ = decode()
        assert decode()[0] is first and len(packs) == 4 * 2 + 1  # packed once: 4 linears a block + head
        assert torch.equal(sample(), plain)
        with torch.no_grad():
            model.h[1].mlp.c_fc.weight.mul_(0.5)  # an in-place change, as an optimizer's step makes
        changed, logits = decode()
        assert changed is not first
        torch.testing.assert_close(logits, decode(packed=False)[1], rtol=1e-5, atol=1e-5)
        assert decode(bf16=True)[0] is not changed  # another precision: other copies
        assert decode()[0] is not changed  # and back: the kept ones were the bf16 copies
    assert model._kept is None  # released at the end of the block


@pytest.mark.parametrize("case", ["causal", "causal_spare_keys", "mask", "one_query"])
def test_cpu_bf16_attention_matches_fp64_sdpa_with_its_gradients(case):
    """The CPU bf16 path (fp32 scores and softmax, computed directly) against SDPA in fp64 on the
    same bf16 inputs, forward and backward, as close as SDPA's own bf16 kernel gets."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    T, S = (1, 9) if case == "one_query" else (7, 10 if case == "causal_spare_keys" else 7)
    q, k, v = (torch.randn(2, 3, n, 16).bfloat16().requires_grad_() for n in (T, S, S))
    mask = None
    if case in ("mask", "one_query"):
        mask = torch.rand(2, 1, T, S) < 0.7
        mask[..., 0] = True  # every row sees at least one key
    ref_mask = mask if mask is not None else torch.ones(T, S, dtype=torch.bool).tril()  # top-left causal
    dy = torch.randn(2, 3, T, 16)

    def run(fn, dtype):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        y = fn(*x)
        (y.to(dy.dtype) * dy).sum().backward()
        return [y.double()] + [t.grad.double() for t in x]

    want = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=ref_mask), torch.float64)
    got = run(lambda a, b, c: kernels.attention(a, b, c, mask), torch.bfloat16)
    assert got[0].shape == want[0].shape
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0.005, atol=0.01)  # bf16 steps are 0.008-0.016 at 1-4



def _forward_backward(model, tokens, *, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(tokens, pad_token=PAD)
    (out.logits * torch.linspace(-1, 1, out.logits.shape[-1], device=tokens.device)).sum().backward()
    return [out.logits.detach(), out.hidden.detach().float()] + [p.grad.clone() for p in model.parameters()]


def assert_like_eager(got: list, eager: list, fp32: list, *, bf16: bool):
    """`got` as `eager` (results of `_forward_backward`); in bf16, where either rounds its own
    way, as far from the fp32 results as `eager` is."""
    for t, e, r in zip(got, eager, fp32, strict=True):
        if bf16:
            assert (t - r).abs().max() <= 1.5 * (e - r).abs().max() + 1e-6 * r.abs().max()
        else:
            torch.testing.assert_close(t, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_traced_blocks_take_plain_torch_ops_with_the_same_results(bf16, monkeypatch):
    """What `torch.compile` traces of the blocks (`compile_blocks`) uses F.linear and SDPA, not our
    oneDNN products and direct attention, with the same outputs and gradients to rounding."""
    import torch.nn.functional as F

    model = tiny(n_embd=48, n_head=4).train()
    tokens = torch.randint(0, 50, (3, 12))
    tokens[0, :3] = PAD
    fp32 = _forward_backward(model, tokens, bf16=False)
    eager = _forward_backward(model, tokens, bf16=bf16)
    calls = []
    fp32_linear, sdpa = kernels.fp32_linear, F.scaled_dot_product_attention
    monkeypatch.setattr(kernels, "fp32_linear", lambda *a: calls.append("ours") or fp32_linear(*a))
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append("sdpa") or sdpa(*a, **k))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = _forward_backward(model, tokens, bf16=bf16)
    # Every block's attention through SDPA; our product only for the LM head (outside the blocks).
    assert sorted(calls) == ["ours"] + ["sdpa"] * model.config.n_layer
    assert_like_eager(got, eager, fp32, bf16=bf16)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("LMHP_TEST_COMPILE") != "1",
                                                 reason="torch.compile warms up for minutes on a CPU; "
                                                        "set LMHP_TEST_COMPILE=1 to run it")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_blocks_equal_eager_ones(device, bf16):
    """`compile_blocks` for real: outputs and gradients as eager ones (to rounding in bf16), with
    and without pads (two mask kinds), for two models sharing the compiled function."""
    for pads in (False, True):
        model = tiny(n_embd=48, n_head=4).train().to(device)
        tokens = torch.randint(0, 50, (3, 12), device=device)
        if pads:
            tokens[0, :3] = PAD
        fp32 = _forward_backward(model, tokens, bf16=False)
        eager = _forward_backward(model, tokens, bf16=bf16)
        compiled = _forward_backward(model.compile_blocks(), tokens, bf16=bf16)
        assert_like_eager(compiled, eager, fp32, bf16=bf16)
