"""Smoke test of the benchmark entry point: `bench/run.py --quick` runs every section on tiny
sizes and prints its tables. No timing is asserted (timings belong in BENCHMARKS.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs_and_prints_tables(tmp_path):
    pytest.importorskip("transformers")
    out_json = tmp_path / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out_json)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for title in ("sampling:", "training step", "PPO update breakdown", "machine limits", "MFU"):
        assert title in out, f"no {title!r} table in:\n{out}"
    assert "| precision | ours tok/s |" in out  # a table row, not just a title
    assert out_json.is_file()


def test_bench_rejects_unknown_section():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--only", "nonsense"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown sections" in proc.stderr
