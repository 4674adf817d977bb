"""Reward training past one epoch (reward_tracking, train_reward): epochs, held-out evaluations
at epoch ends and every eval_interval steps, the best-accuracy model (select_best) and each
pair's rewards at each visit (labels.log_pair_scores → pair_scores.jsonl)."""

import json

import pytest
import tiny
import torch
from dist_utils import run_distributed
from test_pairs_training import LQ, LR, make_pairs

import launch
from lm_human_preferences import reward_tracking, train_reward
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language.checkpoints import load_weights
from lm_human_preferences.preferences import write_pairs


@pytest.fixture(scope="module")
def pair_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("tracking_task")
    pairs = make_pairs(24)
    for i, pair in enumerate(pairs):
        if i % 2:
            pair.meta["uid"] = f"pair-{i}"  # the others are named by their row index
    write_pairs(d / "pairs.jsonl", pairs, format="pairs")
    return {"model": tiny.make_model(d / "model", encoding=tiny.small_encoding()),
            "corpus": tiny.make_corpus(d / "corpus.txt"), "pairs": d / "pairs.jsonl"}


def hparams(task, save_dir, **extra) -> train_reward.TrainRewardHParams:
    """16 training pairs in batches of 8 (2 steps an epoch), 8 held out."""
    hp = train_reward.TrainRewardHParams()
    hp.override_from_dict({**tiny.task_overrides(task["model"], task["corpus"], query_length=LQ, response_length=LR),
                           "labels.source": str(task["pairs"]), "labels.type": "preference", "labels.num_train": 16,
                           "batch_size": 8, "lr": 1e-3, "rollout_batch_size": 8, "normalize_samples": 16,
                           "eval_batch_size": 8, "run.save_dir": str(save_dir), "run.wandb": "off",
                           "run.device": "cpu", **extra})
    return hp


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_best_model_keeps_the_first_best_accuracy():
    model = torch.nn.Linear(2, 1)
    best = reward_tracking.BestModel()
    for step, accuracy in ((1, 0.5), (2, 0.75), (3, 0.75), (4, 0.25)):
        with torch.no_grad():
            model.weight.fill_(step)
        best.offer(step, {"eval/accuracy": accuracy, "eval/loss": 1.0 / step}, model)
    assert best.summary() == {"best/step": 2, "best/eval/accuracy": 0.75, "best/eval/loss": 0.5}
    copy = reward_tracking.BestModel()
    copy.load_state_dict(best.state_dict())
    copy.restore(model)
    assert model.weight.tolist() == [[2.0, 2.0]]


def test_three_epochs_visit_each_pair_three_times(pair_task, tmp_path):
    run = train_reward.train(hparams(pair_task, tmp_path / "rm", epochs=3, **{"labels.log_pair_scores": True}),
                             exp_name="epochs")
    rows = jsonl(run / "pair_scores.jsonl")
    assert len(rows) == 16 * 3 and set(rows[0]) == {"epoch", "step", "uid", "r_chosen", "r_rejected"}
    uids = [f"pair-{i}" if i % 2 else str(i) for i in range(16)]  # the training pairs
    for uid in uids:
        visits = [r for r in rows if r["uid"] == uid]
        assert [r["epoch"] for r in visits] == [0, 1, 2]
    assert all(r["epoch"] == (r["step"] - 1) // 2 for r in rows)
    assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4, 5, 6]
    logged = {r["step"]: r for r in jsonl(run / "metrics.jsonl")}
    for step in range(1, 7):  # the logged training accuracy is that of the rows written
        mine = [r for r in rows if r["step"] == step]
        share = sum(r["r_chosen"] > r["r_rejected"] for r in mine) / len(mine)
        assert logged[step]["train/accuracy"] == pytest.approx(share)
    assert "eval/accuracy" in logged[2] and "eval/accuracy" in logged[4] and "eval/accuracy" in logged[6]
    assert "eval/accuracy" not in logged[3]
    assert [r["train/lr"] for r in (logged[s] for s in range(1, 7))] == \
        pytest.approx([1e-3 * (1 - k / 6) for k in range(6)], rel=1e-12)  # annealed over all epochs


def _train_with_pair_scores(rank, world_size, hp):
    run = train_reward.train(hp, exp_name="ranks")
    return jsonl(run / "pair_scores.jsonl") if rank == 0 else (run / "pair_scores.jsonl").exists()


def test_two_ranks_write_every_pair_once_a_visit(pair_task, tmp_path):
    """Rank 0 writes the rows of both ranks: the same pairs and steps as one rank."""
    hp = hparams(pair_task, tmp_path / "one", epochs=2, **{"labels.log_pair_scores": True})
    [one] = run_distributed(_train_with_pair_scores, 1, hp)
    hp.run.save_dir = str(tmp_path / "two")
    two, _ = run_distributed(_train_with_pair_scores, 2, hp)
    assert len(two) == 32
    key = lambda r: (r["step"], r["uid"])  # noqa: E731
    assert sorted(map(key, two)) == sorted(map(key, one))
    for a, b in zip(sorted(one, key=key), sorted(two, key=key)):
        assert b["r_chosen"] == pytest.approx(a["r_chosen"], rel=1e-4, abs=1e-5)


def test_eval_interval_adds_evaluations(pair_task, tmp_path):
    run = train_reward.train(hparams(pair_task, tmp_path / "rm", epochs=2, eval_interval=3), exp_name="interval")
    evaluated = [r["step"] for r in jsonl(run / "metrics.jsonl") if "eval/accuracy" in r]
    assert evaluated == [2, 3, 4]  # the first epoch's end, step 3, and the final one
    assert not (run / "pair_scores.jsonl").exists()


def test_select_best_saves_the_best_evaluations_model(pair_task, tmp_path, monkeypatch):
    """Scripted held-out accuracies peak at step 2: the saved model is the one after step 2."""
    accuracies = iter([0.5, 0.875, 0.625, 0.75, 0.75, 0.5])
    monkeypatch.setattr(train_reward.RewardTrainer, "evaluate",
                        lambda self: {"eval/accuracy": next(accuracies), "eval/loss": 0.0})
    after_step = {}
    train_step = train_reward.RewardTrainer.train_step

    def recording(self, indices, lr):
        out = train_step(self, indices, lr)
        after_step[self.step + 1] = {k: v.clone() for k, v in self.reward_model.gpt.state_dict().items()}
        return out

    monkeypatch.setattr(train_reward.RewardTrainer, "train_step", recording)
    hp = hparams(pair_task, tmp_path / "rm", epochs=3, eval_interval=1, select_best=True, normalize_after=False)
    run = train_reward.train(hp, exp_name="best")
    final = jsonl(run / "metrics.jsonl")[-1]
    assert final["step"] == 6 and final["best/step"] == 2 and final["best/eval/accuracy"] == 0.875
    assert final["eval/accuracy"] == 0.5  # the final model's, not saved
    saved = load_weights(run).trunk
    assert all(torch.equal(saved[k], after_step[2][k]) for k in saved)
    assert not all(torch.equal(saved[k], after_step[6][k]) for k in saved)


class Crash(Exception):
    pass


def test_a_resumed_run_keeps_its_best_model(pair_task, tmp_path, monkeypatch):
    """The best evaluation (step 2) is in the checkpoint the run resumes from (step 2); the pair
    scores of step 3, written before the crash, are written once."""
    by_step = {1: 0.5, 2: 0.875, 3: 0.625, 4: 0.75, 5: 0.75, 6: 0.5}
    monkeypatch.setattr(train_reward.RewardTrainer, "evaluate",
                        lambda self: {"eval/accuracy": by_step[self.step], "eval/loss": 0.0})
    options = dict(epochs=3, eval_interval=1, select_best=True, normalize_after=False,
                   **{"run.save_interval": 2, "labels.log_pair_scores": True})
    straight = train_reward.train(hparams(pair_task, tmp_path / "straight", **options), exp_name="straight")
    train_step = train_reward.RewardTrainer.train_step

    def crash_after_step_3(self, indices, lr):
        if self.step == 3:
            raise Crash
        return train_step(self, indices, lr)

    monkeypatch.setattr(train_reward.RewardTrainer, "train_step", crash_after_step_3)
    with pytest.raises(Crash):
        train_reward.train(hparams(pair_task, tmp_path / "resumed", **options), exp_name="resumed")
    monkeypatch.setattr(train_reward.RewardTrainer, "train_step", train_step)
    resumed = train_reward.train(hparams(pair_task, tmp_path / "resumed", **options), exp_name="resumed")
    assert jsonl(resumed / "metrics.jsonl")[-1]["best/step"] == 2
    assert jsonl(resumed / "pair_scores.jsonl") == jsonl(straight / "pair_scores.jsonl")  # no visit twice
    a, b = load_weights(straight).trunk, load_weights(resumed).trunk
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_options_name_their_key(pair_task, tmp_path, capsys):
    hp = hparams(pair_task, tmp_path / "a", **{"labels.type": "best_of_4", "labels.log_pair_scores": True})
    with pytest.raises(HParamsError, match="preference or soft_preference"):
        hp.validate()
    args = ["train_reward", "offline_sentiment", "x", f"--task.policy.initial_model={pair_task['model']}",
            f"--task.query_dataset={pair_task['corpus']}", f"--task.query_length={LQ}",
            f"--task.response_length={LR}", f"--labels.source={pair_task['pairs']}", "--labels.type=preference",
            "--labels.num_train=24", "--batch_size=8", "--select_best=on", "--run.device=cpu", "--run.wandb=off",
            f"--run.save_dir={tmp_path / 'b'}"]
    assert launch.main(args) == 2
    assert "select_best" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_the_pipeline_report_names_the_best_models_step(tmp_path):
    from lm_human_preferences import pipeline

    side = {"score": 0.0, "gold": 0.0, "kl": 0.0, "texts": ["a"], "gold_each": [0.0]}
    for reward_eval, expected in (({"eval/accuracy": 0.5}, "accuracy: 0.500 (chance"),
                                  ({"eval/accuracy": 0.5, "best/step": 4, "best/eval/accuracy": 0.75},
                                   "accuracy: 0.750 (the best evaluation's model, from step 4) (chance")):
        pipeline.write_report(tmp_path / "report.md", task_name="t", before=side, after=side, query_texts=["q"],
                              timings={}, reward_eval=reward_eval)
        assert expected in (tmp_path / "report.md").read_text()
