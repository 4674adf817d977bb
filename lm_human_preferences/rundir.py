"""One run's directory: starting it, resumable checkpoints, resuming, finishing, and how the run
ended (status.json). `Run` (runtime.py) is a `RunDir` with the compute setup added.

    hparams.json        resolved config          metrics.jsonl   one object per logged step
    samples.jsonl       decoded samples          checkpoints/    step_000010.pt + .sha256
    model.safetensors + config.json              the final model
    status.json         running, or how the run ended and its exit status (see run_status)

Rank 0 writes every file; each rank raises alike what stopped the write (`RunDirError`, or a
FloatingPointError for a state with non-finite values, which is never saved). After each
training step trainers call `step_boundary`, which checkpoints when due and stops the run after
SIGINT or SIGTERM; every rank decides alike, in one collective.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lm_human_preferences import distributed
from lm_human_preferences.hparams import HParams, HParamsError
from lm_human_preferences.language.checkpoints import CheckpointError, atomic_write_bytes, load_failure, one_line
from lm_human_preferences.logs import Logger, print0
from lm_human_preferences.run_status import (MODEL_FILES, Interrupted, RunDirError, StopSignals, changed_settings,
                                             ending, list_changes, rerun_after_interrupt, rerun_after_nonfinite,
                                             run_finished, write_failure, write_status)

if TYPE_CHECKING:
    from lm_human_preferences.runtime import RunHParams

CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt")
# Files of writes a kill interrupted: `atomic_writer`'s, and metrics cut back by earlier versions.
TEMPORARY_FILES = (".*.tmp-*", "*.jsonl.tmp")


class CheckpointCorrupt(CheckpointError):
    """A training checkpoint that is missing, truncated, unverifiable or unreadable."""


class RunDir:
    def __init__(self, hp: RunHParams, *, exp_name: str, config: HParams, is_main: bool,
                 clock: Callable[[], float]):
        """`clock`: seconds, for `run.save_every_s` (time.monotonic)."""
        self.hp, self.config, self.exp_name, self.is_main = hp, config, exp_name, is_main
        self.save_dir = Path(hp.save_dir or f"runs/{exp_name}")
        self.logger: Logger | None = None
        self.resumed_from: Path | None = None
        self.step = 0  # steps done, as `step_boundary` was last told
        self.outputs = MODEL_FILES  # the final outputs, which `start` invalidates (see `already_finished`)
        self._started = False  # status.json says running: `stopped` records how the run ended
        self._signals = StopSignals(announce=is_main)
        self._clock = clock
        self._last_save = clock()

    def nonfinite_error(self, step: int, what: str, *, hint: str = "") -> FloatingPointError:
        """The error that stops the run at `step` (exit status 3), saying what a rerun does."""
        rerun = rerun_after_nonfinite(self.newest_checkpoint(), save_interval=self.hp.save_interval)
        return FloatingPointError(f"step {step}: {what}; the run stopped ({rerun}{', ' + hint if hint else ''})")

    # ---- start and end ------------------------------------------------------------------
    def start(self, *, resume_step: int | None = None, stop_at_step_end: bool = True) -> Logger:
        """Mark the run directory as running (status.json), remove a previous run's final outputs
        and the temporary files of interrupted writes, write hparams.json and create the logger;
        call once inputs are validated. With `stop_at_step_end`, SIGINT and SIGTERM stop the run
        at the next `step_boundary` (a trainer that has none passes False)."""
        self.step = resume_step or 0
        hparams = (json.dumps(self.config.to_dict(), indent=2) + "\n").encode()

        def prepare():
            prepare_run_dir(self.save_dir, outputs=self.outputs, hparams=hparams)
            self._drop_checkpoints_after(-1 if resume_step is None else resume_step)

        self._main_writes(prepare, doing="starting the run")
        self._started = True
        self.logger = Logger(self.save_dir, enabled=self.is_main, wandb=self.hp.wandb,
                             run_name=self.exp_name, config=self.config.flat_items(), resume_step=resume_step)
        if stop_at_step_end:
            self._signals.install()
        self._last_save = self._clock()
        return self.logger

    def _main_writes(self, write: Callable[[], None], *, doing: str) -> None:
        """Rank 0 runs `write`; then every rank raises what stopped it: a RunDirError for an
        OSError (the directory is read-only, full, ...), or its FloatingPointError."""
        failure = None
        if self.is_main:
            try:
                write()
            except OSError as e:
                failure = ("write", write_failure(e, doing=doing, save_dir=self.save_dir,
                                                  newest=self.newest_checkpoint()))
            except FloatingPointError as e:
                failure = ("nonfinite", str(e))
        failure = distributed.broadcast_object(failure)  # also the barrier after rank 0's writes
        if failure is not None:
            raise (RunDirError if failure[0] == "write" else FloatingPointError)(failure[1])

    def stopped(self, error: BaseException) -> None:
        """Call with the exception that stops the trainer, then re-raise it. A started run records
        how it ended in status.json (`run_status.ending`); an interrupt that does not say what a
        rerun does is given that line."""
        self._signals.uninstall()
        if not self._started:
            return
        state, status = ending(error)
        if isinstance(error, KeyboardInterrupt) and not str(error) and self._signals.installed:
            error.args = (rerun_after_interrupt(self.newest_checkpoint()),)
        if self.is_main:
            with contextlib.suppress(OSError):
                write_status(self.save_dir, state, exit_status=status, step=self.step, error=one_line(error))

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()

    def already_finished(self, *outputs: str) -> bool:
        """Under `run.resume=auto`, True when the run directory holds this run, finished (status.json
        says so and its final `outputs` exist; default: the model files `finish` writes): rerunning
        a finished command does nothing. With other settings than the finished run's, an error
        saying so. `outputs` are also what `start` removes before a new run writes them again."""
        self.outputs = outputs or MODEL_FILES
        if self.hp.resume != "auto" or not run_finished(self.save_dir, self.outputs):
            return False
        changed = changed_settings(self.save_dir / "hparams.json", self.config)
        if changed:
            raise HParamsError(f"{self.save_dir} holds a finished run with other settings "
                               f"({list_changes(changed)}); pass --run.resume=never to train it again with "
                               f"these, or choose another experiment name or --run.save_dir")
        print0(f"{self.save_dir} holds this run, finished; nothing to do (--run.resume=never trains it again)")
        return True

    def finish(self, write_final: Callable[[Path], object], *, model: torch.nn.Module | None = None) -> None:
        """Rank 0 checks that `model` is finite, runs `write_final(save_dir)`, records the run as
        finished (status.json) and deletes the checkpoints, unless `run.keep_checkpoints_after_finish`.
        A non-finite model is not saved: the run stops (FloatingPointError)."""
        self._signals.uninstall()
        if self._signals.pending:
            print0("no step was left to stop after; the run finishes", file=sys.stderr)

        def write():
            bad = nonfinite_names(model.state_dict()) if model is not None else ""
            if bad:
                raise self.nonfinite_error(self.step, f"non-finite parameters ({bad}); the model was not saved")
            write_final(self.save_dir)
            write_status(self.save_dir, "finished", exit_status=0, step=self.step)
            if not self.hp.keep_checkpoints_after_finish:
                shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

        self._main_writes(write, doing="saving the final outputs")

    # ---- checkpoints ------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.save_dir / "checkpoints"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every `checkpoints/step_*.pt`, oldest first."""
        found = [(int(m.group(1)), p) for p in self.checkpoint_dir.glob("step_*.pt")
                 if (m := CHECKPOINT_NAME.fullmatch(p.name))]
        return sorted(found)

    def newest_checkpoint(self) -> int | None:
        """The step of the newest checkpoint on disk, for messages (None: none, or unreadable)."""
        with contextlib.suppress(OSError):
            found = self.checkpoints()
            return found[-1][0] if found else None
        return None

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

    def step_boundary(self, step: int, total: int, state: Callable[[], dict]) -> None:
        """Call after each of `total` steps (`step` done so far). Before the last, saves
        `state()` as a checkpoint every `run.save_interval` steps, once `run.save_every_s` seconds
        passed since the last save, and when SIGINT or SIGTERM came: then it stops the run
        (`Interrupted`, exit status 130 or 143). Every rank decides alike, in one collective."""
        self.step = step
        if step >= total:
            return
        timed = self.hp.save_every_s > 0 and self._clock() - self._last_save >= self.hp.save_every_s
        signum, timed = distributed.all_reduce_max(torch.tensor([self._signals.pending, int(timed)])).tolist()
        if signum or timed or (self.hp.save_interval and step % self.hp.save_interval == 0):
            self.save_checkpoint(step, state())
        if signum:
            raise Interrupted(signum, f"interrupted after step {step}, saved as a checkpoint; rerun the same "
                                      f"command to resume from it")

    def save_checkpoint(self, step: int, state: dict) -> None:
        """Rank 0 writes `checkpoints/step_{step:06d}.pt` and its sha256 (each to a temporary file,
        then renamed), then keeps only the newest `run.keep_checkpoints`. A state with non-finite
        values is not saved: the run stops (FloatingPointError)."""
        path = self.checkpoint_dir / f"step_{step:06d}.pt"

        def write():
            bad = nonfinite_names(state)
            if bad:
                raise self.nonfinite_error(step, f"non-finite values in the training state ({bad}), which was not "
                                                 f"saved")
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
            try:
                atomic_write_bytes(path, data)
                atomic_write_bytes(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
            except OSError:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)  # not a checkpoint without its sha256
                raise
            for _, old in self.checkpoints()[:-self.hp.keep_checkpoints]:
                self._remove_checkpoint(old)

        self._main_writes(write, doing=f"saving the checkpoint of step {step}")
        self._last_save = self._clock()

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
        print0(f"resuming from {self.resumed_from}")
        return True


def prepare_run_dir(save_dir: Path, *, outputs: Iterable[str], hparams: bytes) -> None:
    """Mark `save_dir` as holding a running run, then remove the final `outputs` of an earlier
    run and the temporary files of writes a kill interrupted (the checkpoints' own are `RunDir`'s),
    and write `hparams` as hparams.json. A directory it created is removed again if that fails."""
    created = not save_dir.exists()
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        write_status(save_dir, "running")  # first: the outputs below are no longer this run's
        for name in outputs:
            (save_dir / name).unlink(missing_ok=True)
        for pattern in TEMPORARY_FILES:
            for tmp in save_dir.glob(pattern):
                tmp.unlink(missing_ok=True)
        atomic_write_bytes(save_dir / "hparams.json", hparams)
    except OSError:
        if created:  # leave no half-made run directory behind
            shutil.rmtree(save_dir, ignore_errors=True)
        raise


# ---- checkpoint files and non-finite values --------------------------------------------------
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


def nonfinite_names(state) -> str:
    """The names of the non-finite floating tensors and floats in a (nested) state dict, the
    first few joined for a message; "" when all are finite."""
    bad = _nonfinite(state, "")
    return ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")


def _nonfinite(state, prefix: str) -> list[str]:
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in _nonfinite(v, f"{prefix}{k}.")]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in _nonfinite(v, f"{prefix}{i}.")]
    name = prefix.rstrip(".")
    if isinstance(state, torch.Tensor):
        return [name] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, float):
        return [] if math.isfinite(state) else [name]
    return []
