"""GPT-2, written to match OpenAI's original model and its padding semantics.

    model = GPT(GPTConfig.named("124M"))
    out = model(tokens, pad_token=50259)    # out.logits (B, T, V) fp32, out.hidden (B, T, D)

Padding (SPEC §1). A token equal to `pad_token` is not part of the text:
  * it is embedded as token 0, and its key is masked out of every attention row;
  * positions are the exclusive cumulative sum of the non-pad mask, so
    [23073, PAD, PAD, 11, 339, 561] gets positions [0, 1, 1, 1, 2, 3];
  * the output (hidden state and logits) at a pad is the output of the most recent real token.
So inserting pads anywhere leaves the outputs at real tokens unchanged. A pad row also attends
to itself; that only changes the (discarded) pad rows and keeps every softmax row non-empty.

Scalar heads (value head, reward head) read `out.hidden`: the final hidden states after
`ln_f`, pad positions already filled as above.

Incremental decoding: pass a `KVCache` from `model.new_cache(batch, max_length)`; each call
appends its tokens to the cache, and the result equals a full forward pass over everything fed.

Precision: under autocast the blocks run in bf16 with an fp32 residual stream; the LM head
runs in fp32 (bf16 logits are quantised to ~0.25 near magnitude 50, which would make logprob
ratios noisy), so `logits` are always fp32. Only the head's backward runs in bf16, like the
blocks' (it decides nothing about the ratios; in fp32 it was 11% of a CPU training step).

CPU kernels: fp32 products go through oneDNN (`_OneDNNLinear`) rather than torch's MKL path, and
sampling decodes from oneDNN-packed weights (`GPT.pack_for_decoding`); see BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NAMED_CONFIGS = {
    "124M": dict(n_layer=12, n_head=12, n_embd=768),
    "355M": dict(n_layer=24, n_head=16, n_embd=1024),
    "774M": dict(n_layer=36, n_head=20, n_embd=1280),
    "1558M": dict(n_layer=48, n_head=25, n_embd=1600),
}
HF_NAMES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
PACK_MIN_BYTES = 2**22  # smaller models decode as fast from cache without packed weights (BENCHMARKS.md)


@dataclass
class GPTConfig:
    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12

    @classmethod
    def named(cls, name: str) -> "GPTConfig":
        """GPT-2 sizes by parameter count ("124M", ..., "1558M") or hub name ("gpt2", "gpt2-xl")."""
        key = HF_NAMES.get(name, name)
        if key not in NAMED_CONFIGS:
            raise ValueError(f"unknown GPT-2 size {name!r}; expected one of "
                             f"{sorted(NAMED_CONFIGS) + sorted(HF_NAMES)}")
        return cls(**NAMED_CONFIGS[key])

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown GPT config keys {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@functools.cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   post: tuple[str, str] = ("none", "")) -> torch.Tensor:
    """x (N, in) @ weight (out, in)^T + bias through oneDNN; `weight` plain or packed. `post`:
    an elementwise op oneDNN applies to the fp32 results before rounding, e.g. ("gelu", "tanh")."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post[0], [], post[1])


def _onednn_pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (out, in) reordered by oneDNN for products with about `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear` in fp32 on CPU, forward and backward through oneDNN: torch's fp32 matmuls go to
    MKL, which on some x86 CPUs reaches well under half of what oneDNN does (BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # x (N, in)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # (N, out)
        x, weight = ctx.saved_tensors
        grad_x = _onednn_linear(grad, weight.t(), None) if ctx.needs_input_grad[0] else None  # grad @ W
        grad_w = _onednn_linear(grad.t(), x.t(), None) if ctx.needs_input_grad[1] else None  # grad^T @ x
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight^T + bias for fp32 operands: oneDNN on CPU where available, else F.linear."""
    if x.device.type != "cpu" or not x.numel() or not onednn_available():
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def linear(layer: nn.Linear, x: torch.Tensor, packed: dict | None = None, *, then_gelu: bool = False) -> torch.Tensor:
    """`layer(x)`, or `gelu(layer(x))` with `then_gelu`. On CPU: with `packed` weights (decoding,
    see `GPT.pack_for_decoding`) from those, the GELU fused into the product; in fp32 through
    oneDNN (`_OneDNNLinear`); bf16 autocast already runs on oneDNN."""
    if packed is not None and x.numel():  # only ever on CPU
        weight, bias = packed[layer]  # in the dtype autocast would have used
        x2 = x.reshape(-1, x.shape[-1]).to(bias.dtype)
        out = _onednn_linear(x2, weight, bias, ("gelu", "tanh") if then_gelu else ("none", ""))
        return out.reshape(*x.shape[:-1], bias.shape[0])
    if (x.device.type == "cpu" and x.dtype == layer.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        out = _fp32_linear(x, layer.weight, layer.bias)
    else:
        out = layer(x)
    return gelu(out) if then_gelu else out


class _HeadBF16Backward(torch.autograd.Function):
    """The fp32 LM head product forward, with both backward products in bf16 (fp32 results)."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        return _fp32_linear(h, w, None)

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).bfloat16()  # (N, V)
        grad_h = (g @ w.bfloat16()).float().reshape(h.shape) if ctx.needs_input_grad[0] else None
        grad_w = (g.t() @ h.reshape(-1, h.shape[-1]).bfloat16()).float() if ctx.needs_input_grad[1] else None
        return grad_h, grad_w


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: the tanh approximation."""
    return F.gelu(x, approximate="tanh")


class KVCache:
    """Static key/value buffers for incremental decoding, plus the pad bookkeeping.

    Buffers are allocated on first use with the dtype and device of the keys, so one cache
    works under autocast or not. `length` counts every token fed so far (pads included).
    """

    def __init__(self, *, batch_size: int, max_length: int, n_layer: int):
        self.batch_size, self.max_length, self.n_layer = batch_size, max_length, n_layer
        self.k: torch.Tensor | None = None  # (n_layer, B, nh, max_length, hs)
        self.v: torch.Tensor | None = None
        self.key_real: torch.Tensor | None = None  # (B, max_length) bool
        self.n_real: torch.Tensor | None = None  # (B,) real tokens so far: the next position
        self.last_hidden: torch.Tensor | None = None  # (B, D) output at the last real token
        self.length = 0
        self.packed: dict | None = None  # oneDNN-packed weights for decoding on CPU (GPT.pack_for_decoding)

    def keys(self, new: int, device: torch.device) -> int:
        """How many key slots attention reads when `new` tokens are fed: those written so far,
        except for a single token on CPU, which reads all of them (contiguous operands for the
        one-query products, the same shapes at every step; slots not yet written hold zeros and
        the mask excludes them)."""
        return self.max_length if device.type == "cpu" and new == 1 else self.length + new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this call's keys/values (B, nh, T, hs); return the first `keys(T)` slots of the
        layer's buffers (B, nh, K, hs)."""
        if self.k is None:
            shape = (self.n_layer, *k.shape[:2], self.max_length, k.shape[-1])
            self.k = k.new_zeros(shape)  # zeros, not garbage: a masked NaN would still poison p @ v
            self.v = v.new_zeros(shape)
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        n = self.keys(k.shape[2], k.device)
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def prior_real(self, device) -> torch.Tensor:
        if self.n_real is None:
            self.n_real = torch.zeros(self.batch_size, dtype=torch.long, device=device)
            self.key_real = torch.zeros(self.batch_size, self.max_length, dtype=torch.bool, device=device)
        return self.n_real

    def advance(self, real: torch.Tensor, last_hidden: torch.Tensor):
        """After a call's blocks (`hidden_states` has put its `real` mask in `key_real`)."""
        T = real.shape[1]
        self.n_real = self.n_real + real.sum(1)
        self.last_hidden = last_hidden
        self.length += T


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`scaled_dot_product_attention` (mask None: causal, top-left aligned). On CPU, computed
    directly for one query per row (a decoding step), where the flash kernel costs ~0.6 ms a
    call for microseconds of arithmetic, and in bf16, where its backward took twice as long as
    this (BENCHMARKS.md). As in the fused kernels, scores and softmax are fp32; with several
    queries the probabilities then meet the values in the values' dtype, with one query in fp32
    (converting the values was the faster of the two there)."""
    T = q.shape[-2]
    if q.device.type != "cpu" or (T > 1 and q.dtype != torch.bfloat16) or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    if mask is None and T == 1:  # the only query sees the first key alone
        k, v = k[..., :1, :], v[..., :1, :]
    elif mask is None:
        mask = torch.ones(T, k.shape[-2], dtype=torch.bool, device=q.device).tril()
    with torch.autocast("cpu", enabled=False):
        scores = q.float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, nh, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        p = torch.softmax(scores, -1)
        return (p @ v.float()).to(q.dtype) if T == 1 else p.to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, *, attn_mask, cache: KVCache | None, layer: int):
        B, T, C = x.shape
        packed = None if cache is None else cache.packed
        q, k, v = linear(self.c_attn, x, packed).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, K, hs), see KVCache.keys
        y = attention(q, k, v, attn_mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return linear(self.c_proj, y, packed)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x, packed: dict | None = None):
        return linear(self.c_proj, linear(self.c_fc, x, packed, then_gelu=True), packed)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x, *, attn_mask, cache, layer):
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, cache=cache, layer=layer)
        return x + self.mlp(self.ln_2(x), None if cache is None else cache.packed)


def _block_pass(block: Block, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    return block(x, attn_mask=attn_mask, cache=None, layer=0)


@functools.cache
def _compiled_block_pass():
    """`_block_pass` under `torch.compile` (torch >= 2.5, which takes a module argument's
    parameters as graph inputs). A graph serves every block of every model; there is one per
    precision, grad mode, whether the parameters take gradients, mask kind (no pads: none) and
    shape, more than dynamo's default of 8 per function, past which calls would silently run
    eager. Shapes are static: a run has few, and a graph made dynamic by another model's shapes
    could round differently from the one it replaces. Dynamo's DDP graph splitting is off: each
    block is its own small graph already, and a split graph inside DDP could round differently
    from the unsplit one the same pass gets outside it (rollout analysis)."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, limit, max(getattr(config, limit), 64))
    config.optimize_ddp = False
    return torch.compile(_block_pass, dynamic=False)


@dataclass
class GPTOutput:
    logits: torch.Tensor | None  # (B, T, V) fp32
    hidden: torch.Tensor  # (B, T, D) after ln_f, pads filled from the last real token


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.n_vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.reset_parameters()
        self._keep_packed = 0  # depth of `keep_decoding_weights` blocks
        self._kept: tuple | None = None  # (what was packed, its storages, packed weights) kept by them
        self.compiled = False  # see `compile_blocks`

    @torch.no_grad()
    def reset_parameters(self):
        """The original's initialisation (used when pretraining from scratch)."""
        cfg = self.config
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        for block in self.h:
            for lin, fan in ((block.attn.c_attn, cfg.n_embd), (block.attn.c_proj, cfg.n_embd * cfg.n_layer),
                             (block.mlp.c_fc, cfg.n_embd), (block.mlp.c_proj, 4 * cfg.n_embd * cfg.n_layer)):
                nn.init.normal_(lin.weight, std=1 / math.sqrt(fan))
                nn.init.zeros_(lin.bias)

    def compile_blocks(self, enabled: bool = True) -> GPT:
        """Run the blocks of full passes (training, scoring, reference forwards: no `cache`)
        through `torch.compile`; decoding steps stay eager. Meant for GPUs: fused elementwise
        kernels and fewer launches. Compiling takes a while on first use of each shape, precision
        and mask kind (minutes on a CPU). Compiled, the blocks use plain torch ops (no oneDNN
        calls of ours, SDPA for attention); results agree with eager ones to rounding."""
        self.compiled = enabled
        return self

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache(batch_size=batch_size, max_length=max_length, n_layer=self.config.n_layer)

    @torch.no_grad()
    def pack_for_decoding(self, cache: KVCache) -> None:
        """On CPU, give `cache` oneDNN-packed copies of the linear weights (bf16 under bf16
        autocast, as autocast would cast them) and of the fp32 LM head. Every product through
        this cache (the prefill and each single-token step) then uses them: 16-row fp32 products
        about 3x faster than MKL's, for one pass over the weights to pack (BENCHMARKS.md). The
        copies are only valid while the weights do not change, so each sampling call packs
        afresh, except inside `keep_decoding_weights`, which reuses them while the weights are
        unchanged. A no-op on GPU, without the oneDNN ops, and for models under PACK_MIN_BYTES."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        n_weights = self.wte.weight.numel() + sum(m.weight.numel() for m in linears)
        if (self.wte.weight.device.type != "cpu" or not onednn_available()
                or 4 * n_weights < PACK_MIN_BYTES):
            return
        bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        dtype = torch.bfloat16 if bf16 else torch.float32
        # What the copies are made of: memory and version (every in-place change to a tensor
        # bumps it). The kept copies hold on to that memory, so no other tensor can be there.
        tensors = [t for m in linears for t in (m.weight, m.bias)] + [self.wte.weight]
        source = (dtype, *((t.data_ptr(), t._version) for t in tensors))
        if self._kept is not None and self._kept[0] == source:
            cache.packed = self._kept[2]
            return
        rows = cache.batch_size  # a hint: the copies work for products of any number of rows
        try:
            packed: dict = {m: (_onednn_pack(m.weight.to(dtype), rows), m.bias.to(dtype)) for m in linears}
            packed["head"] = _onednn_pack(self.wte.weight.float(), rows)
        except (AttributeError, RuntimeError):
            return
        cache.packed = packed
        if self._keep_packed:
            self._kept = (source, [t.untyped_storage() for t in tensors], packed)

    @contextlib.contextmanager
    def keep_decoding_weights(self):
        """Within this block, sampling calls share their packed weights (`pack_for_decoding`)
        for as long as the weights stay the same, instead of packing them on every call: for
        loops that sample many batches from a fixed model (collecting labels, reward
        statistics). A change made in place through the tensors or an optimizer is detected (by
        tensor version) and repacks; one made through `.data` is not: do not do that inside. The
        copies (as large as the weights, half that in bf16) are released when the block ends."""
        self._keep_packed += 1
        try:
            yield self
        finally:
            self._keep_packed -= 1
            if not self._keep_packed:
                self._kept = None

    def hidden_states(self, tokens: torch.Tensor, *, pad_token: int | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states after ln_f (B, T, D) for tokens (B, T); see the module docstring."""
        B, T = tokens.shape
        past = 0 if cache is None else cache.length
        if past + T > (cache.max_length if cache is not None else self.config.n_ctx):
            raise ValueError(f"sequence of {past + T} tokens exceeds the context "
                             f"({cache.max_length if cache is not None else self.config.n_ctx})")
        real = torch.ones_like(tokens, dtype=torch.bool) if pad_token is None else tokens != pad_token  # (B, T)
        tokens = tokens.masked_fill(~real, 0)
        prior = 0 if cache is None else cache.prior_real(tokens.device)[:, None]
        positions = prior + torch.cumsum(real, 1) - real.long()  # exclusive cumsum (B, T)
        # No host sync on a decoding step (it would stall a GPU's queue): positions < past + T, and
        # outputs at pads are filled below whether or not there are any.
        if past + T > self.config.n_ctx and int(positions.max()) >= self.config.n_ctx:
            raise ValueError(f"position {int(positions.max())} exceeds n_ctx={self.config.n_ctx}")

        if cache is not None:
            cache.key_real[:, past:past + T] = real
        x = self.wte(tokens) + self.wpe(positions)  # (B, T, D)
        all_real = pad_token is None or (past == 0 and bool(real.all()))
        if all_real and past == 0:
            attn_mask = None  # plain causal (top-left aligned if the cache has more slots): SDPA's fastest
        else:
            # Keys: this call's and the cache's (see `KVCache.keys`; slots not yet written are
            # False), and slots after this call's last token fail the causal condition anyway.
            keys_real = real if cache is None else cache.key_real[:, :cache.keys(T, tokens.device)]  # (B, K)
            q_idx = torch.arange(past, past + T, device=tokens.device)[:, None]  # (T, 1)
            k_idx = torch.arange(keys_real.shape[1], device=tokens.device)[None, :]  # (1, K)
            attn_mask = (k_idx <= q_idx) & (keys_real[:, None, :] | (k_idx == q_idx))  # (B, T, K)
            attn_mask = attn_mask[:, None]  # (B, 1, T, K)
        compiled = _compiled_block_pass() if self.compiled and cache is None else None
        for layer, block in enumerate(self.h):
            if compiled is not None:
                x = compiled(block, x, attn_mask)
            else:
                x = block(x, attn_mask=attn_mask, cache=cache, layer=layer)
        h = self.ln_f(x)

        if not all_real:
            # Outputs at pads are those of the most recent real token.
            idx = torch.where(real, torch.arange(T, device=tokens.device), -1).cummax(1).values  # (B, T)
            h = h.gather(1, idx.clamp(min=0)[..., None].expand(-1, -1, h.shape[-1]))
            if cache is not None and cache.last_hidden is not None:
                h = torch.where((idx < 0)[..., None], cache.last_hidden[:, None].to(h.dtype), h)
        if cache is not None:
            cache.advance(real, h[:, -1])
        return h

    def lm_logits(self, hidden: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Tied LM head: (..., D) -> (..., V), always computed in fp32 (autocast off). Under bf16
        autocast only its backward runs in bf16, as every other matmul's does: the logits, and so
        the logprobs and PPO ratios, keep fp32 precision; the gradients get autocast's. A `cache`
        with packed weights (decoding on CPU) supplies the head's packed copy."""
        dev = hidden.device.type
        bf16_backward = (torch.is_grad_enabled() and torch.is_autocast_enabled(dev)
                         and torch.get_autocast_dtype(dev) == torch.bfloat16)
        with torch.autocast(dev, enabled=False):
            h, w = hidden.float(), self.wte.weight.float()
            if bf16_backward and (h.requires_grad or w.requires_grad):
                return _HeadBF16Backward.apply(h, w)
            if cache is not None and cache.packed is not None and h.numel():
                out = _onednn_linear(h.reshape(-1, h.shape[-1]), cache.packed["head"], None)
                return out.reshape(*h.shape[:-1], self.config.n_vocab)
            return _fp32_linear(h, w, None)

    def forward(self, tokens: torch.Tensor, *, pad_token: int | None = None,
                cache: KVCache | None = None, logits: bool = True) -> GPTOutput:
        h = self.hidden_states(tokens, pad_token=pad_token, cache=cache)
        return GPTOutput(logits=self.lm_logits(h, cache) if logits else None, hidden=h)
