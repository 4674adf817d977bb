"""Speed work behind the model's products: nothing model-shaped lives here.

`language/gpt.py` calls five entries, each equal to a plain torch expression up to rounding:
    linear(layer, x, packed, then_gelu=...)   layer(x), or gelu(layer(x))
    mlp(fc, proj, x, packed)                  proj(gelu(fc(x)))
    lm_head(hidden, weight, packed_head)      hidden @ weight.T in fp32
    attention(q, k, v, mask)                  scaled_dot_product_attention
    compiled(fn)                              torch.compile(fn), with the settings it needs
and `pack_for_decoding` / `fingerprint` for the weights decoding reads.

CPU: fp32 products go forward and backward through oneDNN (`_OneDNNLinear`) rather than torch's
MKL path, which on an AMD CPU reached under half of oneDNN's speed; oneDNN picks its code by
the CPU it runs on, so its numbers are the same on one CPU model, and were on an AMD and an
Intel host, but not on every CPU (BENCHMARKS.md, finding 10). On Intel CPUs MKL was the faster,
at other rounding: opt in with `set_fp32_products("vendor")` (`--run.fp32_products=vendor`, see
`fp32_onednn`); sampling decodes from oneDNN-packed weights; one-query and bf16 attention is
computed directly. Training under bf16 autocast keeps less for the backward, bit for bit the
same numbers: the products cast their weights to bf16 again in the backward rather than keep
autocast's copies (`_BF16Linear`), the MLP's GELU output is made again there (`mlp`), and
attention recomputes its probabilities there (`_BF16Attention`). Measurements and the reasons
are in BENCHMARKS.md. Elsewhere (GPU, under `torch.compile`) the plain torch ops run.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

PACK_MIN_BYTES = 2**22  # smaller models decode as fast from cache without packed weights (BENCHMARKS.md)


@functools.cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_vendor() -> str:
    """The CPU's vendor as Linux reports it ("GenuineIntel", "AuthenticAMD", ...); "" if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


FP32_PRODUCTS = ("onednn", "vendor")  # the choices of `set_fp32_products`
_fp32_products = "onednn"


def set_fp32_products(choice: str) -> str:
    """Choose the kernel of CPU fp32 training products; returns the choice before. "onednn" (the
    default): oneDNN wherever this torch has it (the fastest on AMD CPUs; its numbers follow the
    CPU model, see BENCHMARKS.md, finding 10).
    "vendor": torch's MKL path on Intel CPUs, where it was the faster (BENCHMARKS.md, finding 10),
    at different rounding; oneDNN elsewhere."""
    global _fp32_products
    if choice not in FP32_PRODUCTS:
        raise ValueError(f"unknown fp32 products {choice!r}; expected one of {', '.join(FP32_PRODUCTS)}")
    before, _fp32_products = _fp32_products, choice
    fp32_onednn.cache_clear()
    return before


@functools.cache
def fp32_onednn() -> bool:
    """Whether fp32 training products on CPU go through oneDNN rather than torch's MKL path. MKL
    runs its AVX-512 kernels on Intel CPUs only: on an AMD Zen 5 it reached under half of oneDNN's
    fp32 speed, while on an Intel Xeon (AVX-512, AMX) MKL was the faster of the two (BENCHMARKS.md,
    findings 0 and 10). So oneDNN, or under `set_fp32_products("vendor")` oneDNN but on Intel CPUs."""
    return onednn_available() and (_fp32_products == "onednn" or cpu_vendor() != "GenuineIntel")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  post: tuple[str, str] = ("none", "")) -> torch.Tensor:
    """x (N, in) @ weight (out, in)^T + bias through oneDNN; `weight` plain or packed. `post`:
    an elementwise op oneDNN applies to the fp32 results before rounding, e.g. ("gelu", "tanh")."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post[0], [], post[1])


def onednn_pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (out, in) reordered by oneDNN for products with about `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear` in fp32 on CPU, forward and backward through oneDNN: torch's fp32 matmuls go to
    MKL, which on some x86 CPUs reaches well under half of what oneDNN does (BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # x (N, in)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # (N, out)
        x, weight = ctx.saved_tensors
        grad_x = onednn_linear(grad, weight.t(), None) if ctx.needs_input_grad[0] else None  # grad @ W
        grad_w = onednn_linear(grad.t(), x.t(), None) if ctx.needs_input_grad[1] else None  # grad^T @ x
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight^T + bias for fp32 operands: oneDNN on CPU where `fp32_onednn`, else F.linear."""
    if x.device.type != "cpu" or not x.numel() or not fp32_onednn():
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def fp32_linear_add(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """other (N, out) + x (N, in) @ weight (out, in)^T, fp32, no gradients; `other` may be
    overwritten. Where `fp32_onednn`, one oneDNN product with the sum fused into it (a new
    tensor); else `other.addmm_` in place (no second buffer of `other`'s size)."""
    if x.device.type == "cpu" and fp32_onednn() and hasattr(torch.ops.mkldnn._linear_pointwise, "binary"):
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None, "add")
    return other.addmm_(x, weight.t())


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: the tanh approximation."""
    return F.gelu(x, approximate="tanh")


def linear(layer: nn.Linear, x: torch.Tensor, packed: dict | None = None, *, then_gelu: bool = False) -> torch.Tensor:
    """`layer(x)`, or `gelu(layer(x))` with `then_gelu`. On CPU: with `packed` weights (decoding,
    see `pack_for_decoding`) from those, the GELU fused into the product; in fp32 through
    `fp32_linear` (oneDNN, see `fp32_onednn`); bf16 autocast already runs on oneDNN, with
    gradients through `_BF16Linear` (no bf16 weight copies kept). A layer with a low-rank
    adapter (a submodule `lora`, see `lora.py`) adds the adapter's output before the GELU."""
    adapter = layer._modules.get("lora")
    if adapter is not None:
        out = _base_linear(layer, x, packed, then_gelu=False) + adapter(x)
        return gelu(out) if then_gelu else out
    return _base_linear(layer, x, packed, then_gelu=then_gelu)


def _base_linear(layer: nn.Linear, x: torch.Tensor, packed: dict | None, *, then_gelu: bool) -> torch.Tensor:
    if packed is not None and x.numel():  # only ever on CPU
        weight, bias = packed[layer]  # in the dtype autocast would have used
        x2 = x.reshape(-1, x.shape[-1]).to(bias.dtype)
        out = onednn_linear(x2, weight, bias, ("gelu", "tanh") if then_gelu else ("none", ""))
        return out.reshape(*x.shape[:-1], bias.shape[0])
    if (x.device.type == "cpu" and x.dtype == layer.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        out = fp32_linear(x, layer.weight, layer.bias)
    elif _bf16_training(layer, x):
        out = _BF16Linear.apply(x, layer.weight, layer.bias, False)
    else:
        out = layer(x)
    return gelu(out) if then_gelu else out


def mlp(fc: nn.Linear, proj: nn.Linear, x: torch.Tensor, packed: dict | None = None) -> torch.Tensor:
    """`linear(proj, linear(fc, x, packed, then_gelu=True), packed)`. Under CPU bf16 autocast with
    gradients (layers without adapters), the GELU runs inside `proj`'s product (`_BF16Linear`),
    which keeps only the GELU's input for the backward (kept for the GELU's backward anyway),
    not its output as well."""
    if packed is not None or "lora" in fc._modules or "lora" in proj._modules:
        return linear(proj, linear(fc, x, packed, then_gelu=True), packed)
    pre = linear(fc, x)
    if pre.dtype == torch.bfloat16 and _bf16_training(proj, pre):
        return _BF16Linear.apply(pre, proj.weight, proj.bias, True)
    return linear(proj, gelu(pre))


def _bf16_training(layer: nn.Linear, x: torch.Tensor) -> bool:
    """Whether `layer(x)` is a CPU bf16 autocast product with gradients that `_BF16Linear` makes:
    fp32 weight and bias, and an fp32 or bf16 input that `F.linear` takes to one `addmm`."""
    w, b = layer.weight, layer.bias
    return (x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.compiler.is_compiling()
            and b is not None and w.dtype == b.dtype == torch.float32 and x.dtype in (torch.float32, torch.bfloat16)
            and x.dim() in (2, 3) and x.is_contiguous() and x.numel() > 0
            and (x.requires_grad or w.requires_grad or b.requires_grad))


class _BF16Linear(torch.autograd.Function):
    """`layer(x)` under CPU bf16 autocast, with the bf16 weight copy made in the forward and made
    again in the backward instead of kept: autocast keeps its copies (half the weights' bytes)
    from the first product to the end of the backward pass. The forward is autocast's own
    (`F.linear` on bf16 operands: one `addmm`); the backward is `addmm`'s derivatives on the
    operands and layouts it gets, so results and gradients are bit for bit autocast's. (A layer
    called twice in one autocast region shares autocast's one copy, whose gradient is summed
    in bf16 before it is made fp32; here each call's is made fp32 first, then summed.) With
    `gelu_first`, `layer(gelu(x))` for a bf16 `x`, the GELU's output made again in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, gelu_first: bool):  # x (N, in) or (B, T, in), contiguous
        with torch.autocast("cpu", enabled=False):
            x16 = x.to(torch.bfloat16)
            ctx.save_for_backward(x16, weight)
            ctx.x_dtype, ctx.gelu_first = x.dtype, gelu_first
            return F.linear(gelu(x16) if gelu_first else x16, weight.to(torch.bfloat16), bias.to(torch.bfloat16))

    @staticmethod
    def backward(ctx, grad):
        x16, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out) bf16
        grad_x, grad_w = None, None
        if ctx.needs_input_grad[0]:
            grad_x = g.mm(weight.to(torch.bfloat16)).view(x16.shape)
            if ctx.gelu_first:
                grad_x = torch.ops.aten.gelu_backward(grad_x, x16, approximate="tanh")
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            a = gelu(x16) if ctx.gelu_first else x16  # the product's input, made again
            grad_w = g.t().mm(a.view(-1, a.shape[-1])).float()
        grad_b = g.sum(0).float() if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class _HeadBF16Backward(torch.autograd.Function):
    """The fp32 LM head product forward, with both backward products in bf16 (fp32 results)."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        return fp32_linear(h, w, None)

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).bfloat16()  # (N, V)
        grad_h = (g @ w.bfloat16()).float().reshape(h.shape) if ctx.needs_input_grad[0] else None
        grad_w = (g.t() @ h.reshape(-1, h.shape[-1]).bfloat16()).float() if ctx.needs_input_grad[1] else None
        return grad_h, grad_w


def lm_head(hidden: torch.Tensor, weight: torch.Tensor, packed_head: torch.Tensor | None = None) -> torch.Tensor:
    """hidden (..., D) @ weight (V, D)^T in fp32 with autocast off: (..., V). Under bf16 autocast
    with gradients, the backward products run in bf16 (`_HeadBF16Backward`); `packed_head`
    (decoding on CPU) is the weight's oneDNN-packed copy."""
    dev = hidden.device.type
    bf16_backward = (torch.is_grad_enabled() and torch.is_autocast_enabled(dev)
                     and torch.get_autocast_dtype(dev) == torch.bfloat16)
    with torch.autocast(dev, enabled=False):
        h, w = hidden.float(), weight.float()
        if bf16_backward and (h.requires_grad or w.requires_grad):
            return _HeadBF16Backward.apply(h, w)
        if packed_head is not None and h.numel():
            return onednn_linear(h.reshape(-1, h.shape[-1]), packed_head, None).reshape(*h.shape[:-1], w.shape[0])
        return fp32_linear(h, w, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`scaled_dot_product_attention` (mask None: causal, top-left aligned). On CPU, computed
    directly for one query per row (a decoding step), where the flash kernel costs ~0.6 ms a
    call for microseconds of arithmetic, and in bf16, where its backward took twice as long as
    this (BENCHMARKS.md). As in the fused kernels, scores and softmax are fp32; with several
    queries the probabilities then meet the values in the values' dtype (`_BF16Attention`, which
    keeps only q, k, v and the mask for its backward), with one query in fp32 (converting the
    values was the faster of the two there)."""
    T = q.shape[-2]
    if q.device.type != "cpu" or (T > 1 and q.dtype != torch.bfloat16) or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    if mask is None and T == 1:  # the only query sees the first key alone
        k, v = k[..., :1, :], v[..., :1, :]
    elif mask is None:
        mask = torch.ones(T, k.shape[-2], dtype=torch.bool, device=q.device).tril()
    with torch.autocast("cpu", enabled=False):
        if T > 1:
            return _BF16Attention.apply(q, k, v, mask)
        p = _probabilities(q.float(), k.float(), mask)
        return (p @ v.float()).to(q.dtype)


def _probabilities(qf: torch.Tensor, kf: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(qf @ kf^T / sqrt(hs)) over the keys `mask` lets through: (B, nh, T, S) fp32."""
    scores = qf @ kf.transpose(-2, -1) * qf.shape[-1] ** -0.5  # (B, nh, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores, -1)


class _BF16Attention(torch.autograd.Function):
    """bf16 attention on CPU with fp32 scores and softmax: `softmax(q k^T / sqrt(hs)) @ v`, the
    probabilities rounded to bf16 for the product with `v`. Autograd would keep fp32 copies of q
    and k, the fp32 probabilities, their bf16 copy and a copy of v (for GPT-2's 64 dimensions a
    head at 88 tokens, three times what q, k and v take); this keeps q, k, v and the mask, and
    recomputes the probabilities in the backward with the same ops. The backward's products are
    autograd's own (`bmm`'s derivatives on the operands, and in the layouts, that `torch.matmul`
    gives `bmm`), so outputs and gradients are bit for bit those of the plain expression
    (tests/test_attention.py)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):  # q (B, nh, T, hs), k and v (B, nh, S, hs) bf16; mask (.., T, S) bool
        ctx.save_for_backward(q, k, v, mask)
        return _probabilities(q.float(), k.float(), mask).to(v.dtype) @ v

    @staticmethod
    def backward(ctx, grad):  # (B, nh, T, hs)
        q, k, v, mask = ctx.saved_tensors
        (B, nh, T, hs), S = q.shape, k.shape[-2]
        qf, kf = q.float(), k.float()
        with torch.autocast("cpu", enabled=False):
            p = _probabilities(qf, kf, mask)  # as the forward computed them
        # autograd's backward of the forward's ops, under the caller's autocast state as theirs would be
        g3, v3 = grad.reshape(B * nh, T, hs), v.reshape(B * nh, S, hs)
        grad_v = p.to(v.dtype).reshape(B * nh, T, S).transpose(1, 2).bmm(g3).view(B, nh, S, hs)
        grad_p = g3.bmm(v3.transpose(1, 2)).view(B, nh, T, S).float()
        grad_s = torch._softmax_backward_data(grad_p, p, -1, torch.float32)
        grad_s = grad_s.masked_fill(~mask, 0) * hs ** -0.5
        s3, k3t = grad_s.reshape(B * nh, T, S), kf.transpose(-2, -1).reshape(B * nh, hs, S)
        grad_q = s3.bmm(k3t.transpose(1, 2)).view(B, nh, T, hs).to(q.dtype)
        grad_k = qf.reshape(B * nh, T, hs).transpose(1, 2).bmm(s3).view(B, nh, hs, S).transpose(-2, -1).to(k.dtype)
        return grad_q, grad_k, grad_v, None


def fingerprint(tensors: list[torch.Tensor], dtype: torch.dtype) -> tuple:
    """What packed copies of `tensors` in `dtype` are made of: memory and version (every in-place
    change to a tensor bumps it). Whoever keeps the copies must also hold on to that memory (the
    tensors' storages), so that no other tensor can take its place."""
    return (dtype, *((t.data_ptr(), t._version) for t in tensors))


@torch.no_grad()
def pack_for_decoding(linears: list[nn.Linear], head: torch.Tensor, *, rows: int) -> dict | None:
    """On CPU, oneDNN-packed copies of `linears` (bf16 under bf16 autocast, as autocast would
    cast them), keyed by layer, and of the fp32 LM head weight `head`, under "head": 16-row fp32
    products about 3x faster than MKL's, for one pass over the weights to pack (BENCHMARKS.md).
    `rows` is a hint: the copies work for products of any number of rows. None on GPU, without
    the oneDNN ops, and for models under PACK_MIN_BYTES of weights."""
    n_weights = head.numel() + sum(m.weight.numel() for m in linears)
    if head.device.type != "cpu" or not onednn_available() or 4 * n_weights < PACK_MIN_BYTES:
        return None
    dtype = decoding_dtype()
    try:
        packed: dict = {m: (onednn_pack(m.weight.to(dtype), rows), m.bias.to(dtype)) for m in linears}
        packed["head"] = onednn_pack(head.float(), rows)
    except (AttributeError, RuntimeError):
        return None
    return packed


def decoding_dtype() -> torch.dtype:
    """The dtype CPU products take now: bf16 under bf16 autocast, else fp32."""
    bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return torch.bfloat16 if bf16 else torch.float32


@functools.cache
def compiled(fn):
    """`fn` under `torch.compile` (torch >= 2.5, which takes a module argument's parameters as
    graph inputs), for functions that serve every block of every model: there is one graph per
    precision, grad mode, whether the parameters take gradients, mask kind (no pads: none) and
    shape, more than dynamo's default of 8 per function, past which calls would silently run
    eager. Shapes are static: a run has few, and a graph made dynamic by another model's shapes
    could round differently from the one it replaces. Dynamo's DDP graph splitting is off: each
    block is its own small graph already, and a split graph inside DDP could round differently
    from the unsplit one the same pass gets outside it (rollout analysis). Changes dynamo's
    global settings on first call, not at import."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, limit, max(getattr(config, limit), 64))
    config.optimize_ddp = False
    return torch.compile(fn, dynamic=False)
