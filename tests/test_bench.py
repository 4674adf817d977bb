"""Tests of the benchmark entry point: `bench/run.py --quick` runs every section on tiny sizes and
prints its tables; the cuda code path is checked for what can be checked without a GPU (it syncs
before reading the clock, picks GPU sizes and judges the GPU target; the cpu path never touches
torch.cuda). No timing is asserted (timings belong in BENCHMARKS.md)."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)  # a device object only: nothing here allocates on it
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_quick_runs_and_prints_tables(tmp_path, bench):
    pytest.importorskip("transformers")
    out_json = tmp_path / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    every = ",".join(bench.SECTIONS)  # ppo_scale is not a default section on cpu
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--only", every, "--json",
                           str(out_json)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for title in ("sampling:", "training step", "PPO update breakdown", "PPO update at sentiment scale on cpu",
                  "machine limits", "MFU", "hot spots"):
        assert title in out, f"no {title!r} table in:\n{out}"
    assert "| precision | ours tok/s |" in out  # a table row, not just a title
    # The GPU throughput target is shown on cpu, not judged.
    (line,) = [line for line in out.splitlines() if line.startswith("| ppo_scale >= 550 episodes/s ")]
    assert line.rstrip(" |").endswith("n/a (not on a GPU)"), line
    assert "| ppo_scale/fp32/ours " in out  # its MFU row

    results = json.loads(out_json.read_text())
    assert results["device"] == "cpu" and results["quick"] is True
    assert "gpu" not in results["machine"]
    scale = results["ppo_scale"]
    assert scale["device"] == "cpu" and scale["config"]["n_layer"] == 2
    row = scale["precisions"]["fp32"]  # fp32 on cpu
    assert (row["batch_size"], row["query_length"], row["response_length"]) == (8, 8, 4)
    assert (row["nminibatches"], row["noptepochs"]) == (1, 4)  # the sentiment presets
    assert len(row["steps"]) == 3 and "max_memory_allocated" not in row
    sec = row["seconds"]
    assert all(sec[k] > 0 for k in ("sample", "analyze_policy", "analyze_ref", "score", "train")), sec
    assert sum(sec[k] for k in bench.PPO_PHASES) <= sec["total"] * 1.01
    assert row["episodes_per_s"] == pytest.approx(8 / sec["total"])
    assert row["model_flops"] > 0 and row["ours_flops_per_s"] > 0
    target = [t for t in results["targets"] if t["target"].startswith("ppo_scale")]
    assert len(target) == 1 and target[0]["met"] is None
    # Each training step's bound: transformers' time over its model FLOPs at the rounds' matmul rate.
    train = results["train"]
    for kind, by_prec in train["steps"].items():
        for prec, r in by_prec.items():
            n = 256  # the quick sizes' round_peak_size
            rates = [2 * n ** 3 / statistics.median(r["times"][k]) for k in r["times"] if k.startswith("matmul ")]
            assert len(rates) == 2 and r["round_peak_flops_per_s"] == pytest.approx(max(rates))
            assert r["bound"] == pytest.approx(r["peer_s"] * max(rates) / train["model_flops"][kind])
    assert "|ratio|bound|" in out.replace(" ", "")  # the training table's column


def test_bench_cpu_path_never_calls_cuda(bench, monkeypatch, capsys):
    """On cpu nothing may call into torch.cuda (on a CUDA build it would initialise a context, or
    time a GPU that does no work for us); here each such call fails."""
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda called on the cpu path")

    for name in ("synchronize", "reset_peak_memory_stats", "max_memory_allocated", "get_device_name",
                 "get_device_properties", "current_device", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    assert bench.main(["--quick", "--only", "ppo_scale,peak"]) == 0
    out = capsys.readouterr().out
    assert "PPO update at sentiment scale on cpu" in out and "machine limits" in out


def test_sampling_reports_every_batch(bench):
    """On cuda sampling runs at a second batch size (`more_batches`); each gets its table, and
    the first one feeds the targets."""
    pytest.importorskip("transformers")
    sz = dict(bench.sizes(True, CPU), batch=3, more_batches=[2], repeats=1)
    s = bench.bench_sampling(sz, CPU)
    assert s["batch"] == 3 and list(s["more_batches"]) == ["2"]
    assert s["more_batches"]["2"]["precisions"]["bf16"]["ours_tokens_per_s"] > 0
    out = bench.report({"sampling": s})
    assert "sampling: batch 3, query 8" in out and "sampling: batch 2, query 8" in out
    assert len(bench.targets({"sampling": s})) == 2  # fp32 and bf16 of batch 3


def test_timing_syncs_the_gpu_before_reading_the_clock(bench, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: calls.append(dev))
    bench.now(CPU)
    assert calls == []
    bench.now(CUDA)
    assert calls == [CUDA]

    calls.clear()
    times = bench.interleaved({"a": lambda: None, "b": lambda: None}, dev=CUDA, repeats=2, warmup=0)
    assert len(calls) == 2 * 4 and {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}

    calls.clear()
    clock = {}
    assert bench._timed(lambda x: x + 1, clock, "phase", CUDA)(1) == 2
    assert len(calls) == 2 and clock["phase"] >= 0


def test_sizes_and_default_sections_by_device(bench):
    assert "ppo_scale" in bench.SECTIONS
    assert "ppo_scale" not in bench.default_sections(CPU)
    assert set(bench.default_sections(CUDA)) == set(bench.SECTIONS)
    cpu, gpu = bench.sizes(False, CPU), bench.sizes(False, CUDA)
    assert (cpu["batch"], cpu["train_batch"], cpu["more_batches"]) == (16, 16, [])  # as measured in BENCHMARKS.md
    assert (gpu["batch"], gpu["query"], gpu["response"], gpu["train_batch"]) == (512, 64, 24, 128)
    assert gpu["scale"] == dict(model="124M", batch=512, query=64, response=24)
    assert bench.model_config(gpu["scale"]["model"]).n_vocab == 50257
    assert min(gpu["peak_sizes"]) >= 4096
    quick = bench.sizes(True, CUDA)
    assert quick["scale"]["batch"] == 8 and quick["more_batches"] == []


@pytest.mark.parametrize("device, quick, eps, met", [("cuda", False, 600.0, True), ("cuda", False, 500.0, False),
                                                     ("cuda", True, 600.0, None), ("cpu", False, 600.0, None)])
def test_ppo_scale_target_is_judged_on_a_gpu_at_full_size(bench, device, quick, eps, met):
    results = {"quick": quick, "ppo_scale": {"device": device, "precisions": {"bf16": {"episodes_per_s": eps}}}}
    (row,) = bench.targets(results)
    assert row["met"] is met and row["value"] == f"{eps:.1f}"
    assert ("n/a" in bench.report({"targets": [row]})) == (met is None)


def test_step_targets_show_the_bound_within_reach(bench):
    """A training-step target carries the step's bound (transformers' time over the time of the
    step's model FLOPs at the matmul rate of the same rounds); sampling's is transformers' time
    over our prefill's. The report shows it beside the verdict."""
    step = dict(ratio=0.9, bound=1.33)
    results = {"train": {"steps": {"lm": {"fp32": step}, "ppo": {"fp32": dict(ratio=1.3)}}},
               "sampling": {"precisions": {"fp32": dict(ratio=1.6, ratio_bound=4.2)}}}
    rows = {t["target"]: t for t in bench.targets(results)}
    assert rows["lm training step fp32 >= 1.5x transformers (same work)"]["bound"] == 1.33
    assert rows["ppo training step fp32 >= 1.2x transformers (same work)"]["bound"] is None  # an older results file
    assert rows["sampling fp32 >= 3x transformers.generate"]["bound"] == 4.2
    lines = bench.report({"targets": list(rows.values())}).splitlines()
    (line,) = [x for x in lines if x.startswith("| lm training step fp32 >= 1.5x")]
    assert [c.strip() for c in line.split("|")[1:-1]][-2:] == ["NO", "1.33x"], line
    (line,) = [x for x in lines if x.startswith("| ppo training step fp32 >= 1.2x")]
    assert [c.strip() for c in line.split("|")[1:-1]][-2:] == ["yes", ""], line


def test_an_update_records_where_its_sections_were_measured(tmp_path):
    out_json, env = tmp_path / "results.json", {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    for extra in ([], ["--update"]):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--only", "peak", "--json",
                               str(out_json), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out_json.read_text())
    (update,) = results["updates"]
    assert update["sections"] == ["peak"] and update["machine"]["cores"] == results["machine"]["cores"]
    assert update["argv"][-1] == "--update"


def test_bench_rejects_unknown_section():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--only", "nonsense"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown sections" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_cuda_without_cuda_is_a_usage_error():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--device", "cuda", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--device cuda: CUDA is not available" in proc.stderr
