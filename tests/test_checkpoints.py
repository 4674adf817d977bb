"""Checkpoint conversion: transformers' GPT-2 -> ours gives the same logits; bad files fail clearly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lm_human_preferences.language.checkpoints import (CheckpointError, load_gpt, load_weights,
                                                        save_model)
from lm_human_preferences.language.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

# (vocab, n_positions, n_embd, n_head, n_layer): odd head counts and context sizes included
CONFIGS = [(97, 64, 24, 3, 2), (211, 37, 30, 5, 3), (64, 128, 16, 1, 1)]


def hf_model(vocab, n_pos, n_embd, n_head, n_layer, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_pos, n_embd=n_embd, n_head=n_head,
                                  n_layer=n_layer, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make biases and LayerNorm params non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.tie_weights()
    return model


def greedy(step_logits, tokens, n):
    for _ in range(n):
        tokens = torch.cat([tokens, step_logits(tokens)[:, -1:].argmax(-1)], 1)
    return tokens


@pytest.mark.parametrize("shape", CONFIGS)
def test_parity_with_transformers_save_pretrained(tmp_path, shape):
    hf = hf_model(*shape)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "ours"
    subprocess.run([sys.executable, str(ROOT / "saved_models/prepare_pytorch_checkpoint.py"),
                    "--source", str(tmp_path / "hf"), "--out", str(out)], check=True, capture_output=True)
    ours = load_gpt(out).eval()
    assert ours.config == GPTConfig(n_vocab=shape[0], n_ctx=shape[1], n_embd=shape[2],
                                    n_head=shape[3], n_layer=shape[4])
    tokens = torch.randint(0, shape[0], (3, min(shape[1], 20)))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens).logits
        assert (got - want).abs().max() < 1e-4
        prompt = tokens[:, :4]
        n = min(shape[1], 20) - 4
        assert torch.equal(greedy(lambda t: ours(t).logits, prompt, n),
                           greedy(lambda t: hf(t).logits, prompt, n))


@pytest.mark.parametrize("args, says", [
    (["--source", "nothere"], "error: nothere"),
    (["--source", "nothere", "--encoding", "gpt3"], "error: --encoding: unknown encoding 'gpt3'"),
])
def test_converter_user_errors_exit_2_with_one_paragraph(tmp_path, args, says):
    out = subprocess.run([sys.executable, str(ROOT / "saved_models/prepare_pytorch_checkpoint.py"), *args,
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith(says), out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


def test_bare_safetensors_without_prefix(tmp_path):
    hf = hf_model(*CONFIGS[0])
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
          if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    ours = load_gpt(tmp_path / "model.safetensors").eval()
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (ours(tokens).logits - hf(tokens).logits).abs().max() < 1e-4


def test_pytorch_bin_is_loaded_with_weights_only(tmp_path):
    hf = hf_model(*CONFIGS[0])
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    ours = load_gpt(tmp_path).eval()
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (ours(tokens).logits - hf(tokens).logits).abs().max() < 1e-4


class Boom:
    def __reduce__(self):
        return (Path.touch, (Path(BOOM_FILE),))


BOOM_FILE = ""


def test_pickle_payload_never_runs(tmp_path):
    global BOOM_FILE
    BOOM_FILE = str(tmp_path / "pwned")
    torch.save({"wte.weight": torch.zeros(2, 2), "x": Boom()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_weights(tmp_path / "pytorch_model.bin")
    assert not Path(BOOM_FILE).exists()


def test_own_round_trip_keeps_heads_and_meta(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_vocab=30, n_ctx=16, n_embd=8, n_head=2, n_layer=1))
    save_model(tmp_path / "m", gpt=model, heads={"value.weight": torch.ones(1, 8)}, meta={"kind": "policy"})
    w = load_weights(tmp_path / "m")
    assert w.meta["kind"] == "policy" and torch.equal(w.heads["value.weight"], torch.ones(1, 8))
    for k, v in model.state_dict().items():
        assert torch.equal(w.trunk[k], v)
    save_model(tmp_path / "m", gpt=model, meta={"kind": "gpt"})  # replacing works
    assert load_weights(tmp_path / "m").heads == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    """Models, configs and run files are written to a temp file and renamed: with the mode a
    plain open gives under the umask, not the temp file's 0600."""
    import os

    from lm_human_preferences.runtime import atomic_write_bytes

    old = os.umask(umask)
    try:
        save_model(tmp_path / "m", gpt=GPT(GPTConfig(n_vocab=30, n_ctx=16, n_embd=8, n_head=2, n_layer=1)))
        atomic_write_bytes(tmp_path / "run" / "hparams.json", b"{}")
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == want
    for path in (tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json", tmp_path / "run" / "hparams.json"):
        assert path.stat().st_mode & 0o777 == want, path


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    hf = hf_model(*CONFIGS[0])
    sd = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()
          if k != "lm_head.weight"}
    del sd["h.1.mlp.c_fc.bias"]
    sd["h.0.ln_1.weight"] = torch.zeros(5)
    sd["h.0.surprise"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    with pytest.raises(CheckpointError) as e:
        load_gpt(tmp_path)
    msg = str(e.value)
    assert "missing: h.1.mlp.c_fc.bias" in msg
    assert "unexpected: h.0.surprise" in msg
    assert "h.0.ln_1.weight: checkpoint [5] vs model [24]" in msg


def test_garbage_file_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_gpt(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_gpt(tmp_path / "nope")


def test_openai_tf_checkpoint_matches_transformers(tmp_path):
    """HF weights written as an OpenAI-style TF bundle (model/h0/attn/c_attn/w [1, in, out] ...)."""
    from tf_writer import write_checkpoint

    hf = hf_model(97, 64, 24, 3, 2)
    arrays = {}
    for k, v in hf.state_dict().items():
        k = k.removeprefix("transformer.")
        if k == "lm_head.weight" or k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        parts = k.split(".")
        if parts[0] in ("wte", "wpe"):
            arrays[f"model/{parts[0]}"] = v.numpy()
            continue
        if parts[0] == "h":
            parts = [f"h{parts[1]}"] + parts[2:]
        last = {"weight": "w" if "ln" not in parts[-2] else "g", "bias": "b"}[parts[-1]]
        arr = v.numpy()
        arrays["model/" + "/".join(parts[:-1] + [last])] = arr[None] if last == "w" else arr
    write_checkpoint(str(tmp_path / "model.ckpt"), arrays)
    (tmp_path / "hparams.json").write_text(json.dumps(dict(n_vocab=97, n_ctx=64, n_embd=24, n_head=3, n_layer=2)))
    ours = load_gpt(tmp_path).eval()
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert (ours(tokens).logits - hf(tokens).logits).abs().max() < 1e-4
    (tmp_path / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointError, match="data-00000-of-00001"):
        load_gpt(tmp_path)


def test_atomic_writer_keeps_the_old_file_when_the_block_fails(tmp_path):
    from lm_human_preferences.language.checkpoints import atomic_writer

    path = tmp_path / "new" / "passages.jsonl"
    with atomic_writer(path, "w", encoding="utf-8") as f:
        f.write("ünïcode\n")
    assert path.read_text(encoding="utf-8") == "ünïcode\n"
    with pytest.raises(KeyError):
        with atomic_writer(path, "w", encoding="utf-8") as f:
            f.write("half of it")
            raise KeyError("stopped")
    assert path.read_text(encoding="utf-8") == "ünïcode\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["passages.jsonl"]  # no temporary file left
