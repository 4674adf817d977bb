"""Small pure sampling functions: temperature and top-p (nucleus) sampling with a KV cache.

The model is used through `new_cache`, `pack_for_decoding`, `model(tokens, pad_token=...,
cache=..., logits=False)` and `lm_logits(hidden, cache)` (see `language/gpt.py`).
"""

from __future__ import annotations

import math
import sys

import torch

from lm_human_preferences.language import memory
from lm_human_preferences.language.devices import parse_device


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


class SampleError(ValueError):
    """A sampling request that cannot be served: a bad length, count, temperature, seed or
    device, or a prompt the model's encoding or context cannot hold. The message names the
    command-line flag (`launch.py sample`) that has the keyword argument's name."""


def _short(text: str, limit: int = 60) -> str:
    """`text` quoted, cut to `limit` characters (for messages about long prompts)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _checked(*, prompts: list[str], length: int, temperature: float, seed: int, num_samples: int,
             device: str) -> torch.device:
    """The device to sample on, once `sample_prompts`' arguments are known to work (else a SampleError)."""
    if length < 1:
        raise SampleError(f"--length must be >= 1 (got {length})")
    if num_samples < 1:
        raise SampleError(f"--num_samples must be >= 1 (got {num_samples})")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SampleError(f"--temperature must be a number >= 0, 0 for greedy (got {temperature})")
    if not 0 <= seed < 2**64:
        raise SampleError(f"--seed must be an integer in [0, 2**64) (got {seed})")
    if not prompts:
        raise SampleError("no --prompt given")
    if any(not p for p in prompts):
        raise SampleError("empty --prompt: give at least one character of text")
    try:
        return parse_device(device)
    except (ValueError, RuntimeError) as e:
        raise SampleError(f"--device {device!r}: {e}") from None


def sample_prompts(*, model: str, prompts: list[str], length: int, temperature: float, seed: int,
                   num_samples: int = 1, device: str = "auto") -> list[dict]:
    """Continuations of text prompts from a model directory (converted GPT-2, SFT or policy).

    Returns one `{prompt, sample, continuation, continuation_tokens}` per sample: the
    continuation as text to read (without special tokens such as end-of-text) and the token
    ids sampled. Prompts of different lengths are left-padded with the pad token, which the
    model masks out (positions start at each prompt's first real token), so each continuation
    is exactly what the prompt alone would give.

    Raises `SampleError` for arguments that cannot work (checked before the model is loaded,
    except a prompt's fit to the model's encoding and context, and whether the batch can fit in
    memory at all: see `language.memory`). `model`: a directory, or a name
    under saved_models/ (e.g. gpt2). A prompt that the encoding can
    only approximate (the words a gpt2-subset vocabulary lacks become its unknown token) is
    sampled anyway, with a warning on stderr.
    """
    from lm_human_preferences.lm_tasks import load_pretrained

    dev = _checked(prompts=prompts, length=length, temperature=temperature, seed=seed, num_samples=num_samples,
                   device=device)

    pretrained = load_pretrained(model)  # a language model or policy, its encoding checked against it
    enc = pretrained.encoding
    n_ctx = pretrained.gpt.config.n_ctx
    encoded = {}
    for p in dict.fromkeys(prompts):
        try:
            tokens = enc.encode(p)
        except ValueError as e:  # the 'test' encoding has no token for some characters
            raise SampleError(f"--prompt {_short(p)}: {e}") from None
        if not tokens:
            raise SampleError(f"--prompt {_short(p)}: encodes to no tokens; give some text")
        # The last sampled token is never fed back, so the model sees len(tokens) + length - 1.
        if len(tokens) + length - 1 > n_ctx:
            fix = (f"use --length {n_ctx + 1 - len(tokens)} or less" if len(tokens) <= n_ctx else
                   "use a shorter prompt")
            raise SampleError(f"prompt {_short(p)} ({len(tokens)} tokens) + --length {length} exceeds the "
                              f"model's context of {n_ctx} tokens; {fix}")
        encoded[p] = tokens
    rows = len(prompts) * num_samples
    width = max(len(e) for e in encoded.values()) + length
    too_big = memory.shortfall(memory.kv_cache_bytes(pretrained.gpt.config, rows=rows, tokens=width, value_bytes=4),
                               dev, f"sampling {rows} continuations at once ({len(prompts)} prompts x {num_samples})")
    if too_big:
        raise SampleError(f"--num_samples {num_samples}: {too_big}")
    for p, tokens in encoded.items():  # once every prompt is known to fit
        seen = enc.decode(tokens)
        if seen != p:
            print(f"warning: --prompt {_short(p)}: the model's vocabulary cannot represent it exactly; "
                  f"the model sees {_short(seen)}", file=sys.stderr, flush=True)

    gpt = pretrained.gpt.to(dev).eval()
    rows = [encoded[p] for p in prompts for _ in range(num_samples)]
    width = max(len(e) for e in rows)
    context = torch.tensor([[enc.padding_token] * (width - len(e)) + e for e in rows], device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = sample_sequence(gpt, context, length=length, temperature=temperature,
                          pad_token=enc.padding_token, generator=gen)
    return [{"prompt": prompts[i // num_samples], "sample": i % num_samples,
             "continuation": enc.decode(row, skip_special=True), "continuation_tokens": row}
            for i, row in enumerate(out.tolist())]
