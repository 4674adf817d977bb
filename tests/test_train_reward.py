"""Reward trainer (docs/original.md §5) end to end on tiny models, CPU only, no network: normalization,
learning a rule, 2 ranks == 1 rank, gradient accumulation, resume, label validation, the CLI."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from safetensors.torch import load_file

import params
import tiny
from lm_human_preferences import label_types, lm_tasks, train_reward
from lm_human_preferences.labels import LabelFileError
from lm_human_preferences.policy import Policy
from lm_human_preferences.runtime import Run

ROOT = Path(__file__).resolve().parents[1]
LQ, LR = 8, 6  # query / response length of the tiny task
SAMPLE_RESPONSES = lm_tasks.sample_responses  # the real one, while tests spy on it




def make_task(d: Path, *, encoding=None, n_labels=96, **model_kwargs) -> dict:
    """A tiny model, corpus and rule-decided labels."""
    return {"model": tiny.make_model(d / "model", encoding=encoding, **model_kwargs),
            "corpus": tiny.make_corpus(d / "corpus.txt"),
            "labels": tiny.make_best_of_4_labels(d / "labels.json", n=n_labels, query_length=LQ, response_length=LR,
                                                 encoding=encoding)}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Tiny model with the corpus' 64-token GPT-2 subset vocabulary; 96 labels: 64 train, 32 held out."""
    return make_task(tmp_path_factory.mktemp("tiny_task"), encoding=tiny.small_encoding())


@pytest.fixture(scope="module")
def gpt2_task(tmp_path_factory):
    """The same with GPT-2's full 50257-token vocabulary."""
    return make_task(tmp_path_factory.mktemp("gpt2_task"))


def overrides(task, save_dir, **extra) -> dict:
    """A small, fast reward-training config: 8 steps of 8 labels, normalization on 32 samples."""
    return {**tiny.task_overrides(task["model"], task["corpus"], query_length=LQ, response_length=LR),
            "labels.source": str(task["labels"]), "labels.num_train": 64, "batch_size": 8, "lr": 1e-3,
            "rollout_batch_size": 16, "normalize_samples": 32, "eval_batch_size": 16,
            "run.save_dir": str(save_dir), "run.wandb": "off", "run.device": "cpu", **extra}


def make_hp(task, save_dir, **extra) -> train_reward.TrainRewardHParams:
    hp = train_reward.TrainRewardHParams()
    hp.override_from_dict(overrides(task, save_dir, **extra))
    return hp


def build_trainer(hp) -> train_reward.RewardTrainer:
    """What `train_reward.train` builds, without running it."""
    hp.validate()
    run = Run(hp.run, exp_name="rm", config=hp)
    initial = lm_tasks.load_pretrained(hp.task.policy.initial_model)
    label_type, rows = train_reward.load_label_rows(hp, hp.task, encoding=initial.encoding, data_dir=hp.run.data_dir)
    return train_reward.RewardTrainer(run=run, hp=hp, task=hp.task, encoding=initial.encoding,
                                      reward_model=train_reward.build_reward_model(initial, seed=hp.run.seed),
                                      policy=Policy(initial.gpt), label_type=label_type, rows=rows)


def metrics(save_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines()]


def final_params(save_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(save_dir) / "model.safetensors"))


def assert_params_close(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------
# Normalization (docs/original.md §5)
# ---------------------------------------------------------------------------------------------


def test_normalize_gives_fresh_policy_samples_mean_0_std_1(task, tmp_path):
    trainer = build_trainer(make_hp(task, tmp_path / "rm", normalize_samples=2048, rollout_batch_size=512))
    norm = trainer.normalize(target_mean=0.0, target_std=1.0, step_seed=0)
    assert norm["std"] > 0
    assert float(trainer.reward_model.reward_gain.detach()) == pytest.approx(1 / norm["std"])
    assert float(trainer.reward_model.reward_bias.detach()) == pytest.approx(-norm["mean"] / norm["std"])

    # fresh samples: the next queries of the stream, responses drawn with other noise
    generator = torch.Generator().manual_seed(12345)
    scores = []
    with torch.no_grad():
        for _ in range(4):
            queries = next(trainer.queries)  # (512, Lq)
            responses = lm_tasks.sample_responses(trainer.policy, queries, task=trainer.task,
                                                  encoding=trainer.encoding, generator=generator)
            scores.append(trainer.reward_model(queries, responses, pad_token=trainer.encoding.padding_token))
    scores = torch.cat(scores).double()  # (2048,)
    assert abs(float(scores.mean())) < 0.1
    assert abs(float(scores.std(unbiased=False)) - 1) < 0.1


def _spy_sampling(monkeypatch) -> list[dict]:
    """Record every `lm_tasks.sample_responses` call: the policy, its weights at the time, the
    generator's state before the call, the queries and the responses."""
    calls = []

    def spy(policy, queries, *, generator, **kwargs):
        call = {"policy": policy, "weights": {k: v.clone() for k, v in policy.gpt.state_dict().items()},
                "generator_state": generator.get_state(), "queries": queries.clone(), "kwargs": kwargs}
        call["responses"] = SAMPLE_RESPONSES(policy, queries, generator=generator, **kwargs)
        calls.append(call)
        return call["responses"]

    monkeypatch.setattr(lm_tasks, "sample_responses", spy)
    return calls


def test_normalize_ignores_the_reward_trunk_when_sampling(task, tmp_path, monkeypatch):
    """Replacing the reward model's trunk changes the rewards, never the samples they are taken on."""
    hp = make_hp(task, tmp_path / "rm")
    a, b = build_trainer(hp), build_trainer(hp)
    with torch.no_grad():
        torch.manual_seed(1)
        b.reward_model.gpt.reset_parameters()  # a different trunk for b's reward model
    calls = _spy_sampling(monkeypatch)
    norm_a = a.normalize(target_mean=0.0, target_std=1.0, step_seed=0)
    n_a = len(calls)
    norm_b = b.normalize(target_mean=0.0, target_std=1.0, step_seed=0)
    assert n_a == len(calls) - n_a == 2  # 32 samples in batches of 16
    for call_a, call_b in zip(calls[:n_a], calls[n_a:]):
        assert call_a["policy"] is a.policy and call_b["policy"] is b.policy
        torch.testing.assert_close(call_a["queries"], call_b["queries"], rtol=0, atol=0)
        torch.testing.assert_close(call_a["responses"], call_b["responses"], rtol=0, atol=0)
    assert norm_a["mean"] != pytest.approx(norm_b["mean"])  # ...but they were scored by different trunks
    for trainer in (a, b):
        assert trainer.policy.gpt is not trainer.reward_model.gpt
        policy_storage = {p.data_ptr() for p in trainer.policy.parameters()}
        assert not policy_storage & {p.data_ptr() for p in trainer.reward_model.parameters()}


def test_normalize_after_training_samples_from_the_initial_policy(task, tmp_path, monkeypatch):
    calls = _spy_sampling(monkeypatch)
    trunks = []  # the reward trunk each time normalization runs
    normalize = train_reward.RewardTrainer.normalize

    def spy_normalize(self, **kwargs):
        trunks.append({k: v.clone() for k, v in self.reward_model.gpt.state_dict().items()})
        return normalize(self, **kwargs)

    monkeypatch.setattr(train_reward.RewardTrainer, "normalize", spy_normalize)
    hp = make_hp(task, tmp_path / "rm", lr=1e-2)
    train_reward.train(hp, exp_name="rm")
    assert len(trunks) == 2 and len(calls) == 4  # before and after training, 2 batches each

    initial = lm_tasks.load_pretrained(str(task["model"]))
    initial_weights = initial.gpt.state_dict()
    trained = trunks[1]
    assert any(not torch.equal(trained[k], initial_weights[k]) for k in initial_weights), "training changed nothing"
    for call in calls:
        # the policy sampled from holds the initial weights, also after the reward trunk was trained
        for k, v in initial_weights.items():
            torch.testing.assert_close(call["weights"][k], v, rtol=0, atol=0)
        # and re-sampling from the initial model with the same noise gives the same responses
        generator = torch.Generator().set_state(call["generator_state"])
        responses = SAMPLE_RESPONSES(Policy(initial.gpt), call["queries"], task=hp.task, encoding=initial.encoding,
                                     generator=generator, shard=call["kwargs"]["shard"])
        torch.testing.assert_close(responses, call["responses"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------


def test_learns_rule_decided_labels(tmp_path):
    """Best of 4 = the sample with the most ' good' tokens: >= 90% held-out accuracy."""
    model = tiny.make_model(tmp_path / "model", n_embd=32, encoding=tiny.small_encoding())
    corpus = tiny.make_corpus(tmp_path / "corpus.txt")
    labels = tiny.make_best_of_4_labels(tmp_path / "labels.json", n=768 + 256, query_length=LQ,
                                        response_length=LR, unique_best=True, encoding=tiny.small_encoding())
    hp = make_hp({"model": model, "corpus": corpus, "labels": labels}, tmp_path / "rm", **{
        "labels.num_train": 768, "batch_size": 16, "lr": 3e-3, "rollout_batch_size": 64, "normalize_samples": 64,
        "eval_batch_size": 128})
    train_reward.train(hp, exp_name="rm")
    rows = metrics(tmp_path / "rm")
    final = rows[-1]
    assert final["step"] == 768 // 16
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), steps  # one row per logged step: the last one's with the evaluation
    assert final["eval/accuracy"] >= 0.9, final
    assert final["eval/loss"] < 0.5 * math.log(4), final
    first_loss = next(r["train/loss"] for r in rows if "train/loss" in r)
    assert final["train/loss"] < first_loss


# ---------------------------------------------------------------------------------------------
# Distribution and gradient accumulation
# ---------------------------------------------------------------------------------------------


def _train_and_capture(rank, world_size, hp_overrides: dict) -> dict:
    """Run `train_reward.train` on this rank; return its final parameters and normalizations."""
    captured = {"normalizations": []}
    normalize, train = train_reward.RewardTrainer.normalize, train_reward.RewardTrainer.train

    def spy_normalize(self, **kwargs):
        captured["normalizations"].append(normalize(self, **kwargs))
        return captured["normalizations"][-1]

    def spy_train(self, logger):
        captured["final"] = train(self, logger)
        captured["params"] = {k: v.detach().clone() for k, v in self.reward_model.state_dict().items()}
        captured["world_size"] = self.run.world_size
        # one held-out label: rank 1 of 2 has none to evaluate, yet joins the same collective
        held_out = self.eval_labels
        self.eval_labels = {k: v[:1] for k, v in held_out.items()}
        captured["eval_one_label"] = self.evaluate()
        self.eval_labels = held_out
        return captured["final"]

    train_reward.RewardTrainer.normalize, train_reward.RewardTrainer.train = spy_normalize, spy_train
    try:
        hp = train_reward.TrainRewardHParams()
        hp.override_from_dict(hp_overrides)
        train_reward.train(hp, exp_name="rm")
    finally:
        train_reward.RewardTrainer.normalize, train_reward.RewardTrainer.train = normalize, train
    return captured


def test_sharded_sampling_does_not_depend_on_the_number_of_ranks(task):
    """With `shard=(rank, world_size)` rank r's responses to rows r::world_size of a batch are the
    responses a single process gives to those rows (normalization relies on it)."""
    initial = lm_tasks.load_pretrained(str(task["model"]))
    policy, pad = Policy(initial.gpt), initial.encoding.padding_token
    contexts = torch.randint(0, initial.encoding.n_vocab, (6, LQ), generator=torch.Generator().manual_seed(0))

    def sample(contexts, shard):
        return policy.respond(contexts, length=LR, temperature=0.7, pad_token=pad, shard=shard,
                              generator=torch.Generator().manual_seed(7))

    whole = sample(contexts, None)
    torch.testing.assert_close(sample(contexts, (0, 1)), whole, rtol=0, atol=0)
    for rank in range(3):
        torch.testing.assert_close(sample(contexts[rank::3], (rank, 3)), whole[rank::3], rtol=0, atol=0)
    assert not torch.equal(sample(contexts[1::3], None), whole[1::3])  # unsharded: rank 1 would differ


def test_two_ranks_match_one_rank(task, tmp_path):
    """Same global batch (8 labels a step, 16 queries a normalization batch) on 1 and 2 gloo ranks;
    the 2-rank run also accumulates gradients (2 micro-batches of 2 per rank, DDP no_sync)."""
    one = run_distributed(_train_and_capture, 1, overrides(task, tmp_path / "one"))
    two = run_distributed(_train_and_capture, 2, overrides(task, tmp_path / "two", micro_batch_size=2))
    assert [r["world_size"] for r in one + two] == [1, 2, 2]
    reference = one[0]
    assert len(reference["normalizations"]) == 2  # before and after training
    for result in two:
        assert_params_close(result["params"], reference["params"])
        for norm, ref in zip(result["normalizations"], reference["normalizations"], strict=True):
            for key in ("mean", "std", "gain", "bias"):
                assert norm[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (key, norm, ref)
        for key in ("eval/accuracy", "eval/loss", "train/loss"):
            assert result["final"][key] == pytest.approx(reference["final"][key], rel=1e-5, abs=1e-6), key
        assert result["eval_one_label"] == pytest.approx(reference["eval_one_label"], rel=1e-5)
    assert set(reference["eval_one_label"]) == {"eval/loss", "eval/accuracy"}
    # the ranks hold identical models
    for k, v in two[0]["params"].items():
        torch.testing.assert_close(two[1]["params"][k], v, rtol=0, atol=0)
    # and training did something: the parameters moved away from the initial trunk
    initial = lm_tasks.load_pretrained(str(task["model"])).gpt.state_dict()
    assert not torch.allclose(reference["params"]["gpt.ln_f.weight"], initial["ln_f.weight"])
    assert (tmp_path / "two" / "model.safetensors").is_file()


def test_gradient_accumulation_matches_one_batch(task, tmp_path, monkeypatch):
    batch_sizes = []
    loss = label_types.BestOfN.loss

    def spy_loss(self, reward_fn, labels):
        batch_sizes.append(len(labels["best"]))
        return loss(self, reward_fn, labels)

    monkeypatch.setattr(label_types.BestOfN, "loss", spy_loss)
    train_reward.train(make_hp(task, tmp_path / "whole"), exp_name="whole")
    whole = batch_sizes[:]
    batch_sizes.clear()
    train_reward.train(make_hp(task, tmp_path / "micro", micro_batch_size=2), exp_name="micro")
    # training batches (eval batches of 16 come last)
    assert whole[:8] == [8] * 8 and batch_sizes[:32] == [2] * 32
    assert_params_close(final_params(tmp_path / "micro"), final_params(tmp_path / "whole"))
    a, b = metrics(tmp_path / "micro")[-1], metrics(tmp_path / "whole")[-1]
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
    assert a["normalize/after/gain"] == pytest.approx(b["normalize/after/gain"], rel=1e-5)


def test_micro_batch_must_divide_the_rank_batch(task, tmp_path):
    with pytest.raises(train_reward.HParamsError, match="micro_batch_size"):
        train_reward.train(make_hp(task, tmp_path / "rm", micro_batch_size=3), exp_name="rm")
    assert not (tmp_path / "rm").exists()


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_resume_after_a_crash_matches_an_uninterrupted_run(task, tmp_path, monkeypatch):
    every_2 = {"run.save_interval": 2}  # 8 steps: checkpoints after steps 2, 4 and 6
    train_reward.train(make_hp(task, tmp_path / "straight", **every_2), exp_name="straight")
    assert not (tmp_path / "straight" / "checkpoints").exists()  # removed once the model is saved

    crashed = tmp_path / "crashed"
    train_step = train_reward.RewardTrainer.train_step
    steps_run = []

    def crash_at_step_5(self, indices, lr):
        if self.step == 5:
            raise Crash("simulated crash")
        steps_run.append(self.step)
        return train_step(self, indices, lr)

    monkeypatch.setattr(train_reward.RewardTrainer, "train_step", crash_at_step_5)
    with pytest.raises(Crash):
        train_reward.train(make_hp(task, crashed, **every_2), exp_name="crashed")
    assert sorted(p.name for p in (crashed / "checkpoints").glob("*.pt")) == ["step_000002.pt", "step_000004.pt"]
    assert not (crashed / "model.safetensors").exists()

    steps_run.clear()
    monkeypatch.setattr(train_reward.RewardTrainer, "train_step",
                        lambda self, indices, lr: steps_run.append(self.step) or train_step(self, indices, lr))
    train_reward.train(make_hp(task, crashed, **every_2), exp_name="crashed")
    assert steps_run == [4, 5, 6, 7]  # resumed after the step-4 checkpoint
    assert_params_close(final_params(crashed), final_params(tmp_path / "straight"), atol=0)
    straight, resumed = metrics(tmp_path / "straight"), metrics(crashed)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # no step logged twice
    assert resumed[-1] == pytest.approx(straight[-1])
    assert not (crashed / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# Bad label files fail before anything is written
# ---------------------------------------------------------------------------------------------


def _break_row(field: str, value):
    def edit(rows):
        if value is DELETE:
            del rows[3][field]
        else:
            rows[3][field] = value
        return json.dumps(rows)
    return edit


DELETE = object()
BAD_LABELS = {
    "query too short": (_break_row("query", [1] * (LQ - 1)), r"row 3, field 'query': expected 8 token ids, got 7"),
    "sample0 not a list": (_break_row("sample0", 5), r"row 3, field 'sample0': expected a list of 6 token ids"),
    "sample1 token a string": (_break_row("sample1", [1, 2, "x", 4, 5, 6]),
                               r"row 3, field 'sample1': token 2: expected an integer token id"),
    "sample2 token out of vocab": (_break_row("sample2", [1, 2, 3, 4, 5, 50257]),
                                   r"row 3, field 'sample2': token 5: expected an id in \[0, 50257\)"),
    "sample3 too long": (_break_row("sample3", [1] * (LR + 1)), r"row 3, field 'sample3': expected 6 token ids, got 7"),
    "best out of range": (_break_row("best", 4), r"row 3, field 'best': expected an integer in \[0, 4\), got 4"),
    "best a float": (_break_row("best", 1.0), r"row 3, field 'best': expected an integer in \[0, 4\), got float"),
    "best missing": (_break_row("best", DELETE), r"row 3, field 'best': missing"),
    "extra field": (_break_row("score", 1.0), r"row 3, field 'score': unexpected field"),
    "truncated JSON": (lambda rows: json.dumps(rows)[:1000], r"invalid JSON at line 1, column \d+: .*truncated"),
    "empty list": (lambda rows: "[]", r"empty list"),
    "not a list": (lambda rows: json.dumps({"rows": rows}), r"expected a JSON list of label objects"),
    "fewer rows than num_train": (lambda rows: json.dumps(rows[:40]), r"40 labels, but labels.num_train=64"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_bad_label_file_fails_before_training(gpt2_task, tmp_path, monkeypatch, case):
    edit, message = BAD_LABELS[case]
    rows = json.loads(gpt2_task["labels"].read_text())
    bad = tmp_path / "bad_labels.json"
    bad.write_text(edit(rows))

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_reward, "RewardTrainer", never)
    save_dir = tmp_path / "rm"
    with pytest.raises(LabelFileError) as error:
        train_reward.train(make_hp(gpt2_task, save_dir, **{"labels.source": str(bad)}), exp_name="rm")
    text = str(error.value)
    assert text.startswith(str(bad)), text
    assert re.search(message, text), text
    assert "\n" not in text
    assert not save_dir.exists()


def test_missing_label_file_fails_before_training(gpt2_task, tmp_path):
    save_dir = tmp_path / "rm"
    with pytest.raises(LabelFileError, match=r"nope\.json does not exist; pass --labels.source"):
        train_reward.train(make_hp(gpt2_task, save_dir, **{"labels.source": str(tmp_path / "nope.json")}),
                           exp_name="rm")
    assert not save_dir.exists()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def launch(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_trains_a_reward_model(gpt2_task, tmp_path):
    save_dir = tmp_path / "rm"
    result = launch("train_reward", "offline_sentiment", "cli_rm",
                    f"--task.policy.initial_model={gpt2_task['model']}", f"--task.query_dataset={gpt2_task['corpus']}",
                    f"--task.query_length={LQ}", f"--task.response_length={LR}",
                    f"--labels.source={gpt2_task['labels']}", "--labels.num_train=16", "--batch_size=8",
                    "--rollout_batch_size=8", "--normalize_samples=16", "--run.device=cpu", "--run.wandb=off",
                    f"--run.save_dir={save_dir}")
    assert result.returncode == 0, result.stderr
    assert {"model.safetensors", "config.json", "hparams.json", "metrics.jsonl"} <= {p.name for p in save_dir.iterdir()}
    config = json.loads((save_dir / "config.json").read_text())
    assert config["kind"] == "reward" and config["encoding"] == "gpt2"
    hparams = json.loads((save_dir / "hparams.json").read_text())
    assert hparams["labels"]["num_train"] == 16 and hparams["batch_size"] == 8
    final = metrics(save_dir)[-1]
    assert final["step"] == 2 and "eval/accuracy" in final and "normalize/after/gain" in final
    # the saved reward model loads back with its heads
    weights = load_file(str(save_dir / "model.safetensors"))
    assert {"heads.reward.weight", "heads.reward.bias", "heads.reward.gain", "heads.reward.gain_bias"} <= set(weights)
    assert float(weights["heads.reward.gain"]) == pytest.approx(final["normalize/after/gain"], rel=1e-6)


def test_cli_bad_flag_is_one_paragraph_with_a_suggestion(tmp_path):
    result = launch("train_reward", "offline_sentiment", "x", "--lables.source=x", f"--run.save_dir={tmp_path / 'rm'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    error = result.stderr.strip()
    assert error.startswith("error:") and "lables.source" in error and "'labels.source'" in error, error
    assert "\n\n" not in error
    assert not (tmp_path / "rm").exists()


def test_cli_help_lists_keys():
    result = launch("train_reward", "offline_sentiment", "x", "--help")
    assert result.returncode == 0, result.stderr
    for key in ("--labels.source=", "--batch_size=", "--micro_batch_size=", "--normalize_samples=",
                "--task.policy.initial_model=", "--run.save_dir=", "--run.save_interval="):
        assert key in result.stdout, key
    # with the task's presets applied
    num_train = params.TRAIN_REWARD["offline_sentiment"]["labels.num_train"]
    assert f"--labels.num_train={num_train}\n" in result.stdout
    assert f"--task.query_length={params.TASKS['offline_sentiment']['query_length']}\n" in result.stdout
