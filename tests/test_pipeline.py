"""The offline pipeline end to end on tiny sizes: every stage runs, the report is written,
the labeler's gold score moves the right way, and a second run reuses what exists."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import free_port

import launch

ROOT = Path(__file__).resolve().parents[1]

TINY = [  # the offline presets, scaled down; robust over seeds 1-4 (gold +0.33 to +0.64)
    "--train_sft.steps=300", "--train_sft.batch_size=16", "--train_sft.seq_length=32", "--train_sft.eval_interval=300",
    "--train_sft.lr=5e-3", "--train_sft.vocab_passages=2000",
    "--collect_labels.num_labels=4096",
    "--train_reward.labels.num_train=3968", "--train_reward.batch_size=32", "--train_reward.lr=1e-3",
    "--train_reward.rollout_batch_size=64", "--train_reward.normalize_samples=128",
    "--train_policy.ppo.total_episodes=4096", "--train_policy.ppo.batch_size=64", "--train_policy.ppo.lr=1e-3",
    "--task.response_length=8", "--task.query_length=8", "--run.wandb=off",
]


def test_pipeline_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["pipeline", "offline_sentiment", "smoke", "--eval_queries=128",
            f"--task.policy.initial_model={tmp_path}/base", *TINY]
    assert launch.main(args) == 0
    root = tmp_path / "runs" / "smoke"
    for name in ("report.md", "curves.png", "summary.json", "labels/labels.json", "reward_model/model.safetensors",
                 "policy/model.safetensors", "policy/metrics.jsonl"):
        assert (root / name).is_file(), name
    assert (tmp_path / "base" / "config.json").is_file()
    summary = json.loads((root / "summary.json").read_text())
    assert summary["final"]["gold"] > summary["initial"]["gold"] + 0.1, summary
    assert summary["final"]["kl"] > 0
    report = (root / "report.md").read_text()
    assert "| initial |" in report and "| final |" in report
    metrics = [json.loads(x) for x in (root / "policy" / "metrics.jsonl").read_text().splitlines()]
    assert all("objective/gold" in m for m in metrics)

    capsys.readouterr()
    assert launch.main(args) == 0  # everything is reused
    out = capsys.readouterr().out
    assert "base model: reusing" in out and "policy: reusing" in out

    # a changed setting of a finished stage is not silently ignored
    written = (root / "policy" / "model.safetensors").stat().st_mtime_ns
    assert launch.main(args + ["--train_policy.ppo.lr=5e-4"]) == 2
    err = capsys.readouterr().err
    assert "runs/smoke/policy holds a finished stage with other settings (ppo.lr: 0.001 -> 0.0005)" in err
    assert (root / "policy" / "model.safetensors").stat().st_mtime_ns == written

    # nor is a stage built from an earlier output of the stage before it (here: a newer reward model)
    rm_config = root / "reward_model" / "config.json"
    os.utime(rm_config, (rm_config.stat().st_atime, (root / "policy" / "config.json").stat().st_mtime + 10))
    assert launch.main(args) == 2
    assert "runs/smoke/policy was built from an earlier runs/smoke/reward_model/config.json" in capsys.readouterr().err


@pytest.mark.parametrize("task, args, says", [
    ("offline_sentiment", ["--eval_queries=-5"], "'eval_queries': must be >= 1"),
    ("offline_sentiment", [f"--eval_queries={2**41}"], "'eval_queries': must be >= 1 and <= 2**40 (got 2199023255552)"),
    ("offline_sentiment", ["--train_reward.batch_size=33"], "is not a multiple of batch_size=33"),
    ("sentiment", [], "model 'gpt2' not found (looked at gpt2 and saved_models/gpt2); convert it first"),
])
def test_pipeline_settings_are_checked_before_any_stage_runs(tmp_path, monkeypatch, capsys, task, args, says):
    """Bad settings of any stage, and a missing base model that only an offline task would
    pretrain, stop the pipeline before it writes anything."""
    monkeypatch.chdir(tmp_path)
    assert launch.main(["pipeline", task, "bad", *args, "--run.wandb=off"]) == 2
    err = capsys.readouterr().err
    assert says in err
    if task == "sentiment":
        assert "pretrains a base model only for tasks with a train_sft preset" in err
    assert list(tmp_path.iterdir()) == []


QUICK = [  # every stage runs, briefly; nothing is learnt
    "--train_sft.steps=2", "--train_sft.batch_size=4", "--train_sft.seq_length=16", "--train_sft.eval_interval=2",
    "--train_sft.eval_batches=1", "--train_sft.vocab_passages=200", "--train_sft.model.n_embd=16",
    "--train_sft.model.n_head=2", "--collect_labels.num_labels=32", "--collect_labels.batch_size=32",
    "--train_reward.labels.num_train=32", "--train_reward.batch_size=16", "--train_reward.rollout_batch_size=16",
    "--train_reward.normalize_samples=16", "--train_reward.eval_batch_size=16",
    "--train_policy.ppo.total_episodes=16", "--train_policy.ppo.batch_size=16",
    "--task.response_length=4", "--task.query_length=8", "--run.wandb=off",
]


def test_a_rerun_keeps_the_stage_times_of_reused_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["pipeline", "offline_sentiment", "quick", "--eval_queries=8", f"--task.policy.initial_model={tmp_path}/base",
            *QUICK]
    assert launch.main(args) == 0
    root = tmp_path / "runs" / "quick"
    report = (root / "report.md").read_text()
    times = report[report.index("## Time per stage"):]
    first = json.loads((root / "summary.json").read_text())["seconds"]
    assert "(reused)" not in times
    assert launch.main(args) == 0
    times = (root / "report.md").read_text().split("## Time per stage")[1]
    for stage in ("pretrain", "collect_labels", "train_reward", "train_policy"):
        assert f"| {stage} | {first[stage]:.0f} (reused) |" in times
    again = json.loads((root / "summary.json").read_text())["seconds"]
    assert {k: again[k] for k in first if k != "evaluate"} == {k: v for k, v in first.items() if k != "evaluate"}
    # a base model cached by another experiment: its time is not known here
    assert launch.main([*args[:2], "other", *args[3:]]) == 0
    assert "| pretrain | — (reused) |" in (tmp_path / "runs" / "other" / "report.md").read_text()


TWO_RANK_TINY = [  # smaller still: only the ranks' coordination is under test
    "--train_sft.steps=4", "--train_sft.batch_size=4", "--train_sft.seq_length=16", "--train_sft.eval_interval=4",
    "--train_sft.eval_batches=1", "--train_sft.warmup_steps=1", "--train_sft.vocab_passages=200",
    "--train_sft.model.n_embd=16", "--train_sft.model.n_head=2", "--train_sft.model.n_layer=1",
    "--train_sft.model.n_ctx=32", "--collect_labels.num_labels=64", "--collect_labels.batch_size=16",
    "--train_reward.labels.num_train=32", "--train_reward.batch_size=8", "--train_reward.rollout_batch_size=16",
    "--train_reward.normalize_samples=32", "--train_policy.ppo.total_episodes=32", "--train_policy.ppo.batch_size=16",
    "--train_policy.ppo.nminibatches=2", "--task.response_length=4", "--task.query_length=4", "--run.wandb=off",
    "--run.timeout_s=30", "--eval_queries=4",
]


def test_two_rank_pipeline_under_torchrun_finishes_every_time(tmp_path):
    """Under torchrun all stages share the command's one process group (a group per stage used to
    fail or hang at a later stage's rendezvous): the 2-rank pipeline finishes run after run, with
    every stage trained, some reused, or all reused; each stage's header is printed once, and no
    rank prints anything of its own."""
    for exp in ("a", "b", "b"):  # a: every stage; b: the base model reused; b again: every stage reused
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={free_port()}", str(ROOT / "launch.py"), "pipeline", "offline_sentiment",
                               exp, f"--task.policy.initial_model={tmp_path}/base", *TWO_RANK_TINY],
                              cwd=tmp_path, capture_output=True, text=True, timeout=150)
        assert proc.returncode == 0, proc.stderr[-3000:]
        headers = [line[:5] for line in proc.stdout.splitlines() if line.startswith("[")]
        assert headers == [f"[{i}/5]" for i in range(1, 6)], proc.stdout
        assert "[rank" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "b" / "report.md").is_file()


def test_the_report_and_curves_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A full disk while writing report.md or curves.png leaves the earlier ones as they were."""
    import errno

    from lm_human_preferences import pipeline
    from lm_human_preferences.language import checkpoints

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "objective/score": 0.5, "train/loss": 1.0}) + "\n")
    side = {"score": 0.0, "gold": 0.0, "kl": 0.0, "texts": ["a"], "gold_each": [0.0]}
    report, curves = tmp_path / "report.md", tmp_path / "curves.png"
    report.write_text("earlier report\n")
    curves.write_bytes(b"earlier curves")

    def full_disk(target):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(checkpoints, "temp_file_beside", full_disk)
    with pytest.raises(OSError, match="No space left"):
        pipeline.write_report(report, task_name="t", before=side, after=side, query_texts=["q"], timings={},
                              reward_eval={})
    with pytest.raises(OSError, match="No space left"):
        pipeline.plot_curves(metrics, metrics, curves)
    assert report.read_text() == "earlier report\n" and curves.read_bytes() == b"earlier curves"
    monkeypatch.undo()
    pipeline.plot_curves(metrics, metrics, curves)
    assert curves.read_bytes().startswith(b"\x89PNG")
