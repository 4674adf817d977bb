"""Weight merging (`launch.py merge`, soups.py): identical models merge to themselves, weights
(1, 0) give the first model, adapters merge as A and B separately or as B·A, and bad inputs are
one-paragraph errors with exit status 2."""

import launch
import pytest
import torch

from lm_human_preferences import soups
from lm_human_preferences.language import lora
from lm_human_preferences.language.checkpoints import load_weights, save_model
from lm_human_preferences.language.gpt import GPT, GPTConfig

CONFIG = GPTConfig(n_vocab=50, n_ctx=16, n_embd=16, n_head=2, n_layer=2)


def make(path, seed):
    torch.manual_seed(seed)
    gpt = GPT(CONFIG)
    return save_model(path, gpt=gpt, heads={"value.weight": torch.randn(1, 16)}, meta={"kind": "policy",
                                                                                     "encoding": "gpt2"})


def make_adapter(path, base, seed, *, rank=2):
    gpt = GPT(CONFIG)
    gpt.load_state_dict(load_weights(base).trunk)
    lora.add_lora(gpt, rank=rank, alpha=4, targets=["c_attn", "mlp.c_fc"],
                  generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for a in lora.adapters(gpt).values():
            a.B.copy_(torch.randn(a.B.shape, generator=gen) * 0.1)
    return lora.save_adapter(path, gpt, meta={"base": str(base)}), gpt


def merge(tmp_path, *flags):
    return launch.main(["merge", "offline_sentiment", "soup", f"--save_dir={tmp_path / 'soup'}", *flags])


def test_merging_identical_models_is_a_no_op(tmp_path):
    a = make(tmp_path / "a", 0)
    assert merge(tmp_path, f"--models={a},{a},{a}") == 0
    got, want = load_weights(tmp_path / "soup"), load_weights(a)
    assert all(torch.equal(got.trunk[k], want.trunk[k]) for k in want.trunk)
    assert torch.equal(got.heads["value.weight"], want.heads["value.weight"])
    assert got.meta["merged_from"] == [str(a)] * 3 and got.meta["kind"] == "policy"


def test_weights_one_zero_give_the_first_model(tmp_path):
    a, b = make(tmp_path / "a", 0), make(tmp_path / "b", 1)
    assert merge(tmp_path, f"--models={a},{b}", "--weights=1,0") == 0
    got, want = load_weights(tmp_path / "soup"), load_weights(a)
    assert all(torch.equal(got.trunk[k], want.trunk[k]) for k in want.trunk)


def test_uniform_merge_is_the_mean(tmp_path):
    a, b = make(tmp_path / "a", 0), make(tmp_path / "b", 1)
    assert merge(tmp_path, f"--models={a},{b}") == 0
    got, wa, wb = load_weights(tmp_path / "soup"), load_weights(a), load_weights(b)
    for k in wa.trunk:
        torch.testing.assert_close(got.trunk[k], (wa.trunk[k] + wb.trunk[k]) / 2)


def test_adapter_soups_separate_and_product(tmp_path):
    base = make(tmp_path / "base", 0)
    (a, gpt_a), (b, gpt_b) = make_adapter(tmp_path / "a", base, 1), make_adapter(tmp_path / "b", base, 2)
    assert merge(tmp_path, f"--models={a},{b}") == 0  # separate: A and B averaged
    config, tensors = lora.load_adapter(tmp_path / "soup")
    assert config["rank"] == 2 and config["adapters"] == "separate"
    name = "h.0.attn.c_attn.lora.A"
    torch.testing.assert_close(tensors[name], (lora.adapter_state_dict(gpt_a)[name]
                                               + lora.adapter_state_dict(gpt_b)[name]) / 2)
    # product: the merged model is the base plus the mean of the updates, which is also the mean
    # of the two models with their adapters merged in
    assert launch.main(["merge", "offline_sentiment", "p", f"--save_dir={tmp_path / 'p'}", f"--models={a},{b}",
                        "--adapters=product"]) == 0
    assert lora.load_adapter(tmp_path / "p")[0]["rank"] == 4
    save_model(tmp_path / "ma", gpt=lora.merge_lora(gpt_a))
    save_model(tmp_path / "mb", gpt=lora.merge_lora(gpt_b))
    assert launch.main(["merge", "offline_sentiment", "m", f"--save_dir={tmp_path / 'm'}",
                        f"--models={tmp_path / 'ma'},{tmp_path / 'mb'}"]) == 0
    product, models = load_weights(tmp_path / "p").trunk, load_weights(tmp_path / "m").trunk
    for k in models:
        torch.testing.assert_close(product[k], models[k], atol=1e-6, rtol=1e-5)
    separate = load_weights(tmp_path / "soup").trunk
    assert not torch.allclose(separate["h.0.attn.c_attn.weight"], product["h.0.attn.c_attn.weight"])


def test_merge_state_dicts_checks_names():
    with pytest.raises(Exception, match="other tensors"):
        soups.merge_state_dicts([{"x": torch.zeros(1)}, {"y": torch.zeros(1)}], [0.5, 0.5])


@pytest.mark.parametrize("flags, says", [
    (["--models=A"], "2 or more"),
    (["--models=A,A", "--weights=1"], "1 weights for 2 models"),
    (["--models=A,A", "--weights=1,x"], "comma-separated numbers"),
    (["--models=A,A", "--adapters=both"], "expected one of"),
    (["--models=A,nowhere"], "no such directory"),
])
def test_bad_flags_exit_2(tmp_path, capsys, flags, says):
    a = make(tmp_path / "a", 0)
    flags = [f.replace("A", str(a)) for f in flags]
    assert merge(tmp_path, *flags) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "soup").exists()


def test_models_of_different_shapes_exit_2(tmp_path, capsys):
    a = make(tmp_path / "a", 0)
    gpt = GPT(GPTConfig(n_vocab=50, n_ctx=16, n_embd=32, n_head=2, n_layer=2))
    b = save_model(tmp_path / "b", gpt=gpt, heads={"value.weight": torch.randn(1, 32)})
    assert merge(tmp_path, f"--models={a},{b}") == 2
    assert "config differs" in capsys.readouterr().err
    assert not (tmp_path / "soup").exists()
