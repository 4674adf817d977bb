"""Integrity of the run directory: "finished" means the model on disk came from the settings in
hparams.json (status.json); skipping non-finite batches has a bound and a non-finite model is
never saved; temporary files of killed writes are cleaned up; an unwritable run directory is
one paragraph and exit 2; SIGINT and SIGTERM stop at a step boundary with a checkpoint, on
every rank alike; checkpoints also come on a clock.

Tiny models and the run configurations of test_reliability, CPU, one thread per process.
"""

import errno
import gc
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from dist_utils import run_distributed
# files: the module's tiny model, corpus, labels and reward model (a fixture of test_reliability's)
from test_reliability import (ENV, ROOT, Crash, assert_same_model, assert_same_run, checkpoint_names,
                              cli_args, files, hparams, policy_config, reward_config, rows, sft_config, start,
                              temporary_files, train_ppo, train_rm)

import launch
from lm_human_preferences import (collect_labels, pipeline, ppo, run_status, train_policy, train_reward,
                                  train_sft)
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language import checkpoints
from lm_human_preferences.runtime import Run


def status(run_dir) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def train_lm(files, save_dir, **extra):
    return train_sft.train(hparams(train_sft.TrainSFTHParams, sft_config(files, save_dir, **extra)), exp_name="lm")


TRAIN = {"train_reward": train_rm, "train_policy": train_ppo, "train_sft": train_lm}
NEW_SETTING = {"train_reward": {"lr": 2e-3}, "train_policy": {"ppo.lr": 2e-3}, "train_sft": {"lr": 2e-3}}


def crash_in_first_step(monkeypatch, trainer: str) -> None:
    def crash(*args, **kwargs):
        raise Crash("killed before the first checkpoint")

    target = {"train_reward": (train_reward.RewardTrainer, "train_step"),
              "train_policy": (train_policy.PPOTrainer, "step"), "train_sft": (train_sft, "lm_loss")}[trainer]
    monkeypatch.setattr(*target, crash)


# ---------------------------------------------------------------------------------------------
# 1. A run that started over and died is not its predecessor, finished
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer", list(TRAIN))
def test_a_new_run_killed_before_its_first_checkpoint_is_not_the_old_run_finished(files, tmp_path, monkeypatch,
                                                                                   capsys, trainer):
    run = tmp_path / trainer
    TRAIN[trainer](files, run)
    assert status(run) == {"state": "finished", "exit_status": 0, "step": status(run)["step"]}
    old_model = (run / "model.safetensors").read_bytes()
    crash_in_first_step(monkeypatch, trainer)
    with pytest.raises(Crash):
        TRAIN[trainer](files, run, **NEW_SETTING[trainer], **{"run.resume": "never"})
    monkeypatch.undo()
    assert not (run / "model.safetensors").exists() and not (run / "config.json").exists()
    assert status(run) == {"state": "failed", "exit_status": 1, "step": 0,
                           "error": "killed before the first checkpoint"}

    capsys.readouterr()
    TRAIN[trainer](files, run, **NEW_SETTING[trainer])  # a plain rerun of the new command trains
    assert "nothing to do" not in capsys.readouterr().out
    assert status(run)["state"] == "finished"
    assert (run / "model.safetensors").read_bytes() != old_model


def collect(files, save_dir, **extra):
    hp = hparams(collect_labels.CollectLabelsHParams, {
        **{k: v for k, v in policy_config(files, save_dir).items() if k.startswith(("task.", "run."))},
        "num_labels": 8, "batch_size": 8, **extra})
    return collect_labels.train(hp, exp_name="labels")


def test_collect_labels_killed_after_starting_over_collects_again(files, tmp_path, monkeypatch, capsys):
    out = collect(files, tmp_path / "labels")
    assert status(out.parent)["state"] == "finished" and len(json.loads(out.read_text())) == 8
    monkeypatch.setattr(collect_labels, "collect", lambda *a, **k: (_ for _ in ()).throw(Crash("killed")))
    with pytest.raises(Crash):
        collect(files, tmp_path / "labels", num_labels=16, **{"run.resume": "never"})
    monkeypatch.undo()
    assert not out.exists() and status(out.parent)["state"] == "failed"
    capsys.readouterr()
    collect(files, tmp_path / "labels", num_labels=16)
    assert "nothing to do" not in capsys.readouterr().out and len(json.loads(out.read_text())) == 16


def test_the_pipeline_reuses_only_stages_whose_run_finished(files, tmp_path):
    stage = tmp_path / "reward_model"
    hp = hparams(train_reward.TrainRewardHParams, reward_config(files, stage))
    train_rm(files, stage)
    output = stage / "config.json"
    assert pipeline.finished(stage, output, hp)
    run_status.write_status(stage, "running")  # a new run of the stage died before its final save
    assert not pipeline.finished(stage, output, hp)
    run_status.write_status(stage, "interrupted", exit_status=130, step=3)
    assert not pipeline.finished(stage, output, hp)


def test_a_run_directory_without_status_counts_as_finished_without_checkpoints(files, tmp_path, monkeypatch, capsys):
    """Directories of earlier versions have no status.json: finished when they hold the final
    model and no checkpoint, as before."""
    run = tmp_path / "rm"
    train_rm(files, run)
    (run / "status.json").unlink()
    capsys.readouterr()
    train_rm(files, run)
    assert "holds this run, finished; nothing to do" in capsys.readouterr().out
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step_000003.pt").write_bytes(b"left by a crash during the final save")
    train_rm(files, run)  # not finished: trains again (the bad checkpoint is skipped)
    assert status(run)["state"] == "finished" and "nothing to do" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 2. Skipping non-finite batches is bounded; a non-finite model is never saved
# ---------------------------------------------------------------------------------------------


def test_a_destroyed_policy_stops_with_status_3_even_when_skipping(files, tmp_path, capsys):
    run = tmp_path / "ppo"
    args = ["train_policy", "offline_sentiment", "x", *cli_args(policy_config(files, run, **{
        "ppo.lr": 1e30, "run.skip_nonfinite": True}))]
    assert launch.main(args) == 3
    assert "error: step 2: the KL coefficient β became nan" in capsys.readouterr().err
    assert not (run / "model.safetensors").exists()
    assert status(run)["state"] == "nonfinite" and status(run)["exit_status"] == 3


def nan_reward_from(monkeypatch, step: int):
    reward_fn = train_reward.RewardTrainer.reward_fn

    def nan_from(self, model):
        fn = reward_fn(self, model)
        return (lambda q, r: fn(q, r) * math.nan) if self.step + 1 >= step else fn

    monkeypatch.setattr(train_reward.RewardTrainer, "reward_fn", nan_from)


def test_more_skipped_batches_in_a_row_than_allowed_stop_the_run(files, tmp_path, monkeypatch):
    nan_reward_from(monkeypatch, 3)
    with pytest.raises(FloatingPointError, match=r"^step 5: non-finite train/loss on rank 0; 3 batches in a row "
                                                 r"skipped, more than --run.max_skipped_in_a_row=2; the run stopped"):
        train_rm(files, tmp_path / "rm", **{"run.skip_nonfinite": True, "run.max_skipped_in_a_row": 2})
    assert not (tmp_path / "rm" / "model.safetensors").exists()


def test_skipped_batches_in_a_row_count_across_a_resume(files, tmp_path, monkeypatch):
    """The bound on skipped batches in a row holds for a run that crashed and resumed in the middle
    of such a streak: the checkpoint carries the count (an uninterrupted run stops at step 5)."""
    nan_reward_from(monkeypatch, 3)
    train_step, crashing = train_reward.RewardTrainer.train_step, [True]

    def crash_at_step_5(self, indices, lr):
        if self.step == 4 and crashing[0]:
            raise Crash
        return train_step(self, indices, lr)

    monkeypatch.setattr(train_reward.RewardTrainer, "train_step", crash_at_step_5)
    settings = {"run.skip_nonfinite": True, "run.max_skipped_in_a_row": 2, "run.save_every_s": 1e-9}
    with pytest.raises(Crash):
        train_rm(files, tmp_path / "rm", **settings)
    assert torch.load(tmp_path / "rm" / "checkpoints" / "step_000004.pt", weights_only=True)["skipped_in_a_row"] == 2
    crashing[0] = False
    with pytest.raises(FloatingPointError, match=r"^step 5: non-finite train/loss on rank 0; 3 batches in a row "
                                                 r"skipped, more than --run.max_skipped_in_a_row=2"):
        train_rm(files, tmp_path / "rm", **settings)


def test_a_nonfinite_kl_coefficient_stops_the_run(files, tmp_path, monkeypatch):
    update = ppo.AdaptiveKLController.update

    def nan_at_second(self, current_kl, n_steps):
        return update(self, math.nan if self.value != 0.2 else current_kl, n_steps)

    monkeypatch.setattr(ppo.AdaptiveKLController, "update", nan_at_second)
    with pytest.raises(FloatingPointError, match=r"^step 2: the KL coefficient β became nan"):
        train_ppo(files, tmp_path / "ppo")


def test_a_nonfinite_checkpoint_or_model_is_never_saved(files, tmp_path):
    hp = hparams(train_sft.TrainSFTHParams, sft_config(files, tmp_path / "lm"))
    run = Run(hp.run, exp_name="lm", config=hp)
    try:
        run.start(stop_at_step_end=False)
        with pytest.raises(FloatingPointError, match=r"^step 1: non-finite values in the training state "
                                                     r"\(optimizer.state.0.exp_avg\), which was not saved"):
            run.save_checkpoint(1, {"model": {"w": torch.ones(2)}, "optimizer": {"state": {0: {
                "exp_avg": torch.tensor([1.0, math.inf])}}}})
        assert run.checkpoints() == [] and temporary_files(tmp_path / "lm") == []
        model = torch.nn.Linear(2, 2)
        with torch.no_grad():
            model.bias[0] = math.nan
        with pytest.raises(FloatingPointError, match=r"non-finite parameters \(bias\); the model was not saved"):
            run.finish(lambda d: pytest.fail("the final model was written"), model=model)
        assert status(tmp_path / "lm") == {"state": "running"}
    finally:
        run.close()


# ---------------------------------------------------------------------------------------------
# 3. Temporary files of killed writes
# ---------------------------------------------------------------------------------------------

KILL_DURING_FINAL_SAVE = """
import os, sys
sys.path.insert(0, os.getcwd())
replace = os.replace
def dying_replace(src, dst):
    if os.path.basename(dst) == "config.json":
        os._exit(137)  # killed between writing the final config and renaming it
    return replace(src, dst)
os.replace = dying_replace
import launch
sys.exit(launch.main(sys.argv[1:]))
"""


def test_a_kill_during_the_final_save_leaves_no_temporary_file_after_the_rerun(files, tmp_path, capsys):
    run = tmp_path / "rm"
    args = ["train_reward", "offline_sentiment", "x", *cli_args(reward_config(files, run, **{"run.save_interval": 1}))]
    died = subprocess.run([sys.executable, "-c", KILL_DURING_FINAL_SAVE, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert died.returncode == 137, died.stderr[-3000:]
    assert [p.name for p in temporary_files(run) if p.name.startswith(".config.json.tmp-")]
    assert status(run) == {"state": "running"}  # the model is there, but the run is not finished
    (run / "metrics.jsonl.tmp").write_text("cut back by a resume that was killed\n")
    assert launch.main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert temporary_files(run) == [] and status(run)["state"] == "finished"


# ---------------------------------------------------------------------------------------------
# 4. A read-only or full run directory
# ---------------------------------------------------------------------------------------------


def failing_writes(monkeypatch, name: str, code: int = errno.ENOSPC):
    """Writing the file called `name` fails as on a full (or read-only) disk."""
    beside = checkpoints.temp_file_beside

    def temp_file_beside(target):
        if target.name == name:
            raise OSError(code, os.strerror(code), str(target.parent / f".{name}.tmp-x"))
        return beside(target)

    monkeypatch.setattr(checkpoints, "temp_file_beside", temp_file_beside)


def run_cli(args, capsys) -> tuple[int, str]:
    code = launch.main(args)
    err = capsys.readouterr().err
    return code, err.rstrip("\n").rsplit("\n", 1)[-1]  # after the progress bar's line


def test_a_full_disk_at_a_checkpoint_is_exit_2_and_loses_nothing(files, tmp_path, monkeypatch, capsys):
    run = tmp_path / "rm"
    args = ["train_reward", "offline_sentiment", "x", *cli_args(reward_config(files, run, **{"run.save_interval": 1}))]
    failing_writes(monkeypatch, "step_000003.pt")
    code, error = run_cli(args, capsys)
    assert code == 2
    assert error == (f"error: cannot write {run / 'checkpoints' / 'step_000003.pt'} (No space left on device) while "
                     f"saving the checkpoint of step 3; no partial file is left, and nothing was lost: its checkpoint "
                     f"of step 2 stays, and a rerun resumes from it. Free space or make {run} writable (or pass "
                     f"--run.save_dir=DIR), then rerun the same command")
    assert checkpoint_names(run) == [f"step_00000{s}.pt{ext}" for s in (1, 2) for ext in ("", ".sha256")]
    assert temporary_files(run) == [] and status(run)["exit_status"] == 2
    monkeypatch.undo()
    assert launch.main(args) == 0
    assert f"resuming from {run / 'checkpoints' / 'step_000002.pt'}" in capsys.readouterr().out


def test_a_read_only_disk_at_the_final_save_is_exit_2_and_names_the_file(files, tmp_path, monkeypatch, capsys):
    run = tmp_path / "rm"
    args = ["train_reward", "offline_sentiment", "x", *cli_args(reward_config(files, run, **{"run.save_interval": 1}))]
    failing_writes(monkeypatch, "model.safetensors", errno.EROFS)
    code, error = run_cli(args, capsys)
    assert code == 2
    assert error.startswith(f"error: cannot write {run / 'model.safetensors'} (Read-only file system) while saving "
                            f"the final outputs; no partial file is left, and nothing was lost: its checkpoint of "
                            f"step 7 stays, and a rerun resumes from it."), error
    assert temporary_files(run) == [] and not (run / "model.safetensors").exists()


def test_an_unwritable_run_directory_at_the_start_is_exit_2_and_leaves_nothing(files, tmp_path, monkeypatch, capsys):
    run = tmp_path / "rm"
    args = ["train_policy", "offline_sentiment", "x", *cli_args(policy_config(files, run))]
    failing_writes(monkeypatch, "hparams.json", errno.EROFS)
    code, error = run_cli(args, capsys)
    assert code == 2
    assert error == (f"error: cannot write {run / 'hparams.json'} (Read-only file system) while starting the run; no "
                     f"partial file is left, and nothing was lost. Free space or make {run} writable (or pass "
                     f"--run.save_dir=DIR), then rerun the same command")
    assert not run.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root from writing")
def test_a_real_read_only_run_directory(files, tmp_path, capsys):
    run = tmp_path / "rm"
    args = ["train_reward", "offline_sentiment", "x", *cli_args(reward_config(files, run, **{"run.save_interval": 1}))]
    run.mkdir()
    run.chmod(0o555)
    try:
        code, error = run_cli(args, capsys)
    finally:
        run.chmod(0o755)
    assert code == 2 and error.startswith(f"error: cannot write {run / 'status.json'} (Permission denied)"), error
    assert list(run.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 5. Messages that say what is true
# ---------------------------------------------------------------------------------------------


def nan_lm_loss_at(monkeypatch, step: int):
    lm_loss = train_sft.lm_loss
    calls = []

    def loss(model, batch, *, pad_token):
        calls.append(1)
        return lm_loss(model, batch, pad_token=pad_token) * (math.nan if len(calls) == step else 1)

    monkeypatch.setattr(train_sft, "lm_loss", loss)


def test_the_nonfinite_stop_says_whether_a_checkpoint_exists(files, tmp_path, monkeypatch):
    nan_lm_loss_at(monkeypatch, 1)
    with pytest.raises(FloatingPointError) as before_first:
        train_lm(files, tmp_path / "first", **{"run.save_interval": 1})
    assert "it stopped before its first checkpoint, due after step 1 (--run.save_interval), so a rerun starts " \
           "over" in str(before_first.value)
    nan_lm_loss_at(monkeypatch, 3)
    with pytest.raises(FloatingPointError, match=r"rerun to resume from its last checkpoint, of step 2, or pass "
                                                 r"--run.skip_nonfinite=true"):
        train_lm(files, tmp_path / "third", **{"run.save_interval": 1})


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_status_143(files, tmp_path):
    config = policy_config(files, "", **{"ppo.total_episodes": 320})  # 40 updates, no save_interval

    def args(save_dir):
        return ["train_policy", "offline_sentiment", "x", *cli_args({**config, "run.save_dir": save_dir})]

    reference = start(args(tmp_path / "reference"), tmp_path / "reference.log")
    run = tmp_path / "stopped"
    victim = subprocess.Popen([sys.executable, "launch.py", *args(run)], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and len(rows(run)) >= 2):
            assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[1][-2000:]
            time.sleep(0.01)
        victim.send_signal(signal.SIGTERM)
        out, err = victim.communicate(timeout=60)
    finally:
        victim.kill()
    assert victim.returncode == 143, err[-2000:]
    step = status(run)["step"]
    assert err.rstrip("\n").rsplit("\n", 1)[-1] == (f"interrupted after step {step}, saved as a checkpoint; rerun the "
                                                   f"same command to resume from it")
    assert "SIGTERM: stopping at the end of this step, after saving a checkpoint (send it again to stop at once)" in err
    assert status(run)["state"] == "interrupted" and status(run)["exit_status"] == 143
    assert checkpoint_names(run)[-2:] == [f"step_{step:06d}.pt", f"step_{step:06d}.pt.sha256"]
    rerun = subprocess.run([sys.executable, "launch.py", *args(run)], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0 and f"resuming from {run / 'checkpoints' / f'step_{step:06d}.pt'}" in rerun.stdout
    assert reference.wait(timeout=120) == 0
    assert_same_run(run, tmp_path / "reference")


def signal_during_update(monkeypatch, update: int, times: int = 1, signum=signal.SIGINT):
    step = train_policy.PPOTrainer.step

    def signalled(self):
        if self.update + 1 == update:
            for _ in range(times):
                os.kill(os.getpid(), signum)
                time.sleep(0.01)  # the handler runs in this thread between bytecodes
        return step(self)

    monkeypatch.setattr(train_policy.PPOTrainer, "step", signalled)


def test_ctrl_c_finishes_the_step_saves_and_a_rerun_resumes_exactly(files, tmp_path, monkeypatch, capsys):
    straight = train_ppo(files, tmp_path / "straight")
    run = tmp_path / "ppo"
    args = ["train_policy", "offline_sentiment", "x", *cli_args(policy_config(files, run))]
    handler = signal.getsignal(signal.SIGINT)
    signal_during_update(monkeypatch, 2)
    assert run_cli(args, capsys) == (130, "interrupted after step 2, saved as a checkpoint; rerun the same command "
                                          "to resume from it")
    assert checkpoint_names(run) == ["step_000002.pt", "step_000002.pt.sha256"]
    assert status(run)["state"] == "interrupted" and status(run)["exit_status"] == 130
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    monkeypatch.undo()
    assert launch.main(args) == 0
    assert_same_run(run, straight)


def test_a_second_ctrl_c_stops_at_once(files, tmp_path, monkeypatch, capsys):
    run = tmp_path / "ppo"
    args = ["train_policy", "offline_sentiment", "x", *cli_args(policy_config(files, run))]
    signal_during_update(monkeypatch, 2, times=2)
    assert run_cli(args, capsys) == (130, "interrupted before its first checkpoint; rerunning the same command "
                                          "starts over")
    assert not (run / "checkpoints").exists() and status(run)["state"] == "interrupted"


def test_sigterm_outside_a_training_step_is_one_line_and_status_143(monkeypatch, capsys):
    def terminated(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setitem(launch.COMMANDS, "sample", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    assert launch.main(["sample"]) == 143
    assert capsys.readouterr().err == "interrupted\n"
    assert signal.getsignal(signal.SIGTERM) is handler


# ---------------------------------------------------------------------------------------------
# 6. Checkpoints on a clock and on signals, the same on every rank; keeping them after the end
# ---------------------------------------------------------------------------------------------


def test_checkpoints_also_come_every_save_every_s_seconds(files, tmp_path, monkeypatch):
    crash_at_step = train_reward.RewardTrainer.train_step

    def crash(self, indices, lr):
        if self.step == 3:
            raise Crash
        return crash_at_step(self, indices, lr)

    monkeypatch.setattr(train_reward.RewardTrainer, "train_step", crash)
    with pytest.raises(Crash):
        train_rm(files, tmp_path / "clock", **{"run.save_every_s": 1e-9})
    assert checkpoint_names(tmp_path / "clock") == [f"step_00000{s}.pt{e}" for s in (2, 3) for e in ("", ".sha256")]
    with pytest.raises(Crash):
        train_rm(files, tmp_path / "default")  # 600 s: not within a tiny run
    assert not (tmp_path / "default" / "checkpoints").exists()
    with pytest.raises(HParamsError, match=r"'run.save_every_s': must be a finite number >= 0"):
        train_rm(files, tmp_path / "bad", **{"run.save_every_s": -1})


class FastClock:
    """A monotonic clock that runs an hour further at every reading."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 3600.0
        return self.now


def _one_rank_signalled(rank, world_size, config) -> dict:
    from lm_human_preferences import runtime
    from lm_human_preferences.run_status import Interrupted

    if rank == 1:  # only this rank's clock says a checkpoint is due, and only it gets SIGTERM
        runtime.time = FastClock()
        step = train_policy.PPOTrainer.step

        def signalled(self):
            if self.update == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
            return step(self)

        train_policy.PPOTrainer.step = signalled
    try:
        train_policy.train(hparams(train_policy.TrainPolicyHParams, config), exp_name="ppo")
    except Interrupted as e:
        return {"exit_status": e.exit_status, "message": str(e)}
    finally:
        gc.collect()  # the stopped trainer's DDP model before run_distributed destroys the process group
    return {}


def test_ranks_agree_on_clock_checkpoints_and_on_stopping_after_a_signal(files, tmp_path):
    run = tmp_path / "ppo"
    rank0, rank1 = run_distributed(_one_rank_signalled, 2, policy_config(files, run, **{
        "ppo.total_episodes": 64, "run.save_every_s": 3600, "run.keep_checkpoints": 5}))
    assert rank0 == rank1 == {"exit_status": 143, "message": "interrupted after step 3, saved as a checkpoint; rerun "
                                                             "the same command to resume from it"}
    assert checkpoint_names(run) == [f"step_00000{s}.pt{e}" for s in (1, 2, 3) for e in ("", ".sha256")]
    assert status(run) == {"state": "interrupted", "exit_status": 143, "step": 3, "error": rank0["message"]}


def test_keep_checkpoints_after_finish_keeps_them_and_a_rerun_still_does_nothing(files, tmp_path, monkeypatch,
                                                                                capsys):
    run = tmp_path / "rm"
    keep = {"run.save_interval": 1, "run.keep_checkpoints_after_finish": True}
    train_rm(files, run, **keep)
    assert checkpoint_names(run) == [f"step_00000{s}.pt{e}" for s in (6, 7) for e in ("", ".sha256")]
    assert status(run)["state"] == "finished"
    model = (run / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    train_rm(files, run, **keep)
    assert "holds this run, finished; nothing to do" in capsys.readouterr().out
    assert (run / "model.safetensors").stat().st_mtime_ns == model
    straight = train_rm(files, tmp_path / "straight")
    train_rm(files, run, **keep, **{"run.resume": "never"})  # trains again, from the start
    assert_same_model(run, straight)
