"""Layer freezing: train only the top of a GPT (Kirk et al. 2023 freeze the first 80% of the
layers for SFT, reward model and PPO training alike).

    frozen = freeze_layers(gpt, 0.8)                  # blocks 0..floor(0.8 n_layer)-1 and wpe
    frozen = freeze_layers(gpt, 0.8, embeddings=True)  # and wte, which is also the tied LM head

`fraction` of the blocks, rounded down, counted from the input, stop training, with the position
embeddings (`wpe`) whenever at least one block does; `embeddings=True` also freezes the token
embeddings (`wte`), which this GPT shares with its LM head. The final layer norm always trains.
Frozen parameters get `requires_grad=False`: they have no gradient, so the optimizer (built
over `trainable(gpt)`) never updates them, and DDP does not all-reduce them.
"""

from __future__ import annotations

import torch
from torch import nn


def frozen_blocks(n_layer: int, fraction: float) -> int:
    """The number of blocks `fraction` of `n_layer` freezes (rounded down)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the fraction of layers to freeze must be in [0, 1], got {fraction}")
    return int(fraction * n_layer + 1e-9)  # 0.8 * 10 is 8, not 7.999...


def freeze_layers(gpt: nn.Module, fraction: float, *, embeddings: bool = False) -> list[str]:
    """Freeze the first `frozen_blocks` blocks of `gpt` (and `wpe`; `wte` too with
    `embeddings`); the names of the parameters it froze."""
    n = frozen_blocks(len(gpt.h), fraction)
    modules = [f"h.{i}." for i in range(n)] + (["wpe."] if n or embeddings else []) + (["wte."] if embeddings else [])
    frozen = []
    for name, p in gpt.named_parameters():
        if any(name.startswith(m) for m in modules):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def trainable(model: nn.Module) -> list[torch.Tensor]:
    """The parameters of `model` that train."""
    return [p for p in model.parameters() if p.requires_grad]
