"""LoRA in the trainers (`--lora=on`, adapters.py): train_sft, train_reward and train_policy train
the adapters (and the heads) only, save the merged model and the adapters alone, and the merged
model is the base with the saved adapters merged in."""

import pytest
import tiny
import torch

from lm_human_preferences import adapters, train_policy, train_reward, train_sft
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language import lora
from lm_human_preferences.language.checkpoints import build_gpt, load_weights

LORA = {"lora": "on", "lora.rank": 2, "lora.alpha": 4.0, "lora.targets": "c_attn,mlp.c_fc"}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_task")
    enc = tiny.small_encoding()
    return {"model": tiny.make_model(d / "model", encoding=enc), "corpus": tiny.make_corpus(d / "corpus.txt"),
            "labels": tiny.make_best_of_4_labels(d / "labels.json", n=48, query_length=8, response_length=6,
                                                 encoding=enc)}


def check_lora_output(out, base):
    """`out` holds the adapters alone and the base with them merged in; the adapters trained."""
    config, tensors = lora.load_adapter(out)
    assert config["base"] == str(base) and config["rank"] == 2 and len(config["layers"]) == 4
    assert any(float(t.abs().sum()) > 0 for k, t in tensors.items() if k.endswith(".B"))  # B left zero
    expected = build_gpt(load_weights(base), base)
    lora.load_lora(expected, config, tensors)
    lora.merge_lora(expected)
    saved = load_weights(out)
    assert saved.meta["lora"]["rank"] == 2
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(saved.trunk[k], v, atol=1e-6, rtol=1e-6)
    untouched = [k for k in saved.trunk if "c_attn" not in k and "c_fc" not in k]
    base_trunk = load_weights(base).trunk
    assert all(torch.equal(saved.trunk[k], base_trunk[k]) for k in untouched)
    return saved


def test_train_policy_with_lora(task, tmp_path):
    hp = train_policy.TrainPolicyHParams()
    hp.override_from_dict(tiny.task_overrides(task["model"], task["corpus"]))
    hp.override_from_dict({"ppo.total_episodes": 16, "ppo.batch_size": 8, "ppo.noptepochs": 2, "ppo.lr": 1e-2,
                           "run.save_dir": str(tmp_path / "p"), "run.wandb": "off", "run.device": "cpu", **LORA})
    out = train_policy.train(hp, exp_name="p", score_fn=lambda q, r: (r % 7).float().mean(1))
    saved = check_lora_output(out, task["model"])
    assert "value.weight" in saved.heads


def test_train_sft_with_lora(task, tmp_path):
    hp = train_sft.TrainSFTHParams()
    hp.override_from_dict({"data": str(task["corpus"]), "initial_model": str(task["model"]), "seq_length": 16,
                           "batch_size": 4, "steps": 3, "lr": 1e-2, "warmup_steps": 0, "eval_interval": 100,
                           "run.save_dir": str(tmp_path / "s"), "run.wandb": "off", "run.device": "cpu", **LORA})
    check_lora_output(train_sft.train(hp, exp_name="s"), task["model"])


def test_train_reward_with_lora(task, tmp_path):
    hp = train_reward.TrainRewardHParams()
    hp.override_from_dict({**tiny.task_overrides(task["model"], task["corpus"], query_length=8, response_length=6),
                           "labels.source": str(task["labels"]), "labels.num_train": 32, "batch_size": 8,
                           "lr": 1e-2, "rollout_batch_size": 16, "normalize_samples": 16, "eval_batch_size": 16,
                           "run.save_dir": str(tmp_path / "r"), "run.wandb": "off", "run.device": "cpu", **LORA})
    saved = check_lora_output(train_reward.train(hp, exp_name="r"), task["model"])
    assert saved.meta["kind"] == "reward"


def test_lora_off_saves_no_adapter(task, tmp_path):
    hp = train_sft.TrainSFTHParams()
    hp.override_from_dict({"data": str(task["corpus"]), "initial_model": str(task["model"]), "seq_length": 16,
                           "batch_size": 4, "steps": 1, "warmup_steps": 0, "run.save_dir": str(tmp_path / "s"),
                           "run.wandb": "off", "run.device": "cpu"})
    out = train_sft.train(hp, exp_name="s")
    assert not lora.is_adapter_dir(out) and "lora" not in load_weights(out).meta


@pytest.mark.parametrize("key, value, says", [("rank", 0, "rank"), ("dropout", 1.0, "dropout"),
                                              ("targets", "c_nope", "names no layer")])
def test_bad_lora_settings(key, value, says):
    hp = adapters.LoRAHParams()
    setattr(hp, key, value)
    with pytest.raises(HParamsError, match=says):
        hp.validate()
