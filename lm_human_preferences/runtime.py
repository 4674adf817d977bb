"""What every trainer process shares: ranks and devices, seeds, precision, the run directory,
logging and resumable checkpoints. Trainers build one `Run` and ask it for these.

Run directory (the stable contract, see the README):
    hparams.json        resolved config          metrics.jsonl   one object per logged step
    samples.jsonl       decoded samples          checkpoints/    step_000010.pt + .sha256
    model.safetensors + config.json              the final model

Randomness is derived, not carried: every update draws from generators seeded by
(seed, rank, purpose, update), so a resumed run repeats an uninterrupted one without saving
RNG states.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from lm_human_preferences import distributed
from lm_human_preferences.hparams import HParams, HParamsError
from lm_human_preferences.logs import Logger, print0

PURPOSES = {"queries": 1, "sample": 2, "shuffle": 3, "init": 4, "labels": 5}


@dataclass
class RunHParams(HParams):
    seed: int = 0
    save_dir: str = ""  # default runs/<experiment>
    device: str = "auto"  # auto | cpu | cuda
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    wandb: Literal["auto", "on", "off"] = "auto"
    log_interval: int = 1
    save_interval: int = 0  # updates between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | never | PATH to a checkpoint file
    data_dir: str = "datasets"  # prepared query datasets and the label cache

    def _validate(self):
        for key in ("log_interval", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise HParamsError("must be >= 1", key=key)
        if self.save_interval < 0:
            raise HParamsError("must be >= 0", key="save_interval")


class CheckpointCorrupt(RuntimeError):
    pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_verified(path: Path) -> dict:
    """A checkpoint whose sha256 matches the one recorded beside it (weights_only: no pickle)."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise CheckpointCorrupt(f"{path}: no {sidecar.name} beside it (an interrupted write?)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sidecar.read_text().strip():
        raise CheckpointCorrupt(f"{path}: contents do not match {sidecar.name} (truncated or corrupt)")
    import io
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class Run:
    def __init__(self, hp: RunHParams, *, exp_name: str, config: HParams):
        self.hp, self.config = hp, config
        self._owns_group = distributed.get_world_size() == 1  # else a caller's group is reused
        self.dist = distributed.init(hp.device)
        self.device = self.dist.device
        self.rank, self.world_size, self.is_main = self.dist.rank, self.dist.world_size, self.dist.is_main
        self.save_dir = Path(hp.save_dir or f"runs/{exp_name}")
        self.exp_name = exp_name
        dtype = hp.dtype if hp.dtype != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.bf16 = dtype == "bf16"
        torch.manual_seed(distributed.seed_for_rank(hp.seed, self.rank))
        self.logger: Logger | None = None

    # ---- randomness -------------------------------------------------------------------
    def generator(self, purpose: str, step: int = 0, *, shared: bool = False) -> torch.Generator:
        """A generator for one purpose and step; `shared` ones are equal on every rank."""
        rank_seed = distributed.seed_for_rank(self.hp.seed, 0 if shared else self.rank)
        seed = (rank_seed * 1_000_003 + PURPOSES[purpose] * 7919 + step) % (2**63)
        device = self.device if purpose == "sample" else "cpu"
        return torch.Generator(device=device).manual_seed(seed)

    # ---- precision and distribution ---------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    def no_sync(self, module: torch.nn.Module, *, sync: bool):
        """Skip DDP's gradient all-reduce unless `sync` (the last micro-batch of a step)."""
        return module.no_sync() if (not sync and self.world_size > 1) else contextlib.nullcontext()

    def per_rank(self, global_size: int, what: str) -> int:
        if global_size % self.world_size:
            raise HParamsError(f"{global_size} is not divisible by the {self.world_size} ranks", key=what)
        return global_size // self.world_size

    # ---- run directory ----------------------------------------------------------------
    def start(self, *, resume_step: int | None = None) -> Logger:
        """Create the run directory and the logger; call once inputs are validated."""
        if self.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.save_dir / "hparams.json",
                               (json.dumps(self.config.to_dict(), indent=2) + "\n").encode())
        distributed.barrier()
        self.logger = Logger(self.save_dir, enabled=self.is_main, wandb=self.hp.wandb,
                             run_name=self.exp_name, config=self.config.flat_items(), resume_step=resume_step)
        return self.logger

    def close(self):
        if self.logger is not None:
            self.logger.close()
        if self._owns_group:
            distributed.cleanup()

    # ---- checkpoints ------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.save_dir / "checkpoints"

    def save_checkpoint(self, step: int, state: dict) -> None:
        """Rank 0 writes `checkpoints/step_{step:06d}.pt` and its sha256, then prunes old ones."""
        if self.is_main:
            import io
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
            path = self.checkpoint_dir / f"step_{step:06d}.pt"
            atomic_write_bytes(path, data)
            atomic_write_bytes(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
            for old in sorted(self.checkpoint_dir.glob("step_*.pt"))[:-self.hp.keep_checkpoints]:
                old.unlink()
                old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        distributed.barrier()

    def load_checkpoint(self) -> dict | None:
        """The newest good checkpoint per `run.resume` (auto | never | PATH), or None."""
        if self.hp.resume == "never":
            return None
        if self.hp.resume != "auto":
            return load_verified(Path(self.hp.resume))
        for path in sorted(self.checkpoint_dir.glob("step_*.pt"), reverse=True):
            try:
                state = load_verified(path)
            except CheckpointCorrupt as e:
                print0(f"warning: skipping {e}")
                continue
            print0(f"resuming from {path}")
            return state
        return None

    def finish(self, write_final) -> None:
        """Rank 0 runs `write_final(save_dir)`; then checkpoints are no longer needed."""
        if self.is_main:
            write_final(self.save_dir)
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        distributed.barrier()
