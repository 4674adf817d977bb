"""The training-step and memory sections of the benchmark (`bench/train_steps.py`,
`bench/peak_memory.py`): every kind of step runs against transformers doing the same work, the
targets are judged on the same-work ratios, and the peak-memory probe sees memory a step touches.
No timing is asserted."""

import importlib.util
import mmap
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_step_against_the_same_work(bench):
    pytest.importorskip("transformers")
    from bench.train_steps import STEPS

    sz = dict(bench.sizes(True, CPU), repeats=1, compile=False)
    s = bench.bench_train(sz, CPU)
    assert set(s["steps"]) == set(STEPS) == {"ppo", "lm", "reward"}
    for kind in STEPS:
        assert set(s["steps"][kind]) == {"fp32", "bf16"}
        assert all(r["ratio"] > 0 and r["ours_flops_per_s"] > 0 for r in s["steps"][kind].values())
    assert s["model_flops"]["lm"] > s["model_flops"]["ppo"] > s["model_flops"]["reward"] > 0
    out = bench.report({"train": s})
    assert "transformers doing the same work" in out and "| lm " in out and "| reward " in out
    assert "LM loss" not in out  # no comparison of different work


@pytest.mark.parametrize("ratio, memory, met", [(1.6, 0.5, True), (1.4, 0.5, False), (1.6, 0.7, False)])
def test_targets_judge_the_lm_step_and_its_memory(bench, ratio, memory, met):
    results = {"train": {"steps": {"lm": {"fp32": {"ratio": ratio}}}},
               "memory": {"precisions": {"fp32": {"ratio": memory}}}}
    rows = {r["target"].split(" ")[1]: r["met"] for r in bench.targets(results)}
    assert (rows["training"] and rows["step"]) is met


def test_peak_memory_sees_what_a_step_touches():
    if not Path("/proc/self/status").exists():
        pytest.skip("reads /proc")
    from bench.peak_memory import measure

    def step():  # 64 MiB of fresh pages, written (an allocator could hand out pages resident already)
        with mmap.mmap(-1, 64 * 2 ** 20) as m:
            m.write(b"\1" * (64 * 2 ** 20))

    out = measure(step, CPU)
    assert out["peak_bytes"] >= 60 * 2 ** 20 and out["before_bytes"] > 0
    assert out["method"] in ("VmHWM after clear_refs", "ru_maxrss since start")
