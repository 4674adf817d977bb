"""What a run directory says about its run, and how a run stops: status.json, whether a run
finished, the settings a run was started with, the messages that say what a rerun does, and
SIGINT/SIGTERM during training. `RunDir` (rundir.py) writes and reads the directory with these.

    status.json    {"state": "running"} from the moment a run starts writing its directory, then
                   {"state": S, "exit_status": N, "step": K, "error": "..."} when it ends:
                   finished (0), interrupted (130 after SIGINT, 143 after SIGTERM), nonfinite (3),
                   failed (2 for a user error, such as an unwritable run directory; 1 otherwise).

Rank 0 writes it, atomically. It is what `launch.py` exits with on rank 0; under torchrun, which
reports 1 whatever its ranks returned, it is the only record of that status. A run counts as
finished only when its status says so and its final outputs exist, so a model left by an
earlier run is never taken for the output of a later one. A directory written before
status.json existed counts as finished when it holds the final outputs and no checkpoint.

SIGINT and SIGTERM during training (`StopSignals`) ask the trainer to stop at the end of the
step: it saves a checkpoint there and stops with `Interrupted`; a second signal stops at once.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from lm_human_preferences.hparams import HParams, HParamsError
from lm_human_preferences.language.checkpoints import CheckpointError, atomic_write_bytes

STATUS_FILE = "status.json"
MODEL_FILES = ("model.safetensors", "config.json")  # a trainer's final outputs, written by `save_model`


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the command; it exits with `exit_status` (128 + the signal).
    The message, when there is one, is the line that says what a rerun does."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(*([message] if message else []))
        self.signum = signum
        self.exit_status = 128 + signum


def raise_interrupted(signum: int, frame) -> None:
    """A signal handler: stop like Ctrl-C does (launch.py installs it for SIGTERM)."""
    raise Interrupted(signum)


class RunDirError(Exception):
    """The run directory cannot be written (read-only, full, no permission): a user error."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors of the user's inputs and environment: one paragraph and exit status 2."""
    from lm_human_preferences.labels import LabelFileError
    from lm_human_preferences.language.datasets import QueryDatasetError
    from lm_human_preferences.language.encodings import EncodingError
    from lm_human_preferences.prompts import SampleError
    return (HParamsError, LabelFileError, CheckpointError, EncodingError, SampleError, QueryDatasetError,
            FileNotFoundError, RunDirError)


def ending(error: BaseException) -> tuple[str, int]:
    """(state, exit status) of a run that `error` stopped, as launch.py exits for it."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", getattr(error, "exit_status", 128 + signal.SIGINT)
    if isinstance(error, FloatingPointError):
        return "nonfinite", 3
    return "failed", 2 if isinstance(error, user_errors()) else 1


# ---- settings --------------------------------------------------------------------------------
# Run settings that change how a run executes, not what it computes: a run resumes, or counts
# as finished, under other values of these.
OPERATIONAL_SETTINGS = frozenset({"save_dir", "device", "dtype", "tf32", "compile", "wandb", "log_interval",
                                  "save_interval", "keep_checkpoints", "resume", "data_dir", "timeout_s",
                                  "skip_nonfinite", "max_skipped_in_a_row", "save_every_s",
                                  "keep_checkpoints_after_finish", "threads"})


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


# ---- the status file -------------------------------------------------------------------------
def write_status(save_dir: Path, state: str, **fields) -> None:
    atomic_write_bytes(save_dir / STATUS_FILE, (json.dumps({"state": state, **fields}) + "\n").encode())


def read_status(save_dir: Path) -> dict | None:
    """The status a run left in `save_dir`; None without status.json; {"state": "unreadable"} for a damaged one."""
    try:
        status = json.loads((save_dir / STATUS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"state": "unreadable"}
    return status if isinstance(status, dict) else {"state": "unreadable"}


def run_finished(save_dir: Path, outputs: Iterable[str] = MODEL_FILES) -> bool:
    """Whether `save_dir` holds a finished run: its `outputs` exist and status.json says finished
    (a directory without status.json, from an earlier version: the outputs and no checkpoint)."""
    if not all((save_dir / name).is_file() for name in outputs):
        return False
    status = read_status(save_dir)
    if status is None:
        return not any((save_dir / "checkpoints").glob("step_*.pt"))
    return status.get("state") == "finished"


# ---- what a rerun does -----------------------------------------------------------------------
def rerun_after_nonfinite(newest: int | None, *, save_interval: int) -> str:
    """The stop of a run at a non-finite value: from which checkpoint a rerun resumes, or why none."""
    if newest is not None:
        return f"rerun to resume from its last checkpoint, of step {newest}"
    if not save_interval:
        return "it saved no checkpoint (--run.save_interval), so a rerun starts over"
    return (f"it stopped before its first checkpoint, due after step {save_interval} (--run.save_interval), "
            f"so a rerun starts over")


def rerun_after_interrupt(newest: int | None) -> str:
    if newest is not None:
        return f"interrupted; rerun the same command to resume from its last checkpoint, of step {newest}"
    return "interrupted before its first checkpoint; rerunning the same command starts over"


def write_failure(error: OSError, *, doing: str, save_dir: Path, newest: int | None) -> str:
    """One paragraph for a write into the run directory that failed while `doing` something."""
    if newest is not None:
        kept = f"nothing was lost: its checkpoint of step {newest} stays, and a rerun resumes from it"
    elif doing == "starting the run":
        kept = "nothing was lost"
    else:
        kept = "the run had saved no checkpoint, so a rerun starts over"
    return (f"cannot write {error.filename or save_dir} ({error.strerror or error}) while {doing}; no partial "
            f"file is left, and {kept}. Free space or make {save_dir} writable (or pass --run.save_dir=DIR), "
            f"then rerun the same command")


# ---- signals ---------------------------------------------------------------------------------
class StopSignals:
    """While installed, SIGINT and SIGTERM set `pending` (the trainer stops at its next step
    boundary); a second one raises `Interrupted` at once. Only the main thread can install them."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *, announce: bool):
        self.announce = announce  # rank 0 says what happens
        self.pending = 0
        self.installed = False  # ever: the run stops at step boundaries
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        self.installed = True

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.pending:
            raise Interrupted(signum)
        self.pending = signum
        if self.announce:
            again = "interrupt again" if signum == signal.SIGINT else "send it again"
            print(f"\n{signal.Signals(signum).name}: stopping at the end of this step, after saving a checkpoint "
                  f"({again} to stop at once)", file=sys.stderr, flush=True)
