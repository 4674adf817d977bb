"""Layer freezing (freezing.py) and `train_sft --freeze_layers`: frozen blocks and position
embeddings keep their weights through SFT on prompt/response data, the rest trains, and the
result starts a reward model."""

import json

import pytest
import torch

import launch
import tiny
from lm_human_preferences import freezing, lm_tasks, train_reward
from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.train_sft import PromptResponses

RUN = ["--run.wandb=off", "--run.device=cpu"]


def gpt(n_layer: int) -> GPT:
    return GPT(GPTConfig(n_vocab=10, n_ctx=8, n_embd=8, n_head=2, n_layer=n_layer))


def test_freeze_layers_counts_blocks_from_the_input():
    assert [freezing.frozen_blocks(10, f) for f in (0, 0.05, 0.8, 0.85, 1)] == [0, 0, 8, 8, 10]
    model = gpt(5)
    frozen = freezing.freeze_layers(model, 0.8)
    assert {name.split(".")[0] + "." + name.split(".")[1] for name in frozen if name.startswith("h.")} == \
        {f"h.{i}" for i in range(4)}
    assert "wpe.weight" in frozen and "wte.weight" not in frozen
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("h.4.", "ln_f", "wte")))
    assert len(freezing.trainable(model)) == len(list(model.parameters())) - len(frozen)
    model = gpt(2)
    assert freezing.freeze_layers(model, 0.0) == [] and len(freezing.trainable(model)) == len(list(model.parameters()))
    assert freezing.freeze_layers(gpt(2), 0.0, embeddings=True) == ["wte.weight", "wpe.weight"]
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        freezing.frozen_blocks(4, 1.5)


def test_prompt_tokens_are_masked(tmp_path):
    enc = tiny.small_encoding()
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "the cat sat.", "response": " a dog ran."}) + "\n")
    batch = next(PromptResponses(path, encoding=enc, length=12, batch_size=1, rank=0, world_size=1, seed=0))
    prompt, response = enc.encode("the cat sat."), enc.encode(" a dog ran.") + [enc.eot_token]
    mask = batch["mask"][0]
    # position t predicts token t + 1: only the positions predicting response tokens count
    assert mask.tolist() == [False] * (len(prompt) - 1) + [True] * len(response) + \
        [False] * (12 - len(prompt) - len(response) + 1)
    assert batch["tokens"][0, 1:][mask].tolist() == response


def test_train_sft_freezes_the_first_blocks(tmp_path):
    enc = tiny.small_encoding()
    model = tiny.make_model(tmp_path / "base", encoding=enc, n_layer=2)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in
                            [("the cat sat.", " a dog ran."), ("big red house.", " the tree was good.")]))
    out = tmp_path / "sft"
    assert launch.main(["train_sft", "offline_sentiment", "x", f"--run.save_dir={out}", *RUN,
                        f"--initial_model={model}", f"--data={data}", "--freeze_layers=0.5", "--steps=3",
                        "--batch_size=2", "--seq_length=16", "--eval_interval=3", "--eval_batches=1",
                        "--warmup_steps=0", "--lr=1e-2"]) == 0
    before = lm_tasks.load_pretrained(str(model)).gpt.state_dict()
    after = lm_tasks.load_pretrained(str(out)).gpt.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("h.0.", "wpe.")) for k in changed)
    assert any(k.startswith("h.1.") for k in changed) and "wte.weight" in changed and "ln_f.weight" in changed
    assert json.loads((out / "hparams.json").read_text())["freeze_layers"] == 0.5
    # the fine-tuned model starts a reward model
    rm = train_reward.build_reward_model(lm_tasks.load_pretrained(str(out)), seed=0)
    assert rm is not None


def test_freeze_layers_out_of_range_is_a_user_error(tmp_path, capsys):
    assert launch.main(["train_sft", "offline_sentiment", "x", f"--run.save_dir={tmp_path / 'r'}", *RUN,
                        "--freeze_layers=1.5"]) == 2
    assert "freeze_layers" in capsys.readouterr().err and not (tmp_path / "r").exists()
