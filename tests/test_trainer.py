"""The shared trainer pieces: one optimizer step over micro-batches, and the train() sequence."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lm_human_preferences.hparams import HParams, HParamsError, check_count
from lm_human_preferences.runtime import Run, RunHParams
from lm_human_preferences.trainer import accumulate_and_step, run_training


@dataclass
class ToyHParams(HParams):
    run: RunHParams = field(default_factory=RunHParams)  # how it runs
    steps: int = 3  # optimizer steps

    def _validate(self):
        check_count(self, "steps")


def toy_hp(save_dir: Path, **run) -> ToyHParams:
    hp = ToyHParams()
    hp.run = RunHParams(save_dir=str(save_dir), device="cpu", wandb="off", save_every_s=0, **run)
    return hp


def make_run(tmp_path: Path, **run) -> Run:
    hp = toy_hp(tmp_path / "run", **run)
    hp.validate()
    return Run(hp.run, exp_name="toy", config=hp)


# ---------------------------------------------------------------------------------------------
# accumulate_and_step
# ---------------------------------------------------------------------------------------------


def regression(seed: int = 0):
    """A float64 linear model, its SGD optimizer, and a batch of 8 rows."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    return model, torch.optim.SGD(model.parameters(), lr=1.0), x, y


def mse_of(model, x, y, n_micro: int):
    rows = x.shape[0] // n_micro

    def loss_of(m: int) -> dict[str, torch.Tensor]:
        sl = slice(m * rows, (m + 1) * rows)
        err = model(x[sl]) - y[sl]
        return {"loss": err.square().mean(), "abs": err.abs().mean()}

    return loss_of


def test_micro_batches_accumulate_to_one_big_batch(tmp_path):
    run = make_run(tmp_path)
    results = []
    for n_micro in (1, 4):
        model, optimizer, x, y = regression()
        stats = accumulate_and_step(run, model=model, optimizer=optimizer, lr=0.1, n_micro=n_micro,
                                    loss_of=mse_of(model, x, y, n_micro), step=1)
        assert optimizer.param_groups[0]["lr"] == 0.1
        results.append((stats, [p.detach().clone() for p in model.parameters()]))
    (one, params_one), (four, params_four) = results
    assert one.keys() == four.keys() == {"loss", "abs"}
    for k in one:
        assert four[k] == pytest.approx(one[k], rel=1e-12)
    for a, b in zip(params_one, params_four):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    model, _, x, y = regression()
    assert not torch.equal(params_one[0], model.weight)  # the step was taken


def test_gradients_start_from_zero_each_step(tmp_path):
    run = make_run(tmp_path)
    model, optimizer, x, y = regression()
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e6)  # left over from elsewhere: must not leak into the step
    accumulate_and_step(run, model=model, optimizer=optimizer, lr=0.1, n_micro=2, loss_of=mse_of(model, x, y, 2),
                        step=1)
    fresh, fresh_opt, _, _ = regression()
    accumulate_and_step(run, model=fresh, optimizer=fresh_opt, lr=0.1, n_micro=2, loss_of=mse_of(fresh, x, y, 2),
                        step=1)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def nan_at(loss_of, bad: int):
    def poisoned(m: int) -> dict[str, torch.Tensor]:
        out = loss_of(m)
        return {**out, "loss": out["loss"] * math.nan} if m == bad else out

    return poisoned


def test_a_nonfinite_micro_batch_skips_the_step(tmp_path, capsys):
    run = make_run(tmp_path, skip_nonfinite=True)
    model, optimizer, x, y = regression()
    before = [p.detach().clone() for p in model.parameters()]
    stats = accumulate_and_step(run, model=model, optimizer=optimizer, lr=0.1, n_micro=4, step=5,
                                loss_of=nan_at(mse_of(model, x, y, 4), 2))
    assert stats is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert run.skipped_batches == 1
    assert "step 5: non-finite train/loss" in capsys.readouterr().err


def test_a_nonfinite_loss_stops_naming_the_step_and_the_loss(tmp_path):
    run = make_run(tmp_path)
    model, optimizer, x, y = regression()
    with pytest.raises(FloatingPointError, match=r"^step 7: non-finite ppo/loss/total on rank 0"):
        accumulate_and_step(run, model=model, optimizer=optimizer, lr=0.1, n_micro=2, step=7,
                            loss_of=nan_at(mse_of(model, x, y, 2), 1), loss_name="ppo/loss/total")


class AutocastProbe(torch.autograd.Function):
    """Identity that records whether CPU autocast is on during its backward pass."""

    seen: list[bool] = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        AutocastProbe.seen.append(torch.is_autocast_enabled("cpu"))
        return grad


@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_autocast_covers_the_backward_pass_only_when_asked(tmp_path, backward_in_autocast):
    run = make_run(tmp_path, dtype="bf16")
    model, optimizer, x, y = regression()
    in_loss = []

    def loss_of(m: int) -> dict[str, torch.Tensor]:
        in_loss.append(torch.is_autocast_enabled("cpu"))
        return {"loss": AutocastProbe.apply(model(x)).square().mean()}

    AutocastProbe.seen = []
    accumulate_and_step(run, model=model, optimizer=optimizer, lr=0.1, n_micro=2, loss_of=loss_of, step=1,
                        backward_in_autocast=backward_in_autocast)
    assert in_loss == AutocastProbe.seen == [backward_in_autocast] * 2


# ---------------------------------------------------------------------------------------------
# run_training
# ---------------------------------------------------------------------------------------------


class Crash(Exception):
    pass


class ToyTrainer:
    """Counts steps, checkpointing after each; records what `run_training` calls, in order."""

    def __init__(self, run: Run, hp: ToyHParams, calls: list, *, crash_at: int | None = None,
                 checkpoints: bool = True):
        self.run, self.hp, self.calls, self.crash_at = run, hp, calls, crash_at
        self.checkpoints = checkpoints
        self.model = torch.nn.Linear(1, 1)
        self.steps_done = 0

    def load_state_dict(self, state: dict) -> None:
        self.calls.append(("load_state_dict", state["step"]))
        self.steps_done = state["step"]

    def train(self, logger) -> dict[str, float]:
        self.calls.append(("train", self.steps_done))
        while self.steps_done < self.hp.steps:
            if self.steps_done == self.crash_at:
                raise Crash("killed")
            self.steps_done += 1
            logger.log(self.steps_done, {"loss": 1.0 / self.steps_done})
            if self.checkpoints:
                self.run.step_boundary(self.steps_done, self.hp.steps, lambda: {"step": self.steps_done})
        return {"loss": 1.0 / self.steps_done}

    def save(self, save_dir: Path) -> None:
        self.calls.append(("save", self.steps_done))
        (save_dir / "model.safetensors").write_text("weights")
        (save_dir / "config.json").write_text("{}")

    def saved(self, final: dict[str, float]) -> str:
        self.calls.append(("saved", final["loss"]))
        return f"toy saved to {self.run.save_dir}"


def toy_builder(hp: ToyHParams, calls: list, **kw):
    def build(run: Run) -> ToyTrainer:
        calls.append(("build", run.save_dir))
        return ToyTrainer(run, hp, calls, **kw)

    return build


def status(save_dir: Path) -> dict:
    return json.loads((save_dir / "status.json").read_text())


def test_the_sequence_runs_in_order_and_a_finished_run_is_left_alone(tmp_path, capsys):
    save_dir, calls = tmp_path / "run", []
    hp = toy_hp(save_dir)
    assert run_training(hp, exp_name="toy", build=toy_builder(hp, calls)) == save_dir
    assert calls == [("build", save_dir), ("train", 0), ("save", 3), ("saved", 1 / 3)]
    assert status(save_dir)["state"] == "finished"
    assert json.loads((save_dir / "hparams.json").read_text())["steps"] == 3
    assert f"toy saved to {save_dir}" in capsys.readouterr().out
    calls.clear()
    assert run_training(toy_hp(save_dir), exp_name="toy", build=toy_builder(hp, calls)) == save_dir
    assert calls == []  # finished with the same settings: nothing built, nothing trained


def test_invalid_settings_stop_before_the_run_is_made(tmp_path):
    hp, calls = toy_hp(tmp_path / "run"), []
    hp.steps = 0
    with pytest.raises(HParamsError, match="steps"):
        run_training(hp, exp_name="toy", build=toy_builder(hp, calls))
    assert calls == [] and not (tmp_path / "run").exists()


def test_a_crash_is_recorded_and_a_rerun_resumes_from_the_checkpoint(tmp_path):
    save_dir, calls = tmp_path / "run", []
    hp = toy_hp(save_dir, save_interval=1)
    with pytest.raises(Crash):
        run_training(hp, exp_name="toy", build=toy_builder(hp, calls, crash_at=2))
    assert status(save_dir)["state"] == "failed"
    assert calls == [("build", save_dir), ("train", 0)]
    calls.clear()
    run_training(hp, exp_name="toy", build=toy_builder(hp, calls))
    assert calls == [("build", save_dir), ("load_state_dict", 2), ("train", 2), ("save", 3), ("saved", 1 / 3)]
    steps = [json.loads(line)["step"] for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_trainer_without_checkpoints_never_resumes(tmp_path):
    save_dir, calls = tmp_path / "run", []
    hp = toy_hp(save_dir, save_interval=1)
    with pytest.raises(Crash):
        run_training(hp, exp_name="toy", build=toy_builder(hp, calls, crash_at=2))
    calls.clear()
    run_training(hp, exp_name="toy", build=toy_builder(hp, calls, checkpoints=False))
    assert calls == [("build", save_dir), ("train", 0), ("save", 3), ("saved", 1 / 3)]
