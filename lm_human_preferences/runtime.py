"""What every trainer process shares: ranks and devices, seeds, precision, the run directory,
logging and resumable checkpoints. Trainers build one `Run` and ask it for these.

Compute setup is the command's, not the run's: the first `Run` of a command creates the process
group (`distributed.init`), every later one reuses it, and `Run.close` leaves it alone; the
command destroys it once at the end (`distributed.cleanup`, which launch.py calls).

Run directory (the stable contract, see the README):
    hparams.json        resolved config          metrics.jsonl   one object per logged step
    samples.jsonl       decoded samples          checkpoints/    step_000010.pt + .sha256
    model.safetensors + config.json              the final model

Randomness is derived, not carried: every update draws from generators seeded by
(seed, rank, purpose, update), so a resumed run repeats an uninterrupted one without saving
RNG states.

Before each optimizer step trainers ask `Run.finite_or_skip` whether the loss and the gradient
norm are finite on every rank; if not, every rank stops with a FloatingPointError naming the
step and the statistic, or with `run.skip_nonfinite` skips that batch and counts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from lm_human_preferences import distributed
from lm_human_preferences.hparams import HParams, HParamsError, check_count, check_number
from lm_human_preferences.language.checkpoints import CheckpointError, load_failure, one_line, temp_file_beside
from lm_human_preferences.language.gpt import GPT
from lm_human_preferences.logs import Logger, print0

PURPOSES = {"queries": 1, "sample": 2, "shuffle": 3, "init": 4, "labels": 5}
SAMPLING_PURPOSES = ("sample", "labels")  # generators that `language.sample` draws from
CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt")
M = TypeVar("M", bound=torch.nn.Module)


@dataclass
class RunHParams(HParams):
    seed: int = 0  # seed of every random draw (each rank and purpose derives its own)
    save_dir: str = ""  # the run directory (empty: runs/<experiment>)
    device: str = "auto"  # auto | cpu | cuda
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    tf32: bool = True  # bf16 on CUDA: fp32 matmuls (the LM head) use TF32 tensor cores, fp32 outputs
    compile: bool = False  # torch.compile the transformer blocks of full passes (for GPUs; see GPT.compile_blocks)
    wandb: Literal["auto", "on", "off"] = "auto"  # also log to wandb: auto (when installed and logged in) | on | off
    log_interval: int = 1  # updates between rows of metrics.jsonl and samples.jsonl
    save_interval: int = 0  # updates between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep
    resume: str = "auto"  # auto | never (start over, dropping old checkpoints) | PATH to a checkpoint file
    data_dir: str = "datasets"  # prepared query datasets and the label cache
    skip_nonfinite: bool = False  # skip a batch with a non-finite loss or gradient instead of stopping
    timeout_s: float = 600.0  # how long any wait for the other ranks (joining, collectives) may last
    threads: int = 0  # torch's CPU threads (0: its default); hparams.json records the number used

    def _validate(self):
        check_count(self, "seed", at_least=0, at_most=2**32 - 1)
        for key in ("log_interval", "keep_checkpoints"):
            check_count(self, key)
        check_count(self, "save_interval", at_least=0)
        check_count(self, "threads", at_least=0, at_most=1024)
        check_number(self, "timeout_s", above=0, at_most=7 * 24 * 3600)
        try:
            device = torch.device(self.device) if self.device != "auto" else None
        except RuntimeError:
            raise HParamsError("expected auto, cpu, cuda or cuda:N", key="device") from None
        if device is not None and device.type == "cuda" and not torch.cuda.is_available():
            raise HParamsError("CUDA is not available on this machine; use cpu or auto", key="device")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_file():
            raise HParamsError(f"expected auto, never or a checkpoint file; there is no file {self.resume!r}",
                               key="resume")
        if self.compile and torch_version() < (2, 5):
            raise HParamsError(f"needs torch >= 2.5 (this is {torch.__version__})", key="compile")
        if self.wandb == "on" and importlib.util.find_spec("wandb") is None:
            raise HParamsError("the wandb package is not installed: `pip install wandb`, or pass --run.wandb=auto "
                               "(wandb when installed and logged in) or off; metrics.jsonl is written either way",
                               key="wandb")


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from the heap and keep what is freed there,
    instead of mapping and unmapping each one. A CPU training step allocates and frees
    vocabulary-sized buffers (the 154 MB tied-embedding gradient, 77 MB logits temporaries), and
    with glibc's defaults each is page-faulted in afresh: measured 7% (fp32) and 22% (bf16) of a
    124M training step (BENCHMARKS.md). The cost: the process keeps its peak heap until it exits.

    The command line calls this once at start-up. It does nothing (and returns False) when
    GLIBC_TUNABLES already sets a malloc tunable, which is how to keep glibc's own behaviour, or
    when the C library is not glibc."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def add_scalars(acc: dict[str, torch.Tensor], new: dict[str, torch.Tensor], *, divide_by: float = 1) -> None:
    """acc[k] += new[k] / divide_by for scalar tensors, in float64 on their device: statistics
    summed over micro-batches without reading each one back to the host (a GPU sync apiece)."""
    for k, v in new.items():
        term = v.detach().double() / divide_by
        acc[k] = acc[k] + term if k in acc else term


def to_floats(acc: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors -> Python floats with a single host read."""
    return dict(zip(acc, torch.stack(list(acc.values())).tolist())) if acc else {}


# Run settings that change how a run executes, not what it computes: a run resumes, or counts
# as finished, under other values of these.
OPERATIONAL_SETTINGS = frozenset({"save_dir", "device", "dtype", "tf32", "compile", "wandb", "log_interval",
                                  "save_interval", "keep_checkpoints", "resume", "data_dir", "timeout_s",
                                  "skip_nonfinite", "threads"})


def _flatten(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def changed_settings(saved: Path, config: HParams) -> list[str]:
    """'key: saved -> now' for each setting of `config` that differs from the hparams.json a run
    saved (`saved`); run settings in OPERATIONAL_SETTINGS, and keys only one side has (another
    version of the library), aside. [] without a readable file."""
    try:
        old = _flatten(json.loads(saved.read_text()))
    except (OSError, ValueError, AttributeError):
        return []
    new = _flatten(json.loads(json.dumps(config.to_dict())))
    changed = []
    for key in sorted(old.keys() & new.keys()):
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] == "run" and parts[-1] in OPERATIONAL_SETTINGS:
            continue
        if old[key] != new[key]:
            changed.append(f"{key}: {json.dumps(old[key])} -> {json.dumps(new[key])}")
    return changed


def list_changes(changed: list[str], most: int = 4) -> str:
    """`changed_settings` output for a message: the first few, and how many more."""
    return "; ".join(changed[:most]) + (f"; and {len(changed) - most} more" if len(changed) > most else "")


def use_threads(hp: RunHParams) -> int | None:
    """Apply `run.threads` and record in it the number of CPU threads torch uses, which
    hparams.json then holds (see `other_threads`). Returns the number before when it changed it
    (`Run.close` restores it), else None."""
    before = torch.get_num_threads()
    if hp.threads and hp.threads != before:
        torch.set_num_threads(hp.threads)
    hp.threads = torch.get_num_threads()
    return before if hp.threads != before else None


def other_threads(checkpoint: Path, threads: int) -> str | None:
    """A warning when `checkpoint`'s run (its hparams.json) used other than `threads` CPU threads:
    CPU kernels split their sums by thread count, so the resumed run is not bitwise the one an
    uninterrupted run gives (it is otherwise fine). None when they agree or are not recorded."""
    try:
        before = json.loads((checkpoint.parent.parent / "hparams.json").read_text())["run"]["threads"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(before, int) or before in (0, threads):
        return None
    return (f"warning: {checkpoint} was written with {before} CPU threads, this process has {threads}: the "
            f"run goes on, but not bitwise as one uninterrupted run (rerun with --run.threads={before} for that)")


class CheckpointCorrupt(CheckpointError):
    """A training checkpoint that is missing, truncated, unverifiable or unreadable."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
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
    if not path.is_file():
        raise CheckpointCorrupt(f"{path}: no such checkpoint file")
    if not sidecar.is_file():
        raise CheckpointCorrupt(f"{path}: no {sidecar.name} beside it (an interrupted write?)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sidecar.read_text(errors="replace").strip():
        raise CheckpointCorrupt(f"{path}: contents do not match {sidecar.name} (truncated or corrupt)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or a pickle payload weights_only refused
        raise CheckpointCorrupt(f"{path}: not a readable checkpoint ({load_failure(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointCorrupt(f"{path}: not a training checkpoint (a {type(state).__name__}, not a dict)")
    return state


class Run:
    def __init__(self, hp: RunHParams, *, exp_name: str, config: HParams):
        self.hp, self.config = hp, config
        # The command's one process group: created by its first Run, reused by every later one
        # (pipeline stages, a trainer started by another) and destroyed when the command ends.
        self.dist = distributed.init(hp.device, timeout_s=hp.timeout_s)
        self.device = self.dist.device
        self.rank, self.world_size, self.is_main = self.dist.rank, self.dist.world_size, self.dist.is_main
        self.save_dir = Path(hp.save_dir or f"runs/{exp_name}")
        self.exp_name = exp_name
        dtype = hp.dtype if hp.dtype != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.bf16 = dtype == "bf16"
        self._tf32_before = torch.backends.cuda.matmul.allow_tf32  # restored by `close`
        if self.bf16 and self.device.type == "cuda" and hp.tf32:
            # The LM head stays fp32 for exact-enough logprobs (see language/gpt.py); TF32 rounds
            # its inputs to 10 mantissa bits (bf16 has 7) but keeps fp32 sums and outputs.
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(distributed.seed_for_rank(hp.seed, self.rank))
        self._threads_before = use_threads(hp)
        self.logger: Logger | None = None
        self.resumed_from: Path | None = None
        self.skipped_batches = 0  # batches skipped by `finite_or_skip`; trainers checkpoint it

    # ---- randomness -------------------------------------------------------------------
    def generator(self, purpose: str, step: int = 0, *, shared: bool = False) -> torch.Generator:
        """A generator for one purpose and step; `shared` ones are equal on every rank."""
        rank_seed = distributed.seed_for_rank(self.hp.seed, 0 if shared else self.rank)
        seed = (rank_seed * 1_000_003 + PURPOSES[purpose] * 7919 + step) % (2**63)
        # Sampling draws on the logits' device, which needs a generator there.
        device = self.device if purpose in SAMPLING_PURPOSES else "cpu"
        return torch.Generator(device=device).manual_seed(seed)

    # ---- precision and distribution ---------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def place(self, module: M) -> M:
        """`module` moved to the run's device, with its GPT trunks compiled under `compile`."""
        module = module.to(self.device)
        if self.hp.compile:
            for m in module.modules():
                if isinstance(m, GPT):
                    m.compile_blocks()
        return module

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

    # ---- numerical guard ----------------------------------------------------------------
    def finite_or_skip(self, step: int, *, losses: dict[str, float],
                       parameters: Iterable[torch.nn.Parameter]) -> bool:
        """Call between backward and the optimizer step: True when `losses` and the gradient norm
        of `parameters` are finite on every rank. Otherwise, on every rank alike, False with
        `run.skip_nonfinite` (skip the optimizer step; counted in `skipped_batches`), else a
        FloatingPointError naming the step (as metrics.jsonl counts them) and the statistic."""
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        grads = [p.grad.detach() for p in parameters if p.grad is not None]
        if grads and not bad:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # a few kernels, not one per tensor
            if not math.isfinite(float(norm)):
                bad.append("gradient norm")
        if not distributed.any_rank(bool(bad)):
            return True
        what = f"non-finite {' and '.join(bad)}" + (f" on rank {self.rank}" if bad else " on another rank")
        if self.hp.skip_nonfinite:
            self.skipped_batches += 1
            print0(f"warning: step {step}: {what}; batch skipped ({self.skipped_batches} so far)", file=sys.stderr)
            return False
        kept = ("rerun to resume from its last checkpoint" if self.checkpoints() else
                "it saved no checkpoint (--run.save_interval), so a rerun starts over")
        raise FloatingPointError(f"step {step}: {what}; the run stopped ({kept}, or pass "
                                 f"--run.skip_nonfinite=true to skip such batches)")

    # ---- run directory ----------------------------------------------------------------
    def start(self, *, resume_step: int | None = None) -> Logger:
        """Create the run directory and the logger; call once inputs are validated."""
        if self.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.save_dir / "hparams.json",
                               (json.dumps(self.config.to_dict(), indent=2) + "\n").encode())
            self._drop_checkpoints_after(-1 if resume_step is None else resume_step)
        distributed.barrier()
        self.logger = Logger(self.save_dir, enabled=self.is_main, wandb=self.hp.wandb,
                             run_name=self.exp_name, config=self.config.flat_items(), resume_step=resume_step)
        return self.logger

    def close(self):
        torch.backends.cuda.matmul.allow_tf32 = self._tf32_before
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
        if self.logger is not None:
            self.logger.close()

    # ---- checkpoints ------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.save_dir / "checkpoints"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every `checkpoints/step_*.pt`, oldest first."""
        found = [(int(m.group(1)), p) for p in self.checkpoint_dir.glob("step_*.pt")
                 if (m := CHECKPOINT_NAME.fullmatch(p.name))]
        return sorted(found)

    @staticmethod
    def _remove_checkpoint(path: Path) -> None:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)

    def _drop_checkpoints_after(self, step: int) -> None:
        """A run starting at `step` abandons later checkpoints (an earlier run's, a corrupt one)
        and the temporary files of writes a crash interrupted."""
        for s, path in self.checkpoints():
            if s > step:
                self._remove_checkpoint(path)
        for tmp in self.checkpoint_dir.glob(".step_*.tmp-*"):
            tmp.unlink(missing_ok=True)

    def save_checkpoint(self, step: int, state: dict) -> None:
        """Rank 0 writes `checkpoints/step_{step:06d}.pt` and its sha256 (each to a temporary file,
        then renamed), then keeps only the newest `run.keep_checkpoints`."""
        if self.is_main:
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
            path = self.checkpoint_dir / f"step_{step:06d}.pt"
            atomic_write_bytes(path, data)
            atomic_write_bytes(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
            for _, old in self.checkpoints()[:-self.hp.keep_checkpoints]:
                self._remove_checkpoint(old)
        distributed.barrier()

    def load_checkpoint(self) -> dict | None:
        """The newest good checkpoint per `run.resume` (auto | never | PATH), or None; its path
        goes to `resumed_from`. In auto mode a bad checkpoint is reported and an older one used."""
        if self.hp.resume == "never":
            return None
        candidates = ([Path(self.hp.resume)] if self.hp.resume != "auto"
                      else [path for _, path in reversed(self.checkpoints())])
        for path in candidates:
            try:
                state = load_verified(path)
            except CheckpointCorrupt as e:
                if self.hp.resume != "auto":
                    raise CheckpointCorrupt(f"--run.resume: {e}") from None
                print0(f"warning: skipping bad checkpoint {e}", file=sys.stderr)
                continue
            changed = changed_settings(path.parent.parent / "hparams.json", self.config)
            if changed:
                raise HParamsError(f"{path}: its run was started with other settings ({list_changes(changed)}); "
                                   f"rerun with those to resume it, or pass --run.resume=never to start over")
            self.resumed_from = path
            return state
        return None

    def resume(self, load_state_dict: Callable[[dict], None]) -> bool:
        """Load the checkpoint `load_checkpoint` picks with `load_state_dict`; False if none.
        A checkpoint that does not fit the trainer (another model, another config) is a
        CheckpointError naming it."""
        state = self.load_checkpoint()
        if state is None:
            return False
        try:
            load_state_dict(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{self.resumed_from}: does not fit this run ({type(e).__name__}: {one_line(e)}); "
                                  "pass --run.resume=PATH to another checkpoint, or --run.resume=never to start "
                                  "over") from None
        if self.device.type == "cpu" and (warning := other_threads(self.resumed_from, self.hp.threads)):
            print0(warning, file=sys.stderr)
        print0(f"resuming from {self.resumed_from}")
        return True

    def already_finished(self, output: str = "config.json") -> bool:
        """Under `run.resume=auto`, True when the run directory holds this run's final `output`
        (a model's config.json, written by `finish`) and no checkpoint: rerunning a finished
        command does nothing. With other settings than the finished run's, an error saying so."""
        if self.hp.resume != "auto" or not (self.save_dir / output).is_file() or self.checkpoints():
            return False
        changed = changed_settings(self.save_dir / "hparams.json", self.config)
        if changed:
            raise HParamsError(f"{self.save_dir} holds a finished run with other settings "
                               f"({list_changes(changed)}); pass --run.resume=never to train it again with "
                               f"these, or choose another experiment name or --run.save_dir")
        print0(f"{self.save_dir} holds this run, finished; nothing to do (--run.resume=never trains it again)")
        return True

    def finish(self, write_final) -> None:
        """Rank 0 runs `write_final(save_dir)`; then checkpoints are no longer needed."""
        if self.is_main:
            write_final(self.save_dir)
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        distributed.barrier()
