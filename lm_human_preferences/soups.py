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
The output directory is a run directory like every command's (`trainer.run_training`):
hparams.json, status.json, metrics.jsonl, and the merged model (loadable by every command as
`--model=DIR` or `--task.policy.initial_model=DIR`) with, for adapters, the merged adapter. Every
input is loaded and merged before the directory is touched, so bad input (a directory that
holds no model, models of other shapes, adapters trained on other bases, weights that do not
fit) is a one-paragraph error that leaves nothing behind; the final files are written
atomically. Rerunning a finished merge does nothing. Adapters are merged into the base model
their configs name (`base`; they must name the same one), unless `base` is given; the model's
heads are then the base model's (a policy's value head is not in its adapter).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm_human_preferences.hparams import HParams, HParamsError
from lm_human_preferences.language import lora
from lm_human_preferences.language.checkpoints import CheckpointError, build_gpt, load_weights, save_model
from lm_human_preferences.language.gpt import GPT
from lm_human_preferences.run_status import MODEL_FILES
from lm_human_preferences.runtime import Run, RunHParams
from lm_human_preferences.trainer import run_training

ADAPTER_MODES = ("separate", "product", "off")
ADAPTER_FILES = (lora.ADAPTER_FILE, lora.ADAPTER_CONFIG)


@dataclass
class MergeHParams(HParams):
    run: RunHParams = field(default_factory=RunHParams)  # the run directory (save_dir), seed, threads
    models: str = ""  # comma-separated model or adapter directories to merge (2 or more)
    weights: str = ""  # comma-separated weights >= 0, one per model, not all 0 (empty: uniform 1/K)
    adapters: str = "separate"  # separate (average A and B, as released), product (average B·A), off
    base: str = ""  # the base model adapters are merged into (empty: the one their configs name)
    save_dir: str = ""  # where the merged model goes, as --run.save_dir (empty: runs/<experiment>)

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
        bad = next((w for w in weights if not (math.isfinite(w) and w >= 0)), None)
        if bad is not None:
            raise HParamsError(f"{bad:g} is not a weight: expected finite numbers >= 0 (a soup weighs its models, "
                               f"got {self.weights!r})", key="weights")
        if sum(weights) == 0:
            raise HParamsError(f"the weights {self.weights!r} sum to 0; give at least one model a weight above 0",
                               key="weights")
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
        if self.save_dir and self.run.save_dir and Path(self.save_dir) != Path(self.run.save_dir):
            raise HParamsError(f"{self.save_dir} and --run.save_dir={self.run.save_dir} differ; give one of them",
                               key="save_dir")

    def of_adapters(self) -> bool:
        """Whether the adapters are merged: every input holds one and `adapters` is not off."""
        return self.adapters != "off" and all(lora.is_adapter_dir(d) for d in self.model_list())


def merge_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float], *,
                      names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Σ_k weights[k] · states[k][name] for every name (fp32), computed as (Σ_k w_k) θ_1 + Σ_k w_k (θ_k - θ_1),
    so that identical models merge to themselves and weights (1, 0, ...) give the first model,
    bit for bit. The states must hold the same names and shapes (`names`: what errors call the
    states; default "model k")."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"{len(states)} state dicts and {len(weights)} weights")
    called = names or [f"model {i + 1}" for i in range(len(states))]
    keys = list(states[0])
    for i, sd in enumerate(states[1:], 1):
        if set(sd) != set(keys):
            odd = sorted(set(sd) ^ set(keys))[:4]
            raise CheckpointError(f"{called[i]} has other tensors than {called[0]} (differences: {', '.join(odd)})")
        shapes = [n for n in keys if sd[n].shape != states[0][n].shape]
        if shapes:
            raise CheckpointError(f"{called[i]}'s {shapes[0]} is {list(sd[shapes[0]].shape)}, {called[0]}'s "
                                  f"{list(states[0][shapes[0]].shape)}")
    merged = {}
    for name in keys:
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


def same_base(dirs: list[str], configs: list[dict]) -> None:
    """Adapters merged into one model must have been trained on one base: the bases their configs
    name (where they name one) must be the same directory."""
    named = [(d, c["base"]) for d, c in zip(dirs, configs) if c.get("base")]
    for d, base in named[1:]:
        if Path(base).resolve() != Path(named[0][1]).resolve():
            raise CheckpointError(f"{Path(d) / lora.ADAPTER_CONFIG}: its base is {base}, while "
                                  f"{Path(named[0][0]) / lora.ADAPTER_CONFIG} names {named[0][1]}; adapters of "
                                  f"other bases do not add up (merge the full models with --adapters=off)")


def merge_adapters(dirs: list[str], weights: list[float], *, mode: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of the soup of the adapters in `dirs` (see the module docstring)."""
    loaded = [lora.load_adapter(d) for d in dirs]
    configs, tensors = [c for c, _ in loaded], [t for _, t in loaded]
    same_base(dirs, configs)
    if mode == "product":
        return product_adapter(configs, tensors, weights)
    for i, c in enumerate(configs[1:], 1):
        if (c["rank"], float(c["alpha"]), c["layers"]) != (configs[0]["rank"], float(configs[0]["alpha"]),
                                                             configs[0]["layers"]):
            raise CheckpointError(f"{dirs[i]}: rank, alpha or layers differ from {dirs[0]}'s; averaging A and B "
                                  f"separately needs the same ones (use --adapters=product)")
    return configs[0], merge_state_dicts(tensors, weights, names=[f"{d}'s adapter" for d in dirs])


@dataclass
class Merged:
    """A soup, in memory until `Merger.save` writes it: the model, its heads and config, and
    for adapters the merged adapter's (config, tensors)."""

    gpt: GPT
    heads: dict[str, torch.Tensor]
    meta: dict
    adapter: tuple[dict, dict[str, torch.Tensor]] | None = None


def merged_adapter_model(hp: MergeHParams, dirs: list[str], weights: list[float]) -> Merged:
    """The base model with the soup of the adapters merged in, and the soup adapter."""
    config, tensors = merge_adapters(dirs, weights, mode=hp.adapters)
    base = hp.base or config.get("base")
    if not base:
        raise HParamsError(f"{dirs[0]}: its adapter config names no base model; pass --base=DIR", key="base")
    loaded = load_weights(base)
    gpt = build_gpt(loaded, base)
    lora.load_lora(gpt, config, tensors)
    own = {k: v for k, v in config.items() if k not in ("rank", "alpha", "dropout", "layers")}
    meta = {**own, "base": str(base), "merged_from": dirs, "weights": weights, "adapters": hp.adapters}
    adapter = lora.adapter_config(gpt, meta), lora.adapter_state_dict(gpt)
    return Merged(lora.merge_lora(gpt), loaded.heads, loaded.meta, adapter)


def merged_model(dirs: list[str], weights: list[float]) -> Merged:
    loaded = [load_weights(d) for d in dirs]
    for d, lw in zip(dirs[1:], loaded[1:]):
        if lw.config != loaded[0].config:
            raise CheckpointError(f"{d}: its model config differs from {dirs[0]}'s; merged models must share one "
                                  f"architecture")
    trunk = merge_state_dicts([lw.trunk for lw in loaded], weights, names=dirs)
    heads = (merge_state_dicts([lw.heads for lw in loaded], weights, names=[f"{d}'s heads" for d in dirs])
             if any(lw.heads for lw in loaded) else {})
    return Merged(build_gpt(dataclasses.replace(loaded[0], trunk=trunk), dirs[0]), heads, loaded[0].meta)


class Merger:
    """`merge` as a trainer of `trainer.run_training`: no steps; `save` writes the soup."""

    checkpoints, steps_done = False, 0

    def __init__(self, hp: MergeHParams, merged: Merged):
        self.hp, self.merged, self.model = hp, merged, merged.gpt  # `Run.finish` checks the model finite

    def train(self, logger) -> dict[str, float]:
        stats = {"merge/models": len(self.hp.model_list()), "merge/adapters": float(self.merged.adapter is not None)}
        logger.log(0, stats)
        return stats

    def save(self, save_dir: Path) -> None:
        m, dirs = self.merged, self.hp.model_list()
        if m.adapter is not None:
            lora.write_adapter(save_dir, *m.adapter)
        else:  # a model soup: no adapter of an earlier merge into this directory stays beside it
            for name in ADAPTER_FILES:
                (save_dir / name).unlink(missing_ok=True)
        save_model(save_dir, gpt=m.gpt, heads=m.heads,
                   meta={**m.meta, "merged_from": dirs, "weights": self.hp.weight_list()})

    def saved(self, final: dict[str, float]) -> str:
        what = f"adapters ({self.hp.adapters})" if self.merged.adapter is not None else "models"
        weights = ", ".join(f"{w:g}" for w in self.hp.weight_list())
        return f"merged {len(self.hp.model_list())} {what} (weights {weights}) into {self.hp.run.save_dir}"


def build_merger(hp: MergeHParams, run: Run) -> Merger:
    """Load and merge every input (nothing is written yet): adapters when every directory holds
    one (and `hp.adapters` is not 'off'), else whole models."""
    dirs, weights = hp.model_list(), hp.weight_list()
    merged = merged_adapter_model(hp, dirs, weights) if hp.of_adapters() else merged_model(dirs, weights)
    return Merger(hp, merged)


def train(hp: MergeHParams, *, exp_name: str) -> Path:
    """`launch.py merge`: the soup of `hp.models` into the run directory (`save_dir`, else
    `run.save_dir`, else runs/<exp_name>); returns it."""
    hp.validate()
    hp.run.save_dir, hp.save_dir = hp.save_dir or hp.run.save_dir or str(Path("runs") / exp_name), ""  # one key
    outputs = MODEL_FILES + (ADAPTER_FILES if hp.of_adapters() else ())
    return run_training(hp, exp_name=exp_name, build=lambda run: build_merger(hp, run), outputs=outputs)
