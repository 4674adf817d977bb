"""Whether a batch can fit in memory at all, asked before anything is allocated.

    problem = shortfall(kv_cache_bytes(config, rows=512, tokens=88, value_bytes=4), device, "sampling 512 rows")

Each estimate is one buffer that the work cannot do without, so it is a lower bound of what the
work needs: a batch refused here could never have run on this device, and one accepted may
still run out of memory. Sizes come from the model's config alone (no model is built):

    kv_cache_bytes   the keys and values sampling stores: 2 x n_layer x rows x tokens x n_embd
    training_bytes   one hidden state per layer and token kept for the backward pass, plus the
                     fp32 logits (rows x tokens x n_vocab) when the loss needs them
    training_parameters_bytes   weights, gradients and Adam's two moments, fp32 (16 bytes a parameter)
"""

from __future__ import annotations

import os

import torch

from lm_human_preferences.language.gpt import GPTConfig

FP32 = 4


def kv_cache_bytes(config: GPTConfig, *, rows: int, tokens: int, value_bytes: int) -> int:
    """The `KVCache` buffers of sampling `rows` sequences of `tokens` in all (context included)."""
    return 2 * config.n_layer * rows * tokens * config.n_embd * value_bytes


def training_bytes(config: GPTConfig, *, rows: int, tokens: int, value_bytes: int, logits: bool) -> int:
    """A training micro-batch of `rows` sequences of `tokens`: the hidden states saved for backward
    (`value_bytes` each), and the fp32 logits when `logits` (a language-model loss)."""
    saved = config.n_layer * rows * tokens * config.n_embd * value_bytes
    return saved + (rows * tokens * config.n_vocab * FP32 if logits else 0)


def training_parameters_bytes(config: GPTConfig) -> int:
    """Weights, gradients and the optimizer's two moments of a model of this shape, in fp32."""
    d = config.n_embd
    params = (config.n_vocab + config.n_ctx) * d + config.n_layer * (12 * d * d + 13 * d) + 2 * d
    return 4 * FP32 * params


def device_memory(device: torch.device) -> int | None:
    """All the memory of `device` in bytes (a GPU's, or the machine's RAM), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None


def shortfall(nbytes: int, device: torch.device, what: str) -> str | None:
    """None when `nbytes` fit in `device`'s memory, else a sentence saying that `what` cannot."""
    total = device_memory(device)
    if total is None or nbytes <= total:
        return None
    return (f"{what} needs at least {_gib(nbytes)} of memory, more than the {_gib(total)} of this "
            f"{'GPU' if device.type == 'cuda' else 'machine'}")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"
