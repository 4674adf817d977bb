"""Rank-0 logging: stdout, tqdm progress bars, ``metrics.jsonl``/``samples.jsonl``, optional wandb.

Only rank 0 writes anything: :func:`print0` and :func:`progress` check the rank themselves, and
trainers build ``Logger(save_dir, enabled=info.is_main, ...)`` so other ranks get a logger that
does nothing at all.  File format (the run-output contract of DESIGN.md)::

    metrics.jsonl   {"step": 12, "objective/score": 0.53, "objective/kl": 2.1, ...}   one per log()
    samples.jsonl   {"step": 12, "query": "...", "response": "...", "score": 0.8}     one per row

Every line is valid JSON: non-finite floats (NaN, inf) are written as ``null``; tensors and
numpy scalars become numbers/lists.  Each line is flushed as soon as it is written, so a crash
loses nothing that was already logged.  A fresh run starts both files empty; a resumed run
(``resume_step=N``) keeps the lines with ``step <= N`` and appends after them.

wandb is optional and imported lazily: ``wandb="off"`` never imports it, ``"on"`` requires it,
``"auto"`` uses it only when it is installed, ``WANDB_MODE`` is not ``disabled`` and either an
API key is available or ``WANDB_MODE=offline``.  A wandb start-up failure (no network, bad
key) prints one warning and the run continues with files only.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lm_human_preferences import distributed
from lm_human_preferences.language.checkpoints import atomic_write_bytes

__all__ = ["print0", "progress", "Logger", "summary_line", "to_jsonable"]

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
_WANDB_ID_FILE = "wandb_run_id.txt"
_WANDB_MODES = ("auto", "on", "off")


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushed by default)."""
    if distributed.is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    unit: str = "it",
):
    """A tqdm progress bar on stderr when ``enabled`` and on rank 0; otherwise a silent
    pass-through with the same interface (iteration, ``update(n)``, ``set_postfix(dict)``,
    ``set_description``, ``close()``, context manager)."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 10.0,  # a log file gets a line every 10 s
        disable=not (enabled and distributed.is_main()),
    )


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: non-finite floats -> None, tensors/numpy -> numbers/lists,
    tuples -> lists, mappings keep string keys; anything else unknown -> ``str(value)``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # torch.Tensor, numpy arrays and scalars
    if callable(tolist):
        return to_jsonable(tolist())
    return str(value)


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(to_jsonable(obj), allow_nan=False, ensure_ascii=False)


def _format_value(value: Any) -> str:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def summary_line(step: int, stats: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """A short one-line summary, e.g. ``"step 12 | objective/score 0.53 | objective/kl 2.1"``.

    ``keys`` picks and orders the stats shown (missing ones are skipped); None shows all.
    Floats use 4 significant digits."""
    chosen = list(stats) if keys is None else [k for k in keys if k in stats]
    return " | ".join([f"step {step}"] + [f"{k} {_format_value(stats[k])}" for k in chosen])


def _truncate_jsonl(path: Path, resume_step: int) -> None:
    """Drop lines with ``step > resume_step`` (and unreadable lines, e.g. one cut by a crash),
    rewriting ``path`` atomically."""
    if not path.exists():
        return
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                dropped += 1
                continue
            if isinstance(step, (int, float)) and step > resume_step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if not dropped:
        return
    atomic_write_bytes(path, "".join(kept).encode("utf-8"))


def open_jsonl(path: Path, *, resume_step: int):
    """A run's own JSONL file (one row per line, each with a ``step``), opened for appending after
    the lines of steps up to ``resume_step`` (0 for a fresh run: an empty file). Rank 0 only."""
    _truncate_jsonl(path, resume_step)
    return open(path, "a", encoding="utf-8")


class Logger:
    """Metrics/sample logger for one run directory; does nothing at all unless ``enabled``.

    Args:
        save_dir: run directory (created if needed).
        enabled: True on rank 0 only.  A disabled logger creates no files and imports nothing.
        wandb: ``"auto"`` | ``"on"`` | ``"off"`` (see the module docstring).
        project, run_name, config: passed to ``wandb.init`` (``config`` is the resolved
            hyperparameters as a plain dict).
        resume_step: the step of the checkpoint being resumed; existing lines with a larger
            step are dropped so the resumed run has no duplicated steps.  None = fresh run:
            existing metrics/samples files are emptied.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        *,
        enabled: bool,
        wandb: str = "auto",
        project: str = "lm_human_preferences",
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ):
        if wandb not in _WANDB_MODES:
            raise ValueError(f"wandb must be one of {_WANDB_MODES}, got {wandb!r}")
        self.enabled = bool(enabled)
        self.save_dir = Path(save_dir)
        self._metrics = self._samples = None
        self._wandb = None  # the wandb module, while a wandb run is active
        self._wandb_run = None
        if not self.enabled:
            return

        module = _wandb_module(wandb)  # before any file is touched: "on" may raise
        self.save_dir.mkdir(parents=True, exist_ok=True)
        metrics_path, samples_path = self.save_dir / METRICS_FILE, self.save_dir / SAMPLES_FILE
        if resume_step is None:
            mode = "w"
        else:
            mode = "a"
            _truncate_jsonl(metrics_path, resume_step)
            _truncate_jsonl(samples_path, resume_step)
        self._metrics = open(metrics_path, mode, encoding="utf-8")
        self._samples = open(samples_path, mode, encoding="utf-8")

        if module is not None:
            self._start_wandb(module, project=project, run_name=run_name, config=config, resume=resume_step is not None)

    # ---------------------------------------------------------------------------------------
    # wandb
    # ---------------------------------------------------------------------------------------

    @property
    def using_wandb(self) -> bool:
        return self._wandb_run is not None

    def _start_wandb(self, module, *, project, run_name, config, resume: bool) -> None:
        id_file = self.save_dir / _WANDB_ID_FILE
        kwargs: dict[str, Any] = {
            "project": project,
            "name": run_name,
            "config": to_jsonable(dict(config or {})),
            "dir": str(self.save_dir),
        }
        if resume and id_file.exists():
            kwargs.update(id=id_file.read_text().strip(), resume="allow")
        try:
            kwargs["settings"] = module.Settings(init_timeout=30)
        except Exception:  # older wandb without init_timeout
            pass
        try:
            run = module.init(**kwargs)
            if run is None:
                raise RuntimeError("wandb.init returned no run")
        except Exception as e:  # offline, bad key, timeout...: never stop training for wandb
            self._warn_wandb(f"wandb.init failed ({type(e).__name__}: {e})")
            return
        self._wandb, self._wandb_run = module, run
        run_id = getattr(run, "id", None)
        if run_id:
            id_file.write_text(str(run_id))

    def _warn_wandb(self, what: str) -> None:
        print(f"warning: {what}; continuing with {self.save_dir / METRICS_FILE} only", file=sys.stderr, flush=True)
        self._finish_wandb()

    def _finish_wandb(self) -> None:
        run, self._wandb_run, self._wandb = self._wandb_run, None, None
        if run is not None:
            try:
                run.finish()
            except Exception:
                pass

    # ---------------------------------------------------------------------------------------
    # Logging
    # ---------------------------------------------------------------------------------------

    def log(self, step: int, stats: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **stats}`` to metrics.jsonl (and log it to wandb at ``step``)."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: v for k, v in stats.items() if k != "step"}}
        self._write(self._metrics, row)
        if self._wandb_run is not None:
            data = to_jsonable({k: v for k, v in row.items() if k != "step"})
            try:
                self._wandb_run.log({k: (math.nan if v is None else v) for k, v in data.items()}, step=int(step))
            except Exception as e:
                self._warn_wandb(f"wandb.log failed ({type(e).__name__}: {e})")

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append one line per row to samples.jsonl, each with ``"step"`` added (and log the
        rows to wandb as a table named ``samples``)."""
        if not self.enabled or not rows:
            return
        for row in rows:
            self._write(self._samples, {"step": int(step), **{k: v for k, v in row.items() if k != "step"}})
        if self._wandb_run is not None:
            columns = list(dict.fromkeys(k for row in rows for k in row))
            data = [[to_jsonable(row.get(c)) for c in columns] for row in rows]
            try:
                self._wandb_run.log({"samples": self._wandb.Table(columns=columns, data=data)}, step=int(step))
            except Exception as e:
                self._warn_wandb(f"wandb sample logging failed ({type(e).__name__}: {e})")

    summary_line = staticmethod(summary_line)

    @staticmethod
    def _write(f, row: Mapping[str, Any]) -> None:
        f.write(_dumps(row) + "\n")
        f.flush()

    def close(self) -> None:
        """Close the files and finish the wandb run (idempotent)."""
        self._finish_wandb()
        for f in (self._metrics, self._samples):
            if f is not None:
                f.close()
        self._metrics = self._samples = None
        self.enabled = False

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wandb_module(mode: str):
    """The wandb module if this run should use it, else None (see the module docstring)."""
    if mode == "off":
        return None
    if mode == "auto" and os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        if mode == "on":
            raise ImportError(
                "wandb='on' but the wandb package is not installed: `pip install wandb`, "
                "or use wandb='auto'/'off' to log to metrics.jsonl only"
            ) from None
        return None
    if mode == "on" or os.environ.get("WANDB_MODE", "").lower() == "offline":
        return wandb
    if os.environ.get("WANDB_API_KEY"):
        return wandb
    try:
        has_key = bool(wandb.api.api_key)
    except Exception:
        has_key = False
    return wandb if has_key else None
