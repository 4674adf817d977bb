"""Small pure sampling functions: temperature and top-p (nucleus) sampling with a KV cache.

The model is used through `new_cache`, `pack_for_decoding`, `model(tokens, pad_token=...,
cache=..., logits=False)` and `lm_logits(hidden, cache)` (see `language/gpt.py`).
"""

from __future__ import annotations

import torch


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p (nucleus) filtering of probabilities (B, V): keep, in each row, the most probable
    tokens whose probabilities first add up to at least `top_p` (in (0, 1]; always at least the
    most probable token; equal probabilities in token order), and set the others to 0. The rows
    are not renormalized: `sample_from_logits` draws in proportion to what is left."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
    before = sorted_probs.cumsum(-1, dtype=torch.float64) - sorted_probs  # (B, V) mass of the more probable
    keep = torch.zeros_like(before, dtype=torch.bool).scatter_(-1, order, before < top_p)  # (B, V)
    return probs.masked_fill(~keep, 0)


def sample_from_logits(logits: torch.Tensor, *, temperature: float, generator: torch.Generator | None = None,
                       shard: tuple[int, int] | None = None, top_p: float = 1.0) -> torch.Tensor:
    """One token per row from logits (B, V): categorical over logits / temperature, no top-k,
    restricted to the `nucleus` of `top_p` when it is below 1 (1: every token, as the original
    samples); temperature 0 is greedy. Returns (B,) long.

    `shard=(rank, world_size)`: the rows are rows `rank::world_size` of a global batch (the
    query sharding of `QueryDataset`). The noise is then drawn for the whole global batch and
    sliced, so with a `generator` equal on every rank a row's sample does not depend on the
    number of ranks."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1:
        probs = nucleus(probs, top_p)
    # Inverse CDF: one uniform per row picks the first token whose cumulative probability
    # exceeds it (a zero-probability token never does). float64 sums keep the tail exact enough.
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V)
    rank, world_size = shard or (0, 1)
    u = torch.rand(probs.shape[0] * world_size, 1, dtype=torch.float64, device=probs.device,
                   generator=generator)[rank::world_size]  # (B, 1)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1)
    return token.squeeze(1).clamp_(max=probs.shape[1] - 1)


@torch.no_grad()
def sample_sequence(model, context: torch.Tensor, *, length: int, temperature: float, pad_token: int | None,
                    generator: torch.Generator | None = None, shard: tuple[int, int] | None = None,
                    top_p: float = 1.0) -> torch.Tensor:
    """Sample exactly `length` tokens after `context` (B, Tc), which may contain pads; no stop
    token. Returns the new tokens (B, length). `shard`, `top_p`: see `sample_from_logits`."""
    B, Tc = context.shape
    cache = model.new_cache(B, Tc + length)
    model.pack_for_decoding(cache)
    out = model(context, pad_token=pad_token, cache=cache, logits=False)
    # A sampled token is never a pad outside the vocabulary (the library's always is), so the
    # steps skip the pad bookkeeping (the cache keeps the context's): fewer ops, the same results.
    step_pad = None if pad_token is None or pad_token >= model.config.n_vocab else pad_token
    tokens = []
    for i in range(length):
        logits = model.lm_logits(out.hidden[:, -1], cache)  # (B, V) fp32
        token = sample_from_logits(logits, temperature=temperature, generator=generator, shard=shard,
                                   top_p=top_p)  # (B,)
        tokens.append(token)
        if i + 1 < length:
            out = model(token[:, None], pad_token=step_pad, cache=cache, logits=False)
    return torch.stack(tokens, 1)  # (B, length)
