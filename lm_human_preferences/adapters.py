"""LoRA in the trainers: the `lora` section every trainer takes, and the two calls they make.

    python launch.py train_policy offline_sentiment p --lora=on --lora.rank=4 --lora.targets=c_attn,mlp.c_fc

    gpt = adapters.attach(gpt, hp.lora, seed=hp.run.seed)          # where a trainer builds its model
    adapters.save_model(save_dir, gpt=gpt, heads=..., meta=..., lora=hp.lora, base=initial_model)

With `--lora=on` the trainer (train_sft, train_reward, train_policy) trains low-rank adapters
(`language/lora.py`) on the target layers of its GPT and nothing else of the GPT (a reward
model's head and a policy's value head still train). Its output directory then holds the
model with the adapters merged in (`model.safetensors`, loadable wherever a model is) and the
adapters alone (`adapter.safetensors` + `adapter_config.json`, whose `base` names the model
they apply to), which `launch.py merge` averages. Resuming restores the adapters with the rest
of the training state. With `--lora=off` (the default) nothing changes.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lm_human_preferences.hparams import HParams, HParamsError, check_count, check_number
from lm_human_preferences.language import checkpoints, lora
from lm_human_preferences.language.gpt import GPT


@dataclass
class LoRAHParams(HParams):
    rank: int = 8  # rank r of each adapter (A: r x in, B: out x r)
    alpha: float = 16.0  # the update is (alpha / rank) B A
    dropout: float = 0.05  # dropout on an adapter's input while training
    targets: str = "all"  # comma-separated layers: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, c_proj (both), or all

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def _validate(self):
        check_count(self, "rank")
        check_number(self, "alpha", above=0)
        check_number(self, "dropout", at_least=0, at_most=0.99)
        for target in self.target_list() or [""]:
            if target != "all" and not any(name == target or name.endswith("." + target)
                                           for name in lora.LINEAR_NAMES):
                raise HParamsError(f"{target!r} names no layer of a block; expected 'all' or comma-separated "
                                   f"ends of {', '.join(lora.LINEAR_NAMES)}", key="targets")


def attach(gpt: GPT, hp: LoRAHParams | None, *, seed: int) -> GPT:
    """`gpt` with new adapters on `hp.targets` (A drawn from `seed`, B zero) and its own weights
    frozen; `gpt` unchanged when `hp` is None (LoRA off)."""
    if hp is not None:
        lora.add_lora(gpt, rank=hp.rank, alpha=hp.alpha, dropout=hp.dropout, targets=hp.target_list(),
                      generator=torch.Generator().manual_seed(seed))
    return gpt


def save_model(out_dir: str | os.PathLike, *, gpt: GPT, heads: dict | None = None, meta: dict | None = None,
               lora_hp: LoRAHParams | None = None, base: str = "") -> Path:
    """`checkpoints.save_model`; with LoRA on, of a copy of `gpt` with its adapters merged, and
    the adapters alone beside it (`base`: the model they were trained on)."""
    if lora_hp is None:
        return checkpoints.save_model(out_dir, gpt=gpt, heads=heads, meta=meta)
    lora.save_adapter(out_dir, gpt, meta={"base": str(base)})
    merged = lora.merge_lora(copy.deepcopy(gpt).cpu())
    return checkpoints.save_model(out_dir, gpt=merged, heads=heads, meta={**(meta or {}), "lora": lora_hp.to_dict()})
