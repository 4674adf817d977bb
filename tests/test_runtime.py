"""Process-level runtime settings made by the command line."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import resource, sys, torch
from lm_human_preferences.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
for _ in range(5):  # 64 MiB: large enough that glibc would map it on its own
    torch.empty(2**24).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    torch.empty(2**24).fill_(1)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, tunables: str | None = None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_keep_freed_memory_stops_refaulting_large_blocks():
    applied, kept = page_faults("on")
    assert applied
    _, default = page_faults("off")
    # With glibc's defaults each of the 30 blocks is mapped afresh and faulted in again. Kept, the
    # heap only grows now and then (a few blocks' worth, when small objects land in a freed block).
    assert kept * 4 < default, (default, kept)


def test_keep_freed_memory_leaves_explicit_malloc_tunables_alone():
    applied, _ = page_faults("on", tunables="glibc.malloc.trim_threshold=131072")
    assert not applied


def test_scalar_sums_equal_host_float_sums():
    import torch

    from lm_human_preferences.runtime import add_scalars, to_floats

    torch.manual_seed(0)
    micro = [{"loss": torch.randn(()), "acc": torch.rand(())} for _ in range(3)]
    sums: dict = {}
    for m in micro:
        add_scalars(sums, m, divide_by=3)
    want = {k: sum(float(m[k]) / 3 for m in micro) for k in ("loss", "acc")}  # what the trainers did before
    assert to_floats(sums) == want and to_floats({}) == {}
