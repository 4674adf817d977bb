"""Personalized Soups (Jang et al. 2023): merge K policies, or K LoRA adapters, parameter by parameter.

    python launch.py merge offline_sentiment soup --models=runs/friendly/policy,runs/expert/policy
    python launch.py merge offline_sentiment soup --models=A,B --weights=0.7,0.3 --adapters=product

    state = merge_state_dicts([sd_1, sd_2], weights=[0.5, 0.5])     # Σ_k w_k θ_k, tensor by tensor

Each input is a model directory (`save_model`'s: GPT and heads) or a LoRA adapter directory
(`adapter.safetensors`; LoRA training saves one beside its merged model). When every input holds
an adapter, the adapters are merged (`adapters=separate` or `product`), else, or with
`adapters=off`, the models. Weights default to uniform and are used as given (they need not
sum to 1; a soup's weights usually do).
- Models: every tensor (trunk and heads) is the weighted sum of the K models' tensors; the
  models must have the same config and tensors.
- Adapters, `adapters=separate` (what the released P-Soups code does): A = Σ w_k A_k and
  B = Σ w_k B_k, one adapter of the same rank. Its update B A is not the weighted sum of the
  updates B_k A_k: cross terms B_j A_k appear.
- Adapters, `adapters=product`: the update is Σ w_k s_k B_k A_k exactly, written as one adapter
  of rank K·r (A = the A_k stacked, B = the w_k s_k B_k side by side, scale 1); the same as
  merging the K models with their adapters merged in.
The output directory holds the merged model (loadable by every command as `--model=DIR` or
`--task.policy.initial_model=DIR`) and, for adapters, the merged adapter. Adapters are merged
into the base model their config names (`base`), unless `base` is given; the model's heads are
then the base model's (a policy's value head is not in its adapter).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from lm_human_preferences.hparams import HParams, HParamsError
from lm_human_preferences.language import lora
from lm_human_preferences.language.checkpoints import CheckpointError, build_gpt, load_weights, save_model
from lm_human_preferences.logs import print0

ADAPTER_MODES = ("separate", "product", "off")


@dataclass
class MergeHParams(HParams):
    models: str = ""  # comma-separated model or adapter directories to merge (2 or more)
    weights: str = ""  # comma-separated weights, one per model (empty: uniform 1/K)
    adapters: str = "separate"  # separate (average A and B, as released), product (average B·A), off
    base: str = ""  # the base model adapters are merged into (empty: the one their config names)
    save_dir: str = ""  # where the merged model goes (empty: runs/<experiment>)

    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    def weight_list(self) -> list[float]:
        n = len(self.model_list())
        if not self.weights:
            return [1.0 / n] * n
        try:
            weights = [float(w) for w in self.weights.split(",")]
        except ValueError:
            raise HParamsError(f"expected comma-separated numbers, got {self.weights!r}", key="weights") from None
        if len(weights) != n:
            raise HParamsError(f"{len(weights)} weights for {n} models", key="weights")
        return weights

    def _validate(self):
        models = self.model_list()
        if len(models) < 2:
            raise HParamsError("give 2 or more model or adapter directories, comma-separated", key="models")
        for m in models:
            if not Path(m).is_dir():
                raise HParamsError(f"{m}: no such directory", key="models")
        self.weight_list()
        if self.adapters not in ADAPTER_MODES:
            raise HParamsError(f"expected one of {', '.join(ADAPTER_MODES)}, got {self.adapters!r}", key="adapters")


def merge_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_k weights[k] · states[k][name] for every name (fp32), computed as (Σ_k w_k) θ_1 + Σ_k w_k (θ_k - θ_1),
    so that identical models merge to themselves and weights (1, 0, ...) give the first model,
    bit for bit. The states must hold the same names and shapes."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"{len(states)} state dicts and {len(weights)} weights")
    names = list(states[0])
    for i, sd in enumerate(states[1:], 1):
        if set(sd) != set(names):
            odd = sorted(set(sd) ^ set(names))[:4]
            raise CheckpointError(f"model {i + 1} has other tensors than model 1 (differences: {', '.join(odd)})")
        shapes = [n for n in names if sd[n].shape != states[0][n].shape]
        if shapes:
            raise CheckpointError(f"model {i + 1}'s {shapes[0]} is {list(sd[shapes[0]].shape)}, model 1's "
                                  f"{list(states[0][shapes[0]].shape)}")
    merged = {}
    for name in names:
        anchor = states[0][name].float()
        total = anchor * sum(weights)
        for sd, w in zip(states[1:], weights[1:]):
            total += w * (sd[name].float() - anchor)
        merged[name] = total
    return merged


def product_adapter(configs: list[dict], tensors: list[dict[str, torch.Tensor]],
                    weights: list[float]) -> tuple[dict, dict[str, torch.Tensor]]:
    """One adapter of rank Σ r_k whose update is Σ_k w_k s_k B_k A_k (s_k = alpha_k / r_k), scale 1."""
    layers = configs[0]["layers"]
    for i, c in enumerate(configs[1:], 1):
        if c["layers"] != layers:
            raise CheckpointError(f"adapter {i + 1} adapts other layers than adapter 1")
    out = {}
    for name in layers:
        out[f"{name}.lora.A"] = torch.cat([t[f"{name}.lora.A"] for t in tensors])  # (Σr, in)
        out[f"{name}.lora.B"] = torch.cat([w * float(c["alpha"]) / int(c["rank"]) * t[f"{name}.lora.B"]
                                           for c, t, w in zip(configs, tensors, weights)], dim=1)  # (out, Σr)
    rank = sum(int(c["rank"]) for c in configs)
    return {**configs[0], "rank": rank, "alpha": float(rank), "dropout": 0.0}, out


def merge_adapters(dirs: list[str], weights: list[float], *, mode: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of the soup of the adapters in `dirs` (see the module docstring)."""
    loaded = [lora.load_adapter(d) for d in dirs]
    configs, tensors = [c for c, _ in loaded], [t for _, t in loaded]
    if mode == "product":
        return product_adapter(configs, tensors, weights)
    for i, c in enumerate(configs[1:], 1):
        if (c["rank"], float(c["alpha"]), c["layers"]) != (configs[0]["rank"], float(configs[0]["alpha"]),
                                                             configs[0]["layers"]):
            raise CheckpointError(f"{dirs[i]}: rank, alpha or layers differ from {dirs[0]}'s; averaging A and B "
                                  f"separately needs the same ones (use --adapters=product)")
    return configs[0], merge_state_dicts(tensors, weights)


def _merged_adapter_model(hp: MergeHParams, dirs: list[str], weights: list[float], save_dir: Path):
    """The base model with the soup of the adapters merged in (the soup adapter saved into `save_dir`)."""
    config, tensors = merge_adapters(dirs, weights, mode=hp.adapters)
    base = hp.base or config.get("base")
    if not base:
        raise HParamsError(f"{dirs[0]}: its adapter config names no base model; pass --base=DIR", key="base")
    loaded = load_weights(base)
    gpt = build_gpt(loaded, base)
    lora.load_lora(gpt, config, tensors)
    own = {k: v for k, v in config.items() if k not in ("rank", "alpha", "dropout", "layers")}
    lora.save_adapter(save_dir, gpt, meta={**own, "base": str(base), "merged_from": dirs, "weights": weights,
                                           "adapters": hp.adapters})
    return lora.merge_lora(gpt), loaded.heads, loaded.meta


def _merged_model(dirs: list[str], weights: list[float]):
    loaded = [load_weights(d) for d in dirs]
    for d, lw in zip(dirs[1:], loaded[1:]):
        if lw.config != loaded[0].config:
            raise CheckpointError(f"{d}: its model config differs from {dirs[0]}'s; merged models must share one "
                                  f"architecture")
    trunk = merge_state_dicts([lw.trunk for lw in loaded], weights)
    heads = merge_state_dicts([lw.heads for lw in loaded], weights) if loaded[0].heads else {}
    return build_gpt(dataclasses.replace(loaded[0], trunk=trunk), dirs[0]), heads, loaded[0].meta


def merge(hp: MergeHParams, *, save_dir: Path) -> Path:
    """Merge `hp.models` with `hp.weights` into `save_dir`: adapters when every directory holds
    one (and `hp.adapters` is not 'off'), else whole models."""
    dirs, weights = hp.model_list(), hp.weight_list()
    of_adapters = hp.adapters != "off" and all(lora.is_adapter_dir(d) for d in dirs)
    if of_adapters:
        gpt, heads, meta = _merged_adapter_model(hp, dirs, weights, save_dir)
    else:
        gpt, heads, meta = _merged_model(dirs, weights)
    save_model(save_dir, gpt=gpt, heads=heads, meta={**meta, "merged_from": dirs, "weights": weights})
    print0(f"merged {len(dirs)} {f'adapters ({hp.adapters})' if of_adapters else 'models'} "
           f"(weights {', '.join(f'{w:g}' for w in weights)}) into {save_dir}")
    return save_dir


def train(hp: MergeHParams, *, exp_name: str) -> Path:
    """`launch.py merge`: validate, then merge into `hp.save_dir` or runs/<exp_name>."""
    hp.validate()
    return merge(hp, save_dir=Path(hp.save_dir or Path("runs") / exp_name))
