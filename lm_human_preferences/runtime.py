"""What every trainer process shares: ranks and devices, precision, seeds, distribution and
the numerical guard; trainers build one `Run` and ask it for these. A `Run` is also its run
directory (`rundir.RunDir`: outputs, checkpoints, resume, status.json).

Compute setup is the command's, not the run's: the first `Run` of a command creates the process
group (`distributed.init`), every later one reuses it, and `Run.close` leaves it alone; the
command destroys it once at the end (`distributed.cleanup`, which launch.py calls).

Randomness is derived, not carried: every update draws from generators seeded by
(seed, rank, purpose, update), so a resumed run repeats an uninterrupted one without saving
RNG states.

Before each optimizer step trainers ask `Run.finite_or_skip` whether the loss and the gradient
norm are finite on every rank; if not, every rank stops with a FloatingPointError naming the
step and the statistic, or with `run.skip_nonfinite` skips that batch and counts it (and stops
after more than `run.max_skipped_in_a_row` in a row; both counts go into their checkpoints
through `Run.guard_state`). After each step they call
`Run.step_boundary`, which checkpoints when due and stops the run after SIGINT or SIGTERM.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from lm_human_preferences import distributed
from lm_human_preferences.hparams import HParams, HParamsError, check_count, check_number
from lm_human_preferences.language.checkpoints import atomic_write_bytes  # noqa: F401 (the run files' writer)
from lm_human_preferences.language import kernels
from lm_human_preferences.language.devices import parse_device
from lm_human_preferences.language.gpt import GPT
from lm_human_preferences.logs import print0
from lm_human_preferences.rundir import RunDir

PURPOSES = {"queries": 1, "sample": 2, "shuffle": 3, "init": 4, "labels": 5, "omit_long": 6}
SAMPLING_PURPOSES = ("sample", "labels")  # generators that `language.sample` draws from
M = TypeVar("M", bound=torch.nn.Module)


@dataclass
class RunHParams(HParams):
    seed: int = 0  # seed of every random draw (each rank and purpose derives its own)
    save_dir: str = ""  # the run directory (empty: runs/<experiment>)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    tf32: bool = True  # bf16 on CUDA: fp32 matmuls (the LM head) use TF32 tensor cores, fp32 outputs
    compile: bool = False  # torch.compile the transformer blocks of full passes (for GPUs; see GPT.compile_blocks)
    wandb: Literal["auto", "on", "off"] = "auto"  # also log to wandb: auto (when installed and logged in) | on | off
    log_interval: int = 1  # updates between rows of metrics.jsonl and samples.jsonl
    save_interval: int = 0  # updates between checkpoints (0: none on a count; see save_every_s)
    save_every_s: float = 600.0  # also a checkpoint once this many seconds passed since the last (0: off)
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep
    keep_checkpoints_after_finish: bool = False  # a finished run keeps its checkpoints (default: deletes them)
    resume: str = "auto"  # auto | never (start over, dropping old checkpoints) | PATH to a checkpoint file
    data_dir: str = "datasets"  # prepared query datasets and the label cache
    skip_nonfinite: bool = False  # skip a batch with a non-finite loss or gradient instead of stopping
    max_skipped_in_a_row: int = 16  # skip_nonfinite: stop (status 3) when more batches in a row are skipped
    timeout_s: float = 600.0  # how long any wait for the other ranks (joining, collectives) may last
    threads: int = 0  # torch's CPU threads (0: its default); hparams.json records the number used
    # CPU fp32 training products: onednn (everywhere) or vendor (MKL on Intel CPUs: faster there)
    fp32_products: str = "onednn"

    def _validate(self):
        check_count(self, "seed", at_least=0, at_most=2**32 - 1)
        for key in ("log_interval", "keep_checkpoints", "max_skipped_in_a_row"):
            check_count(self, key)
        check_count(self, "save_interval", at_least=0)
        check_count(self, "threads", at_least=0, at_most=1024)
        if self.fp32_products not in kernels.FP32_PRODUCTS:
            raise HParamsError(f"expected one of {', '.join(kernels.FP32_PRODUCTS)}", key="fp32_products")
        check_number(self, "save_every_s", at_least=0)
        check_number(self, "timeout_s", above=0, at_most=7 * 24 * 3600)
        try:
            parse_device(self.device)
        except (ValueError, RuntimeError) as e:
            raise HParamsError(str(e), key="device") from None
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


class Run(RunDir):
    """A run's compute setup (device, precision, seeds, process group, threads) and, inherited,
    its run directory; `close` restores the process settings it changed."""

    def __init__(self, hp: RunHParams, *, exp_name: str, config: HParams):
        # The command's one process group: created by its first Run, reused by every later one
        # (pipeline stages, a trainer started by another) and destroyed when the command ends.
        self.dist = distributed.init(hp.device, timeout_s=hp.timeout_s)
        self.device = self.dist.device
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        super().__init__(hp, exp_name=exp_name, config=config, is_main=self.dist.is_main, clock=time.monotonic)
        dtype = hp.dtype if hp.dtype != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.bf16 = dtype == "bf16"
        self._tf32_before = torch.backends.cuda.matmul.allow_tf32  # restored by `close`
        if self.bf16 and self.device.type == "cuda" and hp.tf32:
            # The LM head stays fp32 for exact-enough logprobs (see language/gpt.py); TF32 rounds
            # its inputs to 10 mantissa bits (bf16 has 7) but keeps fp32 sums and outputs.
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(distributed.seed_for_rank(hp.seed, self.rank))
        self._threads_before = use_threads(hp)
        self._fp32_products_before = kernels.set_fp32_products(hp.fp32_products)
        self.skipped_batches = 0  # batches skipped by `finite_or_skip`; trainers checkpoint both (`guard_state`)
        self.skipped_in_a_row = 0

    def close(self):
        torch.backends.cuda.matmul.allow_tf32 = self._tf32_before
        kernels.set_fp32_products(self._fp32_products_before)
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
        super().close()

    def resume(self, load_state_dict: Callable[[dict], None]) -> bool:
        """`RunDir.resume`, with a warning when the checkpoint's run used other CPU threads."""
        if not super().resume(load_state_dict):
            return False
        if self.device.type == "cpu" and (warning := other_threads(self.resumed_from, self.hp.threads)):
            print0(warning, file=sys.stderr)
        return True

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
    def guard_state(self) -> dict:
        """`finite_or_skip`'s counts, for a trainer's checkpoint: a resumed run stops after as many
        skipped batches in a row as one that was never interrupted."""
        return {"skipped_batches": self.skipped_batches, "skipped_in_a_row": self.skipped_in_a_row}

    def load_guard_state(self, state: dict) -> None:
        """The counts of `guard_state` from a checkpoint's state (0 where it has none)."""
        self.skipped_batches = state.get("skipped_batches", 0)
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)

    def finite_or_skip(self, step: int, *, losses: dict[str, float],
                       parameters: Iterable[torch.nn.Parameter]) -> bool:
        """Call between backward and the optimizer step: True when `losses` and the gradient norm
        of `parameters` are finite on every rank. Otherwise, on every rank alike, False with
        `run.skip_nonfinite` (skip the optimizer step; counted in `skipped_batches`), else a
        FloatingPointError naming the step (as metrics.jsonl counts them) and the statistic; also
        that error once more than `run.max_skipped_in_a_row` batches in a row were skipped."""
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        grads = [p.grad.detach() for p in parameters if p.grad is not None]
        if grads and not bad:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # a few kernels, not one per tensor
            if not math.isfinite(float(norm)):
                bad.append("gradient norm")
        if not distributed.any_rank(bool(bad)):
            self.skipped_in_a_row = 0
            return True
        what = f"non-finite {' and '.join(bad)}" + (f" on rank {self.rank}" if bad else " on another rank")
        if not self.hp.skip_nonfinite:
            raise self.nonfinite_error(step, what, hint="or pass --run.skip_nonfinite=true to skip such batches")
        self.skipped_batches += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row > self.hp.max_skipped_in_a_row:
            raise self.nonfinite_error(step, f"{what}; {self.skipped_in_a_row} batches in a row skipped, more than "
                                             f"--run.max_skipped_in_a_row={self.hp.max_skipped_in_a_row}")
        print0(f"warning: step {step}: {what}; batch skipped ({self.skipped_batches} so far)", file=sys.stderr)
        return False
