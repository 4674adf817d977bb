"""Run a function on N local CPU ranks (gloo) the way torchrun would, for tests.

    from dist_utils import run_distributed

    def _train(rank, world_size, cfg):            # module level: it is pickled into the children
        info = distributed.init("cpu")            # reuses the group run_distributed created
        ...
        return {"loss": loss, "params": state}    # anything picklable (tensors included)

    def test_ddp_matches_single(tmp_path):
        two = run_distributed(_train, 2, cfg)     # [rank0_result, rank1_result]
        one = run_distributed(_train, 1, cfg)     # same code path, world of one (no group)
        torch.testing.assert_close(two[0]["params"], one[0]["params"])

Each child is a fresh ``spawn``ed interpreter with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1`` and ``MASTER_PORT`` (a free port) set, and
``torch.set_num_threads(num_threads)`` applied (default 1, so 2 ranks fit on 2 cores and a
1-rank reference run uses the same kernels).  With ``init_group=True`` (default) and
``world_size > 1`` the gloo group is created before ``fn`` runs, through
``lm_human_preferences.distributed.init("cpu")``, so the code under test may call
``distributed.init`` again (it reuses the group) or not at all; with ``init_group=False`` ``fn``
must create it itself (e.g. to test ``distributed.init``).  Any group still alive when ``fn``
returns is destroyed.

Failure is fast: if any child raises, the others are terminated at once and the child's
tracebacks of every rank that raised are re-raised here as :class:`DistributedRunError`;
if the whole run exceeds ``timeout`` seconds (also the process group's collective timeout) all
children are killed and ``TimeoutError`` is raised.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

__all__ = ["run_distributed", "free_port", "DistributedRunError"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    fn: Callable[..., Any],
    args: tuple,
    init_group: bool,
    num_threads: int | None,
    env: Mapping[str, str],
    timeout: float,
) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if num_threads is not None:
        torch.set_num_threads(num_threads)

    from lm_human_preferences import distributed

    if init_group:
        distributed.init("cpu", timeout_s=timeout)
    try:
        result = fn(rank, world_size, *args)
    finally:
        distributed.cleanup()
    path = Path(out_dir) / f"rank{rank}.pkl"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, path)


class DistributedRunError(RuntimeError):
    """A child of :func:`run_distributed` failed; ``tracebacks`` maps rank -> formatted traceback
    for every rank that raised (a rank killed by a signal has none)."""

    def __init__(self, message: str, tracebacks: dict[int, str]):
        super().__init__(message)
        self.tracebacks = tracebacks


def _child_tracebacks(error_files: list[str]) -> dict[int, str]:
    out = {}
    for rank, path in enumerate(error_files):
        try:
            with open(path, "rb") as f:
                out[rank] = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError):
            continue
    return out


def _stop(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    init_group: bool = True,
    num_threads: int | None = 1,
    env: Mapping[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return the
    per-rank return values as a list indexed by rank.

    ``fn`` and ``args`` must be picklable (``fn`` defined at module level).  ``env`` adds
    environment variables in the children.  See the module docstring for failure behaviour.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as out_dir:
        context = mp.start_processes(
            _child,
            args=(world_size, free_port(), out_dir, fn, args, init_group, num_threads, dict(env or {}), timeout),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        name = getattr(fn, "__name__", repr(fn))
        try:
            while not context.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"run_distributed({name}, world_size={world_size}) did not finish within {timeout:g} s"
                    )
        except ProcessException as e:
            _stop(context.processes)
            tracebacks = _child_tracebacks(context.error_files)
            details = "".join(f"\n\n-- rank {r} raised:\n{tb}" for r, tb in sorted(tracebacks.items()))
            raise DistributedRunError(
                f"run_distributed({name}, world_size={world_size}) failed; first failure seen on "
                f"rank {e.error_index}{details or ': ' + str(e)}",
                tracebacks,
            ) from None
        finally:
            _stop(context.processes)
            for path in context.error_files:
                Path(path).unlink(missing_ok=True)
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results


def count_sampling(module) -> list[int]:
    """Wrap ``module.sample_sequence`` (as the module imported it) so that each call's number of
    rows is appended to the returned list: which batches this process sampled."""
    sampled: list[int] = []
    sample = module.sample_sequence

    def counted(gpt, context, **kwargs):
        sampled.append(len(context))
        return sample(gpt, context, **kwargs)

    module.sample_sequence = counted
    return sampled
