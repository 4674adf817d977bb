import math
import time

import pytest
import torch
from dist_utils import DistributedRunError, run_distributed

from lm_human_preferences import distributed

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in _DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not torch.distributed.is_initialized()
    yield monkeypatch
    distributed.cleanup()


# --------------------------------------------------------------------------------------------
# Two gloo ranks: every collective, in one spawned run (process start-up dominates the cost)
# --------------------------------------------------------------------------------------------


def _collectives(rank, world_size):
    # init_group=False: exercise distributed.init reading torchrun's environment variables.
    assert not torch.distributed.is_initialized()
    info = distributed.init("auto", timeout_s=60)
    out = {
        "info": info,
        "initialized": torch.distributed.is_initialized(),
        "backend": torch.distributed.get_backend(),
        "rank": distributed.get_rank(),
        "world_size": distributed.get_world_size(),
        "is_main": distributed.is_main(),
        "init_again": distributed.init("cpu"),  # reuses the existing group
    }
    x = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)  # rank0: [1,2,3], rank1: [2,4,6]
    mean = distributed.all_reduce_mean(x)
    out["x_after"] = x  # inputs must be untouched
    out["mean"] = mean
    out["sum"] = distributed.all_reduce_sum(x)
    out["max"] = distributed.all_reduce_max(torch.tensor([float(rank), 10.0 - rank]))
    out["mean_int"] = distributed.all_reduce_mean(torch.tensor([rank + 1]))
    x_grad = torch.ones(2, requires_grad=True) * (rank + 1)
    out["mean_grad"] = distributed.all_reduce_mean(x_grad)
    # insertion order differs between ranks; tensors and floats mixed
    if rank == 0:
        stats = {"b/loss": torch.tensor(1.0), "a/score": 2.0, "c/kl": torch.tensor([4.0])}
    else:
        stats = {"c/kl": 8.0, "a/score": torch.tensor(6.0, dtype=torch.float64), "b/loss": 3}
    out["stats"] = distributed.all_reduce_stats(stats, device=info.device)
    out["stats_default_device"] = distributed.all_reduce_stats({"x": float(rank)})
    out["gathered"] = distributed.all_gather_cat(torch.full((2, 2), float(rank)))
    out["gathered_1d"] = distributed.all_gather_cat(torch.arange(3) + 10 * rank)
    out["bcast"] = distributed.broadcast_object({"rank": rank, "list": [rank] * 3}, src=0)
    out["bcast_src1"] = distributed.broadcast_object(f"from {rank}", src=1)
    out["any_one"] = distributed.any_rank(rank == 1)
    out["any_none"] = distributed.any_rank(False)
    out["any_all"] = distributed.any_rank(True)
    distributed.barrier()
    distributed.cleanup()
    out["after_cleanup"] = (torch.distributed.is_initialized(), distributed.get_world_size())
    distributed.cleanup()  # idempotent
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_collectives, 2, init_group=False, timeout=60)


def test_init_reads_torchrun_env(two_ranks):
    for rank, out in enumerate(two_ranks):
        info = out["info"]
        assert info == distributed.DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        assert info.is_main == (rank == 0)
        assert out["initialized"] and out["backend"] == "gloo"
        assert (out["rank"], out["world_size"], out["is_main"]) == (rank, 2, rank == 0)
        assert out["init_again"] == info
        assert out["after_cleanup"] == (False, 1)


def test_all_reduce_mean_sum_max(two_ranks):
    for rank, out in enumerate(two_ranks):
        torch.testing.assert_close(out["x_after"], torch.tensor([1.0, 2.0, 3.0]) * (rank + 1))
        torch.testing.assert_close(out["mean"], torch.tensor([1.5, 3.0, 4.5]))
        torch.testing.assert_close(out["sum"], torch.tensor([3.0, 6.0, 9.0]))
        torch.testing.assert_close(out["max"], torch.tensor([1.0, 10.0]))
        torch.testing.assert_close(out["mean_int"], torch.tensor([1.5]))
        assert not out["mean_grad"].requires_grad
        torch.testing.assert_close(out["mean_grad"], torch.tensor([1.5, 1.5]))


def test_all_reduce_stats_identical_means(two_ranks):
    expected = {"a/score": 4.0, "b/loss": 2.0, "c/kl": 6.0}
    s0, s1 = two_ranks[0]["stats"], two_ranks[1]["stats"]
    assert s0 == expected and s1 == expected
    assert all(type(v) is float for v in s0.values())
    assert list(s0) == ["b/loss", "a/score", "c/kl"]  # each rank keeps its own key order
    assert list(s1) == ["c/kl", "a/score", "b/loss"]
    assert two_ranks[0]["stats_default_device"] == two_ranks[1]["stats_default_device"] == {"x": 0.5}


def test_all_gather_cat_in_rank_order(two_ranks):
    for out in two_ranks:
        torch.testing.assert_close(out["gathered"], torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert torch.equal(out["gathered_1d"], torch.tensor([0, 1, 2, 10, 11, 12]))


def test_broadcast_object_and_any_rank(two_ranks):
    for out in two_ranks:
        assert out["bcast"] == {"rank": 0, "list": [0, 0, 0]}
        assert out["bcast_src1"] == "from 1"
        assert (out["any_one"], out["any_none"], out["any_all"]) == (True, False, True)


# --------------------------------------------------------------------------------------------
# The test utility itself: default group creation, world of one, fail fast, timeout
# --------------------------------------------------------------------------------------------


def _report(rank, world_size, tag):
    return {
        "tag": tag,
        "rank": distributed.get_rank(),
        "world_size": distributed.get_world_size(),
        "threads": torch.get_num_threads(),
        "mean": distributed.all_reduce_mean(torch.tensor([float(rank)])).item(),
    }


def test_run_distributed_creates_group_and_world_of_one():
    two = run_distributed(_report, 2, "x", timeout=60)
    assert two == [
        {"tag": "x", "rank": r, "world_size": 2, "threads": 1, "mean": 0.5} for r in range(2)
    ]
    one = run_distributed(_report, 1, "y", timeout=60)
    assert one == [{"tag": "y", "rank": 0, "world_size": 1, "threads": 1, "mean": 0.0}]


def _fail_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    # rank 0 would wait forever in this collective without fail-fast handling
    distributed.all_reduce_sum(torch.ones(1))
    time.sleep(60)


def test_run_distributed_fails_fast_when_a_rank_raises():
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match="boom on rank 1") as excinfo:
        run_distributed(_fail_on_rank1, 2, timeout=60)
    assert time.monotonic() - start < 30
    assert "ValueError: boom on rank 1" in excinfo.value.tracebacks[1]


def _sleep(rank, world_size):
    time.sleep(60)


def test_run_distributed_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within"):
        run_distributed(_sleep, 1, timeout=3)
    assert time.monotonic() - start < 15


# --------------------------------------------------------------------------------------------
# One process, no process group
# --------------------------------------------------------------------------------------------


def test_init_without_env_is_world_of_one(clean_env):
    info = distributed.init("cpu")
    assert info == distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main
    assert not torch.distributed.is_initialized()


def test_init_world_size_one_env_creates_no_group(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("LOCAL_RANK", "0")
    info = distributed.init("auto")
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert not torch.distributed.is_initialized()
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert info.device == expected


def test_init_rejects_bad_env(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        distributed.init("cpu")
    clean_env.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="not an integer"):
        distributed.init("cpu")


def test_init_cuda_without_cuda_is_a_clear_error(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        distributed.init("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        distributed.init("cuda:0")
    assert distributed.init("auto").device == torch.device("cpu")


def test_init_one_gpu_named_for_several_processes_is_a_clear_error(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "1")
    clean_env.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="names one GPU.*LOCAL_RANK=1"):
        distributed.init("cuda:0")  # before any process group or CUDA check


def test_init_unknown_device(clean_env):
    with pytest.raises(ValueError, match="unknown device"):
        distributed.init("gpu")


def test_cleanup_collects_garbage_before_destroying_the_group(clean_env):
    """A DDP model left in a reference cycle by an exception must be gone before the group is
    destroyed under it (a gloo rank could abort in teardown otherwise)."""
    calls = []
    clean_env.setattr(distributed, "_initialized", lambda: True)
    clean_env.setattr(distributed.gc, "collect", lambda: calls.append("collect"))
    clean_env.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.cleanup()
    assert calls == ["collect", "destroy"]


def test_helpers_without_process_group(clean_env):
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()
    distributed.cleanup()

    x = torch.tensor([1.0, -2.0])
    for fn in (distributed.all_reduce_mean, distributed.all_reduce_sum, distributed.all_reduce_max):
        y = fn(x)
        torch.testing.assert_close(y, x)
        y.add_(1)  # a new tensor, not a view of the input
        torch.testing.assert_close(x, torch.tensor([1.0, -2.0]))
    assert distributed.all_reduce_mean(torch.tensor([3])).dtype == torch.float32  # as with 2 ranks

    stats = {"z": torch.tensor(1.5), "a": 2, "m": torch.tensor([float("nan")])}
    out = distributed.all_reduce_stats(stats, device="cpu")
    assert list(out) == ["z", "a", "m"]
    assert out["z"] == 1.5 and out["a"] == 2.0 and math.isnan(out["m"])
    assert all(type(v) is float for v in out.values())
    assert distributed.all_reduce_stats({}) == {}
    with pytest.raises(ValueError, match="expected a scalar"):
        distributed.all_reduce_stats({"v": torch.ones(2)})

    g = torch.arange(4).reshape(2, 2)
    assert torch.equal(distributed.all_gather_cat(g), g)
    obj = {"a": [1, 2]}
    assert distributed.broadcast_object(obj) == obj
    assert distributed.any_rank(True) is True and distributed.any_rank(False) is False


def test_seed_for_rank():
    assert distributed.seed_for_rank(7, 0) == 7
    assert distributed.seed_for_rank(7, 3) == 7 + 3 * 100003
    assert len({distributed.seed_for_rank(s, r) for s in range(4) for r in range(4)}) == 16

