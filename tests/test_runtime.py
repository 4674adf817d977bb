"""Process-level runtime settings made by the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel
from lm_human_preferences.runtime import Run, RunHParams

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
    from lm_human_preferences.runtime import add_scalars, to_floats

    torch.manual_seed(0)
    micro = [{"loss": torch.randn(()), "acc": torch.rand(())} for _ in range(3)]
    sums: dict = {}
    for m in micro:
        add_scalars(sums, m, divide_by=3)
    want = {k: sum(float(m[k]) / 3 for m in micro) for k in ("loss", "acc")}  # what the trainers did before
    assert to_floats(sums) == want and to_floats({}) == {}


def test_place_marks_every_gpt_trunk_for_compiling_under_run_compile(tmp_path):
    def trunk():
        return GPT(GPTConfig(n_vocab=30, n_ctx=16, n_embd=8, n_head=2, n_layer=1))

    for compile in (False, True):
        hp = RunHParams()
        hp.override_from_dict({"device": "cpu", "wandb": "off", "save_dir": str(tmp_path), "compile": compile})
        run = Run(hp, exp_name="place", config=hp)
        try:
            models = [run.place(Policy(trunk())), run.place(RewardModel(trunk())), run.place(trunk())]
        finally:
            run.close()
        assert [m.compiled for m in (models[0].gpt, models[1].gpt, models[2])] == [compile] * 3
        assert all(p.device.type == "cpu" for m in models for p in m.parameters())
    with pytest.raises(Exception, match="compile"):
        RunHParams().override_from_dict({"compile": "maybe"})


def test_compile_needs_torch_2_5(monkeypatch):
    hp = RunHParams()
    hp.override_from_dict({"device": "cpu", "compile": True})
    hp.validate()
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    with pytest.raises(HParamsError, match=r"'compile': needs torch >= 2.5 \(this is 2.4.1\+cu121\)"):
        hp.validate()


def _runs_one_after_another(rank, world_size, save_dir):
    """Two runs in one process, as the pipeline's stages are; how many groups were created."""
    created = []
    init_process_group = torch.distributed.init_process_group

    def counted(*args, **kwargs):
        created.append(1)
        return init_process_group(*args, **kwargs)

    torch.distributed.init_process_group = counted
    for name in ("first", "second"):
        hp = RunHParams()
        hp.override_from_dict({"device": "cpu", "wandb": "off", "save_dir": f"{save_dir}/{name}", "timeout_s": 30})
        run = Run(hp, exp_name=name, config=hp)
        run.start()  # a collective (barrier)
        run.close()
    return len(created), torch.distributed.is_initialized()


def test_the_runs_of_one_command_share_its_process_group(tmp_path):
    """The first run creates the process group, closing it keeps the group, and the next run uses
    the same one: one group per command, destroyed when the command ends."""
    assert run_distributed(_runs_one_after_another, 2, str(tmp_path), init_group=False, timeout=60) == [(1, True)] * 2


def test_hparams_json_records_the_thread_count_and_a_resume_under_another_warns(tmp_path, capsys):
    """CPU kernels split their sums by thread count, so a resume is bitwise only under the count
    the run had: hparams.json records it, and another count is a warning, not a refused resume."""
    from lm_human_preferences.train_sft import TrainSFTHParams

    def run_with(threads: int) -> Run:
        config = TrainSFTHParams()
        config.run.override_from_dict({"device": "cpu", "wandb": "off", "save_dir": str(tmp_path), "threads": threads})
        config.validate()
        return Run(config.run, exp_name="threads", config=config)

    assert torch.get_num_threads() == 1  # conftest
    run = run_with(2)
    try:
        assert torch.get_num_threads() == 2
        run.start()
        run.save_checkpoint(1, {"step": 1})
    finally:
        run.close()
    assert torch.get_num_threads() == 1  # restored
    assert json.loads((tmp_path / "hparams.json").read_text())["run"]["threads"] == 2
    capsys.readouterr()

    def resume(threads: int) -> str:
        run = run_with(threads)
        try:
            loaded = []
            assert run.resume(loaded.append) and loaded == [{"step": 1}]
        finally:
            run.close()
        out, err = capsys.readouterr()
        assert "resuming from" in out
        return err

    checkpoint = tmp_path / "checkpoints" / "step_000001.pt"
    assert resume(0) == (f"warning: {checkpoint} was written with 2 CPU threads, this process has 1: the run goes "
                         "on, but not bitwise as one uninterrupted run (rerun with --run.threads=2 for that)\n")
    assert resume(2) == ""


def test_a_run_applies_its_fp32_products_and_restores_the_default(tmp_path):
    """oneDNN is the default everywhere; `vendor` holds for
    the run only, and hparams.json records it."""
    from lm_human_preferences.language import kernels
    from lm_human_preferences.train_sft import TrainSFTHParams

    assert RunHParams().fp32_products == "onednn" and kernels._fp32_products == "onednn"
    config = TrainSFTHParams()
    config.run.override_from_dict({"device": "cpu", "wandb": "off", "save_dir": str(tmp_path),
                                   "fp32_products": "vendor"})
    config.validate()
    run = Run(config.run, exp_name="products", config=config)
    try:
        assert kernels._fp32_products == "vendor"
        run.start()
    finally:
        run.close()
    assert kernels._fp32_products == "onednn"
    assert json.loads((tmp_path / "hparams.json").read_text())["run"]["fp32_products"] == "vendor"
