"""Low-rank adapters (LoRA, Hu et al. 2021) on the GPT's linear layers: add, save, load, merge.

    names = add_lora(gpt, rank=4, alpha=8, dropout=0.05, targets=("c_attn",))  # base weights frozen
    save_adapter("runs/x/adapter", gpt, meta={"base": "saved_models/offline-gpt"})
    config, tensors = load_adapter("runs/x/adapter")
    load_lora(other_gpt, config, tensors)       # the same adapters on another copy of the base
    merge_lora(gpt)                             # W += scale · B @ A; the adapters are gone

A linear layer `y = W x + b` with an adapter computes `y = W x + b + scale · B (A dropout(x))`,
A (rank, in) drawn like nn.Linear's weight, B (out, rank) zero (so a new adapter leaves the model
unchanged), scale = alpha / rank. The adapter is the layer's submodule `lora`;
`kernels.linear` adds its output (before the MLP's GELU), so every path of `gpt.py` (training,
cached and packed decoding) sees it. `add_lora` freezes every weight of the GPT: only the
adapters train (a policy's value head or a reward model's head, outside the GPT, stay trainable).

Targets name the layers by the end of their module name, e.g. "c_attn", "attn.c_proj",
"mlp.c_fc"; "all" is every linear layer of every block. An adapter file holds the A and B
tensors alone (`adapter.safetensors`, keys like "h.0.attn.c_attn.lora.A") and
`adapter_config.json` (rank, alpha, dropout, targets and the caller's `meta`); nothing is
unpickled.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from lm_human_preferences.language.checkpoints import atomic_write_bytes, load_failure, one_line
from lm_human_preferences.language.errors import CheckpointError

ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
LINEAR_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the linear layers of a block


class LoRA(nn.Module):
    """The low-rank update of one linear layer: x (..., in) -> scale · B A dropout(x) (..., out)."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1 or not 0 <= dropout < 1:
            raise ValueError(f"need rank >= 1 and 0 <= dropout < 1, got rank={rank}, dropout={dropout}")
        self.A = nn.Parameter(torch.empty(rank, in_features))  # (r, in)
        self.B = nn.Parameter(torch.zeros(out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's weight init
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        return (x @ self.A.t().to(x.dtype)) @ (self.B.t() * self.scale).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale · B @ A, (out, in): what merging adds to the layer's weight."""
        return self.scale * (self.B @ self.A)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}"


def target_layers(gpt: nn.Module, targets) -> dict[str, nn.Linear]:
    """The linear layers of the GPT's blocks that `targets` name ({module name: layer}); a target
    that names none is a ValueError listing the names there are."""
    layers = {name: m for name, m in gpt.named_modules()
              if isinstance(m, nn.Linear) and any(name.endswith("." + n) for n in LINEAR_NAMES)}
    targets = list(LINEAR_NAMES) if list(targets) == ["all"] else list(targets)
    chosen = {}
    for target in targets:
        found = {name: m for name, m in layers.items() if name == target or name.endswith("." + target.strip("."))}
        if not found:
            raise ValueError(f"LoRA target {target!r} names no linear layer; expected 'all' or the end of one of "
                             f"{', '.join(LINEAR_NAMES)} (e.g. c_attn, mlp.c_proj)")
        chosen.update(found)
    return dict(sorted(chosen.items(), key=lambda kv: list(layers).index(kv[0])))


def add_lora(gpt: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0, targets=("all",),
             generator: torch.Generator | None = None) -> list[str]:
    """Freeze the GPT's weights and give each target layer a new adapter (B = 0, so the model is
    unchanged); A is drawn from `generator` when given. Returns the adapted layers' names."""
    layers = target_layers(gpt, targets)
    gpt.requires_grad_(False)
    for name, layer in layers.items():
        if "lora" in layer._modules:
            raise ValueError(f"{name} already has a LoRA adapter")
        adapter = LoRA(layer.in_features, layer.out_features, rank=rank, alpha=alpha, dropout=dropout)
        if generator is not None:
            bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5))'s bound
            with torch.no_grad():
                adapter.A.copy_(torch.rand(adapter.A.shape, generator=generator) * 2 * bound - bound)
        layer.lora = adapter.to(layer.weight.device)
    return list(layers)


def adapters(model: nn.Module) -> dict[str, LoRA]:
    """{layer name: adapter} of every adapted layer of `model`, in module order."""
    return {name: m.lora for name, m in model.named_modules() if isinstance(m, nn.Linear) and "lora" in m._modules}


def adapter_config(model: nn.Module, meta: dict | None = None) -> dict:
    """What `adapter_config.json` holds: the adapters' rank, alpha, dropout and layers, and `meta`."""
    found = adapters(model)
    if not found:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(found.values()))
    return {**(meta or {}), "rank": first.rank, "alpha": first.alpha, "dropout": first.dropout,
            "layers": list(found)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors alone: {"<layer>.lora.A": (r, in), "<layer>.lora.B": (out, r)}, fp32 on CPU."""
    return {f"{name}.lora.{k}": getattr(a, k).detach().to("cpu", torch.float32).contiguous()
            for name, a in adapters(model).items() for k in ("A", "B")}


def save_adapter(out_dir: str | os.PathLike, model: nn.Module, *, meta: dict | None = None) -> Path:
    """Write `adapter.safetensors` then `adapter_config.json` into `out_dir`, each atomically."""
    return write_adapter(out_dir, adapter_config(model, meta), adapter_state_dict(model))


def write_adapter(out_dir: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """`save_adapter` of an adapter already taken apart (`adapter_config`, `adapter_state_dict`)."""
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / ADAPTER_FILE, save_safetensors(tensors))
    atomic_write_bytes(out_dir / ADAPTER_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    return out_dir


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter directory, checked: each listed layer has an A (r, in) and
    a B (out, r) of the config's rank, and nothing else. Problems are CheckpointErrors."""
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file; expected an adapter directory ({ADAPTER_FILE} and "
                                  f"{ADAPTER_CONFIG}, as LoRA training saves them)")
    try:
        config = json.loads(config_path.read_text())
        rank, layers = int(config["rank"]), list(config["layers"])
        float(config["alpha"]), float(config["dropout"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path}: expected JSON with rank, alpha, dropout and layers ({one_line(e)})") \
            from None
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights_path}: cannot read ({load_failure(e)})") from None
    want = {f"{name}.lora.{k}" for name in layers for k in ("A", "B")}
    if set(tensors) != want:
        odd = sorted(set(tensors) ^ want)[:4]
        raise CheckpointError(f"{weights_path}: its tensors do not match the layers {config_path} lists "
                              f"(differences: {', '.join(odd)})")
    for name in layers:
        a, b = tensors[f"{name}.lora.A"], tensors[f"{name}.lora.B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise CheckpointError(f"{weights_path}: {name}: A {list(a.shape)} and B {list(b.shape)} are not "
                                  f"(rank, in) and (out, rank) with rank {rank}")
    return config, tensors


def load_lora(gpt: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Give `gpt` the adapters of `load_adapter`'s (config, tensors) (freezing its weights)."""
    layers = config["layers"]
    present = target_layers(gpt, ["all"])
    missing = [name for name in layers if name not in present]
    if missing:
        raise CheckpointError(f"the adapter's layers {missing[:4]} are not in the model")
    for name in layers:
        a, b = tensors[f"{name}.lora.A"], tensors[f"{name}.lora.B"]
        layer = present[name]
        if (b.shape[0], a.shape[1]) != tuple(layer.weight.shape):
            raise CheckpointError(f"the adapter of {name} is {b.shape[0]}x{a.shape[1]}, the layer "
                                  f"{list(layer.weight.shape)}: it was trained on another base model")
    add_lora(gpt, rank=int(config["rank"]), alpha=float(config["alpha"]), dropout=float(config["dropout"]),
             targets=layers)
    with torch.no_grad():
        for name, adapter in adapters(gpt).items():
            adapter.A.copy_(tensors[f"{name}.lora.A"])
            adapter.B.copy_(tensors[f"{name}.lora.B"])


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Add each adapter's `delta_weight` to its layer's weight and remove the adapter, in place;
    the model then computes what it computed with the adapters (up to rounding)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "lora" in m._modules:
            m.weight += m.lora.delta_weight().to(m.weight.dtype)
            del m.lora
    return model
