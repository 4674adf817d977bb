"""What reward training keeps beside its model: the model of its best held-out evaluation
(`BestModel`, for `select_best`) and each pair's rewards at each training visit
(`PairScoreLog`, for `labels.log_pair_scores`).

    best = BestModel()
    best.offer(step, {"eval/accuracy": 0.8, ...}, model)     # keeps a copy when the accuracy is the best so far
    best.restore(model)                                     # the best one's weights back into the model

    log = PairScoreLog(run_dir / "pair_scores.jsonl", uids=uids, resume_step=step, enabled=is_main)
    log.write(epoch=0, step=3, indices=idx, rewards=r)      # (b,), (b, 2): chosen, rejected; all ranks call it

`recording(reward_fn, visits)` is the reward function that also keeps what a pairwise loss asked
it, as those (b, 2) rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lm_human_preferences import distributed
from lm_human_preferences.logs import open_jsonl

PAIR_SCORES_FILE = "pair_scores.jsonl"


def recording(reward_fn, visits: list):
    """`reward_fn` that appends the rewards of each call of a pairwise label type's loss (which asks
    for the chosen responses, then the rejected ones, in one call) to `visits`, as (b, 2)."""
    def fn(queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        rewards = reward_fn(queries, responses)  # (2b,)
        visits.append(rewards.detach().float().reshape(2, -1).t())
        return rewards
    return fn


class BestModel:
    """The evaluation with the highest held-out accuracy so far (the first of equal ones): its
    step, statistics and a CPU copy of the model's state."""

    def __init__(self):
        self.step: int | None = None
        self.stats: dict[str, float] = {}
        self.weights: dict[str, torch.Tensor] | None = None

    def offer(self, step: int, stats: dict[str, float], model: torch.nn.Module) -> bool:
        """Keep `model`'s weights when `stats["eval/accuracy"]` beats the best; whether it did."""
        if self.step is not None and not stats["eval/accuracy"] > self.stats["eval/accuracy"]:
            return False
        self.step, self.stats = step, dict(stats)
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def restore(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.weights)

    def summary(self) -> dict[str, float]:
        """`best/step` and the best evaluation's statistics as `best/eval/...`."""
        return {"best/step": self.step, **{f"best/{k}": v for k, v in self.stats.items()}}

    def state_dict(self) -> dict:
        return {"step": self.step, "stats": self.stats, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.stats, self.weights = state["step"], dict(state["stats"]), state["weights"]


class PairScoreLog:
    """<run>/pair_scores.jsonl: one row {"epoch", "step", "uid", "r_chosen", "r_rejected"} per pair
    per training visit, the rows of every rank gathered to rank 0, which writes them. A resumed
    run keeps the rows up to its checkpoint's step."""

    def __init__(self, path: Path, *, uids: list[str], resume_step: int, enabled: bool):
        self.uids = uids
        self.file = open_jsonl(path, resume_step=resume_step) if enabled else None

    def write(self, *, epoch: int, step: int, indices: torch.Tensor, rewards: torch.Tensor) -> None:
        """This rank's label indices (b,) and their rewards (b, 2) at `step` (1-based); every rank calls it."""
        indices = distributed.all_gather_cat(indices.to(rewards.device))
        rewards = distributed.all_gather_cat(rewards.float())
        if self.file is None:
            return
        for i, (chosen, rejected) in zip(indices.tolist(), rewards.tolist()):
            self.file.write(json.dumps({"epoch": epoch, "step": step, "uid": self.uids[i], "r_chosen": chosen,
                                        "r_rejected": rejected}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
