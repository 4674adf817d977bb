"""GPT-2, written to match OpenAI's original model and its padding semantics.

    model = GPT(GPTConfig.named("124M"))
    out = model(tokens, pad_token=50259)    # out.logits (B, T, V) fp32, out.hidden (B, T, D)

Padding (docs/original.md §1). A token equal to `pad_token` is not part of the text:
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
Training under bf16 autocast on CPU keeps neither autocast's bf16 weight copies, nor attention's
fp32 scores, nor the MLP's GELU output for the backward: they are made again there, with the
same numbers (kernels.py).

Products, attention and the LM head go through `kernels.py` (the CPU speed work: oneDNN products,
packed weights for decoding, direct attention; torch.compile); each equals the plain torch
expression named there, up to rounding.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from lm_human_preferences.language import kernels
from lm_human_preferences.language.head_loss import head_cross_entropy
from lm_human_preferences.language.kernels import linear

NAMED_CONFIGS = {
    "124M": dict(n_layer=12, n_head=12, n_embd=768),
    "355M": dict(n_layer=24, n_head=16, n_embd=1024),
    "774M": dict(n_layer=36, n_head=20, n_embd=1280),
    "1558M": dict(n_layer=48, n_head=25, n_embd=1600),
}
HF_NAMES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


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
        y = kernels.attention(q, k, v, attn_mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return linear(self.c_proj, y, packed)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x, packed: dict | None = None):
        return kernels.mlp(self.c_fc, self.c_proj, x, packed)  # c_proj(gelu(c_fc(x)))


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
        """On CPU, give `cache` oneDNN-packed copies of the weights (`kernels.pack_for_decoding`);
        every product through this cache (the prefill and each single-token step) then uses
        them. The copies are only valid while the weights do not change, so each sampling call
        packs afresh, except inside `keep_decoding_weights`, which reuses them while the weights
        are unchanged. A no-op where packing does not pay."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        tensors = [t for m in linears for t in (m.weight, m.bias)] + [self.wte.weight]
        source = kernels.fingerprint(tensors, kernels.decoding_dtype())
        if self._kept is not None and self._kept[0] == source:
            cache.packed = self._kept[2]
            return
        cache.packed = kernels.pack_for_decoding(linears, self.wte.weight, rows=cache.batch_size)
        if self._keep_packed and cache.packed is not None:
            self._kept = (source, [t.untyped_storage() for t in tensors], cache.packed)

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
        compiled = kernels.compiled(_block_pass) if self.compiled and cache is None else None
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
        packed = None if cache is None or cache.packed is None else cache.packed["head"]
        return kernels.lm_head(hidden, self.wte.weight, packed)

    def lm_loss(self, hidden: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of the LM head's logits at `hidden` (..., D) against
        `targets` (...), positions with `ignore_index` left out: `F.cross_entropy` of `lm_logits`
        up to rounding, forward and backward, without the (..., V) logits in memory at once
        (`head_loss.head_cross_entropy`)."""
        return head_cross_entropy(hidden, self.wte.weight, targets, ignore_index=ignore_index)

    def forward(self, tokens: torch.Tensor, *, pad_token: int | None = None,
                cache: KVCache | None = None, logits: bool = True) -> GPTOutput:
        h = self.hidden_states(tokens, pad_token=pad_token, cache=cache)
        return GPTOutput(logits=self.lm_logits(h, cache) if logits else None, hidden=h)
