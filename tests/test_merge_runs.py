"""`launch.py merge` follows the run-output contract: a run directory with hparams.json,
status.json and metrics.jsonl, final files that the loaders read, a finished merge that a rerun
leaves alone, and bad input that exits with status 2 and leaves nothing behind."""

import json

import launch
import pytest
import torch

from lm_human_preferences import lm_tasks
from lm_human_preferences.language import lora
from lm_human_preferences.language.checkpoints import load_weights, save_model
from lm_human_preferences.language.gpt import GPT, GPTConfig

CONFIG = GPTConfig(n_vocab=27, n_ctx=16, n_embd=16, n_head=2, n_layer=2)


def make(path, seed, *, config=CONFIG, head=(1, 16)):
    torch.manual_seed(seed)
    return save_model(path, gpt=GPT(config), heads={"value.weight": torch.randn(*head)},
                      meta={"kind": "policy", "encoding": "test"})


def make_adapter(path, base, seed):
    gpt = GPT(CONFIG)
    gpt.load_state_dict(load_weights(base).trunk)
    lora.add_lora(gpt, rank=2, alpha=4, targets=["c_attn"], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for a in lora.adapters(gpt).values():
            a.B.copy_(torch.randn(a.B.shape, generator=torch.Generator().manual_seed(100 + seed)) * 0.1)
    return lora.save_adapter(path, gpt, meta={"base": str(base)})


def merge(out, *flags):
    return launch.main(["merge", "offline_sentiment", "soup", f"--run.save_dir={out}", *flags])


def test_a_model_soup_is_a_finished_run_the_loaders_read(tmp_path, capsys):
    a, b, out = make(tmp_path / "a", 0), make(tmp_path / "b", 1), tmp_path / "soup"
    assert merge(out, f"--models={a},{b}", "--weights=0.25,0.75") == 0
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["exit_status"] == 0
    hparams = json.loads((out / "hparams.json").read_text())
    assert hparams["models"] == f"{a},{b}" and hparams["run"]["save_dir"] == str(out)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["merge/models"] == 2
    assert not list(out.glob(".*.tmp-*"))
    got, wa, wb = load_weights(out), load_weights(a), load_weights(b)
    for k in wa.trunk:
        torch.testing.assert_close(got.trunk[k], 0.25 * wa.trunk[k] + 0.75 * wb.trunk[k])
    assert got.meta["weights"] == [0.25, 0.75]
    assert lm_tasks.load_pretrained(str(out)).gpt.config == CONFIG
    capsys.readouterr()
    assert merge(out, f"--models={a},{b}", "--weights=0.25,0.75") == 0  # finished: nothing to do
    assert "nothing to do" in capsys.readouterr().out


def test_an_adapter_soup_is_a_finished_run_the_loaders_read(tmp_path):
    base = make(tmp_path / "base", 0)
    a, b, out = make_adapter(tmp_path / "a", base, 1), make_adapter(tmp_path / "b", base, 2), tmp_path / "soup"
    assert merge(out, f"--models={a},{b}", "--adapters=product") == 0
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    config, tensors = lora.load_adapter(out)
    assert config["rank"] == 4 and config["merged_from"] == [str(a), str(b)]
    assert lm_tasks.load_pretrained(str(out)).gpt.config == CONFIG
    # A model soup into the same directory leaves no adapter of the earlier soup beside it.
    assert merge(out, f"--models={base},{base}", "--run.resume=never") == 0
    assert not lora.is_adapter_dir(out) and not (out / lora.ADAPTER_FILE).exists()


def bad_inputs(tmp_path):
    """(flags, what the error says) for each kind of bad input."""
    a, b = make(tmp_path / "a", 0), make(tmp_path / "b", 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    garbled = make(tmp_path / "garbled", 2)
    (garbled / "model.safetensors").write_bytes(b"not a tensor file")
    wide = make(tmp_path / "wide", 3, config=GPTConfig(n_vocab=27, n_ctx=16, n_embd=32, n_head=2, n_layer=2),
                head=(1, 32))
    other_head = make(tmp_path / "other_head", 4, head=(2, 16))
    base_1, base_2 = make(tmp_path / "base_1", 5), make(tmp_path / "base_2", 6)
    ad_1, ad_2 = make_adapter(tmp_path / "ad_1", base_1, 1), make_adapter(tmp_path / "ad_2", base_2, 2)
    return [
        ([f"--models={a},{empty}"], "no model.safetensors"),
        ([f"--models={a},{garbled}"], "not a readable weights file"),
        ([f"--models={a},{wide}"], "config differs"),
        ([f"--models={a},{other_head}"], "value.weight is [2, 16]"),
        ([f"--models={ad_1},{ad_2}"], "its base is"),
        ([f"--models={a},{b}", "--weights=1,1,1"], "3 weights for 2 models"),
        ([f"--models={a},{b}", "--weights=1.5,-0.5"], "expected finite numbers >= 0"),
        ([f"--models={a},{b}", "--weights=0,0"], "sum to 0"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_input_exits_2_and_leaves_nothing(tmp_path, capsys, case):
    flags, says = bad_inputs(tmp_path)[case]
    out = tmp_path / "soup"
    assert merge(out, *flags) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_input_leaves_an_earlier_soup_as_it_was(tmp_path):
    a, b, out = make(tmp_path / "a", 0), make(tmp_path / "b", 1), tmp_path / "soup"
    assert merge(out, f"--models={a},{b}") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    wide = make(tmp_path / "wide", 3, config=GPTConfig(n_vocab=27, n_ctx=16, n_embd=32, n_head=2, n_layer=2),
                head=(1, 32))
    assert merge(out, f"--models={a},{wide}", "--run.resume=never") == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
