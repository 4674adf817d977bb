"""Continuations of text prompts from a model directory: the `sample` command.

    rows = sample_prompts(model="saved_models/gpt2", prompts=["The cat"], length=24,
                          temperature=0.7, seed=0)
    rows[0]["continuation"]       # text to read; rows[0]["continuation_tokens"]: the ids sampled

Every request is checked before the model is loaded (a `SampleError` names the command-line
flag that has the keyword argument's name); the sampling itself is `language.sample`'s.
"""

from __future__ import annotations

import math
import sys

import torch

from lm_human_preferences.language import memory, sample
from lm_human_preferences.language.devices import parse_device
from lm_human_preferences.lm_tasks import PretrainedModel, load_pretrained


class SampleError(ValueError):
    """A sampling request that cannot be served: a bad length, count, temperature, seed or
    device, or a prompt the model's encoding or context cannot hold. The message names the
    command-line flag (`launch.py sample`) that has the keyword argument's name."""


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
    check_request(prompts=prompts, length=length, temperature=temperature, seed=seed, num_samples=num_samples)
    dev = sample_device(device)
    pretrained = load_pretrained(model)  # a language model or policy, its encoding checked against it
    encoded = encode_prompts(prompts, pretrained, length=length)
    check_fits(pretrained, encoded, device=dev, prompts=len(prompts), num_samples=num_samples, length=length)
    warn_inexact(encoded, pretrained.encoding)

    enc = pretrained.encoding
    gpt = pretrained.gpt.to(dev).eval()
    rows = [encoded[p] for p in prompts for _ in range(num_samples)]
    width = max(len(e) for e in rows)
    context = torch.tensor([[enc.padding_token] * (width - len(e)) + e for e in rows], device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = sample.sample_sequence(gpt, context, length=length, temperature=temperature,
                                 pad_token=enc.padding_token, generator=gen)
    return [{"prompt": prompts[i // num_samples], "sample": i % num_samples,
             "continuation": enc.decode(row, skip_special=True), "continuation_tokens": row}
            for i, row in enumerate(out.tolist())]


def check_request(*, prompts: list[str], length: int, temperature: float, seed: int, num_samples: int) -> None:
    """The request's numbers and prompts, before anything is loaded."""
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


def sample_device(device: str) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N` (`language.devices`)."""
    try:
        return parse_device(device)
    except (ValueError, RuntimeError) as e:
        raise SampleError(f"--device {device!r}: {e}") from None


def encode_prompts(prompts: list[str], pretrained: PretrainedModel, *, length: int) -> dict[str, list[int]]:
    """Each distinct prompt's tokens, checked to be some and to leave room for `length` more in
    the model's context."""
    n_ctx = pretrained.gpt.config.n_ctx
    encoded = {}
    for p in dict.fromkeys(prompts):
        try:
            tokens = pretrained.encoding.encode(p)
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
    return encoded


def check_fits(pretrained: PretrainedModel, encoded: dict[str, list[int]], *, device: torch.device, prompts: int,
               num_samples: int, length: int) -> None:
    """The KV cache of all the continuations at once must fit in `device`'s memory (a lower bound)."""
    rows = prompts * num_samples
    width = max(len(e) for e in encoded.values()) + length
    too_big = memory.shortfall(memory.kv_cache_bytes(pretrained.gpt.config, rows=rows, tokens=width, value_bytes=4),
                               device, f"sampling {rows} continuations at once ({prompts} prompts x {num_samples})")
    if too_big:
        raise SampleError(f"--num_samples {num_samples}: {too_big}")


def warn_inexact(encoded: dict[str, list[int]], encoding) -> None:
    """A warning on stderr for each prompt the encoding reads back as other text."""
    for p, tokens in encoded.items():
        seen = encoding.decode(tokens)
        if seen != p:
            print(f"warning: --prompt {_short(p)}: the model's vocabulary cannot represent it exactly; "
                  f"the model sees {_short(seen)}", file=sys.stderr, flush=True)


def _short(text: str, limit: int = 60) -> str:
    """`text` quoted, cut to `limit` characters (for messages about long prompts)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."
