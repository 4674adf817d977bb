"""LoRA adapters: a new adapter (B = 0) leaves the model unchanged, only adapters train, adapters
save and load alone, merging keeps the function, and the cached decoding path sees them."""

import pytest
import torch

from lm_human_preferences.language import lora
from lm_human_preferences.language.checkpoints import CheckpointError
from lm_human_preferences.language.gpt import GPT, GPTConfig


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_vocab=50, n_ctx=16, n_embd=16, n_head=2, n_layer=2)).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))


def logits(gpt, x):
    with torch.no_grad():
        return gpt.lm_logits(gpt.hidden_states(x))


def randomize_b(gpt, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in lora.adapters(gpt).values():
            a.B.copy_(torch.randn(a.B.shape, generator=gen) * 0.1)


def test_zero_b_equals_base_model():
    gpt, x = tiny_gpt(), tokens()
    before = logits(gpt, x)
    names = lora.add_lora(gpt, rank=4, alpha=8, dropout=0.0, targets=["all"])
    assert len(names) == 8  # 4 linear layers in each of 2 blocks
    assert torch.equal(logits(gpt, x), before)


def test_targets_and_frozen_base():
    gpt = tiny_gpt()
    names = lora.add_lora(gpt, rank=2, alpha=4, targets=["c_attn", "mlp.c_proj"])
    assert names == ["h.0.attn.c_attn", "h.0.mlp.c_proj", "h.1.attn.c_attn", "h.1.mlp.c_proj"]
    trainable = [n for n, p in gpt.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n in trainable)
    with pytest.raises(ValueError, match="names no linear layer"):
        lora.add_lora(tiny_gpt(), rank=2, alpha=4, targets=["c_nope"])


def test_adapter_changes_output_and_trains():
    gpt, x = tiny_gpt(), tokens()
    before = logits(gpt, x)
    lora.add_lora(gpt, rank=4, alpha=8, targets=["all"])
    randomize_b(gpt)
    assert not torch.allclose(logits(gpt, x), before)
    gpt.train()
    loss = gpt.lm_logits(gpt.hidden_states(x)).square().mean()
    loss.backward()
    assert all(a.A.grad is not None and a.B.grad is not None for a in lora.adapters(gpt).values())
    assert all(p.grad is None for n, p in gpt.named_parameters() if ".lora." not in n)


def test_merge_keeps_the_function():
    gpt, x = tiny_gpt(), tokens()
    lora.add_lora(gpt, rank=4, alpha=8, targets=["all"])
    randomize_b(gpt)
    adapted = logits(gpt, x)
    lora.merge_lora(gpt)
    assert not lora.adapters(gpt)
    assert set(gpt.state_dict()) == set(tiny_gpt().state_dict())
    torch.testing.assert_close(logits(gpt, x), adapted, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    gpt, x = tiny_gpt(), tokens()
    lora.add_lora(gpt, rank=3, alpha=6, dropout=0.1, targets=["c_fc"])
    randomize_b(gpt)
    lora.save_adapter(tmp_path / "ad", gpt, meta={"base": "somewhere"})
    config, tensors = lora.load_adapter(tmp_path / "ad")
    assert config["rank"] == 3 and config["alpha"] == 6 and config["dropout"] == 0.1 and config["base"] == "somewhere"
    assert set(tensors) == {"h.0.mlp.c_fc.lora.A", "h.0.mlp.c_fc.lora.B", "h.1.mlp.c_fc.lora.A", "h.1.mlp.c_fc.lora.B"}
    other = tiny_gpt()  # the same base
    lora.load_lora(other, config, tensors)
    for name, a in lora.adapters(gpt).items():
        b = lora.adapters(other)[name]
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert torch.equal(logits(other.eval(), x), logits(gpt.eval(), x))


def test_bad_adapter_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        lora.load_adapter(tmp_path)
    gpt = tiny_gpt()
    lora.add_lora(gpt, rank=2, alpha=2, targets=["c_attn"])
    lora.save_adapter(tmp_path, gpt)
    (tmp_path / lora.ADAPTER_CONFIG).write_text('{"rank": 2, "alpha": 2, "dropout": 0, "layers": ["h.0.attn.c_attn"]}')
    with pytest.raises(CheckpointError, match="do not match the layers"):
        lora.load_adapter(tmp_path)
    big = GPT(GPTConfig(n_vocab=50, n_ctx=16, n_embd=32, n_head=2, n_layer=2))
    lora.save_adapter(tmp_path, gpt)
    with pytest.raises(CheckpointError, match="another base model"):
        lora.load_lora(big, *lora.load_adapter(tmp_path))


def test_cached_decoding_sees_the_adapter():
    gpt, x = tiny_gpt(), tokens()
    lora.add_lora(gpt, rank=4, alpha=8, targets=["all"])
    randomize_b(gpt)
    full = logits(gpt, x)
    cache = gpt.new_cache(batch_size=3, max_length=10)
    with torch.no_grad():
        first = gpt.lm_logits(gpt.hidden_states(x[:, :6], cache=cache), cache)
        rest = [gpt.lm_logits(gpt.hidden_states(x[:, t:t + 1], cache=cache), cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([first] + rest, dim=1), full, atol=1e-4, rtol=1e-4)
