"""What every trainer does alike, as two plain functions (nanoGPT's loop body, nanochat's setup):

    accumulate_and_step   one optimizer step over micro-batches: set the learning rate, zero the
                          gradients; per micro-batch the trainer's losses (with its own autocast)
                          under DDP's no_sync but for the last, backward of loss / n_micro, the
                          statistics summed on the device; one host read; `Run.finite_or_skip`;
                          the optimizer step.
    run_training          the sequence of a trainer's `train()`: validate -> Run -> nothing to do
                          when finished -> build the trainer -> resume -> start -> train -> finish
                          (the final outputs) -> the line saying where they are.

A trainer is a plain class (`Trainer` lists what `run_training` asks of it); its own steps, and
what it logs, stay in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from lm_human_preferences.hparams import HParams
from lm_human_preferences.logs import Logger, print0
from lm_human_preferences.runtime import Run, add_scalars, to_floats


def accumulate_and_step(run: Run, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float,
                        n_micro: int, loss_of: Callable[[int], dict[str, torch.Tensor]], step: int,
                        loss_key: str = "loss", loss_name: str = "train/loss",
                        backward_in_autocast: bool = False) -> dict[str, float] | None:
    """One optimizer step at learning rate `lr` on `n_micro` micro-batches (gradient accumulation).

    `loss_of(m)` returns the scalar tensors of micro-batch m, the one to minimise under
    `loss_key`; it runs `model` (the DDP-wrapped one: its gradient all-reduce waits for the last
    micro-batch) and applies autocast where the trainer wants it. With `backward_in_autocast` the
    call and the backward pass both run under `run.autocast()` (backward ops then run in bf16
    too, which changes the gradients: a trainer keeps the choice it was written with).

    Returns the statistics averaged over the micro-batches (summed in float64 on the device and
    read back once), or None when `Run.finite_or_skip` skipped the step: a non-finite loss
    (reported as `loss_name`, at `step`) or gradient norm of the optimizer's parameters."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    for m in range(n_micro):
        autocast = run.autocast() if backward_in_autocast else contextlib.nullcontext()
        with run.no_sync(model, sync=m == n_micro - 1), autocast:
            out = loss_of(m)
            (out[loss_key] / n_micro).backward()
        add_scalars(sums, out, divide_by=n_micro)
    stats = to_floats(sums)  # one host read per step
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if not run.finite_or_skip(step, losses={loss_name: stats[loss_key]}, parameters=parameters):
        return None
    optimizer.step()
    return stats


class Trainer(Protocol):
    """What `run_training` asks of a trainer (PPOTrainer, RewardTrainer, SFTTrainer, LabelCollector)."""

    checkpoints: bool  # it has steps to checkpoint, resume from and stop after on SIGINT/SIGTERM
    steps_done: int  # steps done; after `load_state_dict`, the step the run resumes from
    model: torch.nn.Module | None  # what `Run.finish` checks finite before `save` (None: nothing)

    def load_state_dict(self, state: dict) -> None: ...  # a checkpoint's state (only with `checkpoints`)

    def train(self, logger: Logger) -> dict[str, float]: ...  # the steps left; the final statistics

    def save(self, save_dir: Path) -> None: ...  # the final outputs (on rank 0)

    def saved(self, final: dict[str, float]) -> str: ...  # the line printed once the run finished


def run_training(hp: HParams, *, exp_name: str, build: Callable[[Run], Trainer], outputs: tuple[str, ...] = ()) -> Path:
    """The run of one trainer, in order: validate `hp`; make the `Run`; return at once when its
    directory holds this run finished (`outputs`: its final files, default the model files);
    `build(run)` loads and checks the inputs and makes the trainer; resume from a checkpoint;
    start (status.json, hparams.json, the logger); train; finish (`trainer.save` writes the
    outputs, status.json says finished); print `trainer.saved`. Whatever stops it is recorded
    in status.json (`Run.stopped`) and raised. Returns the run directory."""
    hp.validate()
    run = Run(hp.run, exp_name=exp_name, config=hp)
    try:
        if run.already_finished(*outputs):
            return run.save_dir
        trainer = build(run)
        resumed = trainer.checkpoints and run.resume(trainer.load_state_dict)
        logger = run.start(resume_step=trainer.steps_done if resumed else None, stop_at_step_end=trainer.checkpoints)
        final = trainer.train(logger)
        run.finish(trainer.save, model=trainer.model)
        print0(trainer.saved(final))
        return run.save_dir
    except BaseException as e:
        run.stopped(e)
        raise
    finally:
        run.close()
