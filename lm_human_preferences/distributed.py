"""Process-group setup and small collectives; the ONLY module that touches torch.distributed.

Launch with ``torchrun --nproc_per_node=N ...``: torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` reads them and creates the
process group (NCCL on CUDA, gloo on CPU).  A plain ``python ...`` run has no such variables and
is a world of one: no process group is created and every helper below degrades to the local
value, so trainers call the same functions either way::

    info = distributed.init("auto")          # DistInfo(rank, world_size, local_rank, device)
    try:
        torch.manual_seed(distributed.seed_for_rank(seed, info.rank))
        ...
        stats = distributed.all_reduce_stats(stats, device=info.device)   # same on every rank
        if distributed.any_rank(not math.isfinite(loss)):                  # all ranks stop together
            ...
    finally:
        distributed.cleanup()

ONE process group per command: the first :func:`init` creates it, later calls (each pipeline
stage, a trainer started by another) reuse it, and the command destroys it at the end (launch.py
does); every wait, from reaching the store to each collective, is bounded by ``timeout_s``.
:func:`peer_failure` and :func:`speaks` keep a job's errors to one line each.

All helpers return NEW, detached tensors (they are for statistics and control flow, not for
autograd) on the device of their input.  Collectives must be called by every rank in the same
order with the same shapes (and, for :func:`all_reduce_stats`, the same keys).  Nothing happens
at import time.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lm_human_preferences.language.devices import device_named, parse_device

__all__ = ["DistInfo", "init", "cleanup", "get_rank", "get_world_size", "is_main", "barrier", "all_reduce_mean",
           "all_reduce_sum", "all_reduce_max", "all_reduce_stats", "all_gather_cat", "broadcast_object", "any_rank",
           "seed_for_rank", "PeerLost", "peer_failure", "speaks"]

_SEED_STRIDE = 100003  # a prime, so per-rank seed streams of nearby base seeds don't collide


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``device`` is the device this rank should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class PeerLost(RuntimeError):
    """Another rank exited or stopped answering, so this one cannot go on."""


@dataclass
class _Group:  # what this process keeps of its process group besides torch's own state
    store: Any  # the rendezvous store (prefixed): messages between ranks outside collectives
    timeout_s: float
    hosts_store: bool = False  # rank 0 without a torchrun agent: the store ends with this process
    created: int = 0  # process groups this process created so far (each gets fresh store keys)


_group = _Group(store=None, timeout_s=0.0)


# ---- Setup / teardown ----------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _resolve_device(device: str | torch.device, local_rank: int, world_size: int = 1) -> torch.device:
    spec = str(device)
    try:
        named = device_named(spec)
    except ValueError as e:
        raise ValueError(f"unknown device {spec!r}; {e}") from None
    if named is not None and named.type == "cuda" and named.index not in (None, local_rank) and world_size > 1:
        raise ValueError(
            f"device={spec!r} names one GPU, but this is one of {world_size} processes (LOCAL_RANK="
            f"{local_rank}) and each needs its own: use device='cuda' or 'auto' (rank i takes "
            "cuda:LOCAL_RANK), and CUDA_VISIBLE_DEVICES to choose which GPUs")
    try:
        return parse_device(spec, index=local_rank)
    except RuntimeError as e:
        raise RuntimeError(f"device={spec!r} on local rank {local_rank}: {e}") from None


def init(device: str | torch.device = "auto", *, timeout_s: float = 600) -> DistInfo:
    """Set up this process for (possibly) distributed training and return where it sits.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by torchrun; a plain run is rank 0 of
    1).  When ``WORLD_SIZE > 1`` and no process group exists yet, creates one (``env://``
    rendezvous via ``MASTER_ADDR``/``MASTER_PORT``) with backend NCCL for CUDA devices and gloo
    otherwise; ``timeout_s`` bounds every wait for a missing rank: reaching the rendezvous store,
    all ranks joining (else :class:`PeerLost`), each collective.  If a process group already
    exists it is reused as is, with the timeout it was created with.

    ``device``: ``"auto"`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``"cpu"``;
    ``"cuda"`` (-> ``cuda:LOCAL_RANK``) or ``"cuda:N"``.  Asking for CUDA on a machine without
    it raises a RuntimeError saying so.  For CUDA the device is made current
    (``torch.cuda.set_device``).
    """
    if _initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", rank)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid RANK={rank} / WORLD_SIZE={world_size} in the environment")
    if local_rank < 0:
        raise ValueError(f"invalid LOCAL_RANK={local_rank} in the environment")

    dev = _resolve_device(device, local_rank, world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    if world_size > 1 and not _initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        _create_group("nccl" if dev.type == "cuda" else "gloo", rank, world_size, timeout_s)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _create_group(backend: str, rank: int, world_size: int, timeout_s: float) -> None:
    """The process group, from the env:// rendezvous, with every wait bounded by `timeout_s`.
    Store keys are fresh for each group and launcher restart: torchrun's store outlives them, and
    a second group under the same keys read the first one's stale addresses (and hung)."""
    timeout = timedelta(seconds=timeout_s)
    attempt = f"{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}.{_group.created}"
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"default_pg/{attempt}", store), rank=rank,
                                world_size=world_size, timeout=timeout)
    except RuntimeError as e:
        if not _from_backend(e):
            raise
        raise PeerLost(f"not all {world_size} ranks joined within {timeout_s:g} s (--run.timeout_s); stopping "
                       f"({_first_line(e)})") from e
    _group.store = dist.PrefixStore(f"lm_human_preferences/{attempt}", store)
    _group.timeout_s, _group.created = timeout_s, _group.created + 1
    _group.hosts_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def cleanup() -> None:
    """Destroy the process group if one exists (safe to call always, and more than once)."""
    if _initialized():
        # Objects an exception left in reference cycles (its traceback's frames) can still hold a
        # DDP model, whose reducer uses the group: destroyed under it, a gloo rank could abort in
        # teardown ("terminate called without an active exception"). Collect them first.
        gc.collect()
        dist.destroy_process_group()
    _group.store = None


# ---- Queries -------------------------------------------------------------------------------------


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the process group; before one exists, the rank the launcher gave
    it (so that a multi-rank job prints once from the start); 0 in a plain run."""
    return dist.get_rank() if _initialized() else launch_rank()


def get_world_size() -> int:
    """Number of ranks in the process group; 1 when there is none."""
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on rank 0 (the rank that prints and writes files)."""
    return get_rank() == 0


def launch_rank() -> int:
    """This process's rank as the launcher set it (RANK), whether or not a group exists now."""
    return _env_int("RANK", 0)


def seed_for_rank(seed: int, rank: int) -> int:
    """Per-rank seed: ``seed + 100003 * rank`` (rank 0 keeps ``seed``)."""
    return seed + _SEED_STRIDE * rank


# ---- Collectives (all are no-ops / local values without a process group) ---------------------------


def _comm_device() -> torch.device:
    """The device collectives must run on for the current backend (NCCL: the current GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here."""
    if not _initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _reduced(t: torch.Tensor, op: str) -> torch.Tensor:
    """A detached copy of ``t`` reduced with ``dist.ReduceOp.<op>`` across ranks, on ``t``'s device."""
    if not _initialized():
        return t.detach().clone()
    buf = t.detach().to(_comm_device(), copy=True).contiguous()
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, op))
    return buf.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of ``t`` over ranks (a new tensor; ``t`` is untouched)."""
    return _reduced(t, "SUM")


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Elementwise mean of ``t`` over ranks (a new tensor; integer inputs give floats)."""
    return all_reduce_sum(t) / get_world_size()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``t`` over ranks (a new tensor)."""
    return _reduced(t, "MAX")


def all_reduce_stats(
    stats: Mapping[str, float | torch.Tensor], *, device: torch.device | str | None = None
) -> dict[str, float]:
    """Mean over ranks of a dict of scalar statistics, in ONE collective.

    Values may be Python numbers or one-element tensors (on any device).  They are stacked in
    sorted-key order into one float64 tensor on ``device`` (default: the backend's device, i.e.
    CPU for gloo and the current GPU for NCCL), averaged, and returned as plain floats with the
    input's key order.  Every rank must pass the same keys.  One host sync in total.
    """
    keys = sorted(stats)
    if not keys:
        return {}
    if device is None:
        device = _comm_device() if _initialized() else torch.device("cpu")
    values = []
    for k in keys:
        v = stats[k]
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"all_reduce_stats: {k!r} has {v.numel()} elements, expected a scalar")
            values.append(v.detach().reshape(()).to(device=device, dtype=torch.float64))
        else:
            values.append(torch.tensor(float(v), dtype=torch.float64, device=device))
    stacked = torch.stack(values)  # (K,)
    if _initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= get_world_size()
    reduced = dict(zip(keys, stacked.tolist()))
    return {k: reduced[k] for k in stats}


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order (all shapes must match)."""
    if not _initialized():
        return t.detach().clone()
    buf = t.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(buf) for _ in range(get_world_size())]
    dist.all_gather(parts, buf)
    return torch.cat(parts, dim=0).to(t.device)


def gather_batches(batches: list[tuple[int, list]], *, everywhere: bool = False) -> list:
    """On rank 0 (on every rank with `everywhere`), the items of every rank's ``(index, items)``
    pairs (picklable), in index order; [] on the other ranks. For work handed out in turns:
    batch i to rank i mod world size."""
    box = [batches]
    if _initialized():
        box = [None] * get_world_size() if everywhere or get_rank() == 0 else None
        if everywhere:
            dist.all_gather_object(box, batches)
        else:
            dist.gather_object(batches, box, dst=0)
    return [] if box is None else [x for _, items in sorted((b for part in box for b in part), key=lambda b: b[0])
                                   for x in items]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable object) on every rank; other ranks' ``obj`` is ignored."""
    if not _initialized():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on at least one rank (so all ranks stop together)."""
    if not _initialized():
        return bool(flag)
    buf = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return bool(buf.item())


# ---- When a rank stops: what the others say, and who prints an error -----------------------------

# What gloo, NCCL and the store say when the other end of a connection went away (gloo raises
# plain RuntimeErrors that name its source file; NCCL and the store raise DistErrors).
_GONE = ("closed by peer", "reset by peer", "connection refused", "broken pipe", "communicator was aborted",
         "end of file")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _from_backend(error: RuntimeError) -> bool:
    """Whether `error` came from the store or a collective rather than from this rank's own code."""
    return isinstance(error, dist.DistError) or any(k in str(error).lower() for k in ("gloo", "nccl", "c10d"))


def peer_failure(error: BaseException) -> str | None:
    """One line for `error` when it means another rank exited or stopped answering (a
    collective or the rendezvous failed because of it); None for any other error.  With two
    ranks the line names the other; with more it cannot tell which rank it was."""
    if isinstance(error, PeerLost):
        return str(error)
    if not (isinstance(error, RuntimeError) and _initialized() and get_world_size() > 1 and _from_backend(error)):
        return None
    text = str(error).lower()
    who = f"rank {1 - get_rank()}" if get_world_size() == 2 else "another rank"
    if any(gone in text for gone in _GONE):
        return f"{who} exited; stopping"
    if "timed out" in text or "timeout" in text:
        return f"{who} did not answer within {_group.timeout_s:g} s (--run.timeout_s); stopping"
    return None


def _within(seconds: float, done) -> bool:
    """Poll `done()` (a store query) for up to `seconds`: a store wait that times out logs warnings."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def speaks(message: str, *, alike: bool = False, own: bool = False, wait_s: float = 10.0) -> bool:
    """Whether this rank should print `message`, the error it stops with, so that a job prints
    each error once.  Rank 0 always does (and tells the others through the rendezvous store), and
    so does every rank when `own` (the ranks did not all join: each saw it its own way).  Another
    rank does not before the process group exists (every rank is then checking the same settings
    and files), nor when `alike` (an error every rank raises together, such as a stop on a
    non-finite loss); otherwise it waits up to `wait_s` seconds (at most the group's timeout) for
    rank 0's error and prints its own unless it is the same: an error only it met.  A rank 0 that
    hosts the store (no torchrun agent) keeps it up until the others have read its error, or
    `wait_s` seconds."""
    if own:
        return True
    rank, store, wait = get_rank(), _group.store, min(wait_s, _group.timeout_s)
    if rank != 0 and (alike or not _initialized()):
        return False
    if store is None:  # no process group, or one created elsewhere: nothing to compare with
        return True
    try:
        if rank == 0:
            store.set("error", message)
            if _group.hosts_store and not alike:
                _within(wait, lambda: store.add("read", 0) >= get_world_size() - 1)
            return True
        same = _within(wait, lambda: store.check(["error"])) and store.get("error").decode(errors="replace") == message
        store.add("read", 1)
        return not same
    except RuntimeError:  # the store went away with its host (rank 0, or the launcher)
        return True
