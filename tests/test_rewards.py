"""RewardModel (docs/original.md §5): r(x, y) = gain * (w . h_last + b) + bias, read at the last real token."""

import math

import pytest
import torch

from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.rewards import RewardModel, normalization_constants

PAD = 50259


def tiny_reward_model(seed=0, n_embd=16) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(GPT(GPTConfig(n_vocab=50257, n_ctx=32, n_embd=n_embd, n_head=2, n_layer=2)))


def random_tokens(shape, seed):
    return torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed))


def test_head_init():
    d = 256
    model = tiny_reward_model(n_embd=d)
    w = model.reward_head.weight.detach()
    assert w.shape == (1, d)
    assert abs(float(w.std()) - 1 / math.sqrt(d + 1)) < 0.15 / math.sqrt(d + 1)
    assert float(model.reward_head.bias.detach()) == 0.0
    assert float(model.reward_gain.detach()) == 1.0 and float(model.reward_bias.detach()) == 0.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"reward_head.weight", "reward_head.bias", "reward_gain", "reward_bias"} <= trainable


def test_raw_reward_is_head_of_last_hidden_state():
    model = tiny_reward_model()
    queries, responses = random_tokens((3, 5), 1), random_tokens((3, 4), 2)
    h = model.gpt.hidden_states(torch.cat([queries, responses], 1), pad_token=PAD)  # (B, T, D)
    expected = h[:, -1] @ model.reward_head.weight[0] + model.reward_head.bias
    raw = model.raw_rewards(queries, responses, pad_token=PAD)
    assert raw.shape == (3,) and raw.dtype == torch.float32
    torch.testing.assert_close(raw, expected)


def test_raw_reward_stays_fp32_under_bf16_autocast():
    model = tiny_reward_model()
    queries, responses = random_tokens((3, 5), 1), random_tokens((3, 4), 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model.raw_rewards(queries, responses, pad_token=PAD)
        h = model.gpt.hidden_states(torch.cat([queries, responses], 1), pad_token=PAD)[:, -1]
    want = h.float() @ model.reward_head.weight[0].detach() + model.reward_head.bias.detach()
    assert raw.dtype == torch.float32
    torch.testing.assert_close(raw, want, rtol=1e-6, atol=1e-6)  # bf16 would be ~1e-2 off


def test_forward_applies_gain_and_bias():
    model = tiny_reward_model()
    queries, responses = random_tokens((4, 5), 3), random_tokens((4, 4), 4)
    raw = model.raw_rewards(queries, responses, pad_token=PAD)
    model.set_normalization(gain=2.5, bias=-0.75)
    assert float(model.reward_gain.detach()) == 2.5 and float(model.reward_bias.detach()) == -0.75
    torch.testing.assert_close(model(queries, responses, pad_token=PAD), 2.5 * raw - 0.75)
    # normalization does not touch the raw reward
    torch.testing.assert_close(model.raw_rewards(queries, responses, pad_token=PAD), raw)


def test_truncated_response_is_read_at_its_last_real_token():
    """Pads after the truncate token, or inside the query, do not change the reward."""
    model = tiny_reward_model()
    query, response = random_tokens((1, 5), 5), random_tokens((1, 6), 6)
    short = model.raw_rewards(query, response[:, :3], pad_token=PAD)
    padded_response = torch.cat([response[:, :3], torch.full((1, 3), PAD)], 1)
    torch.testing.assert_close(model.raw_rewards(query, padded_response, pad_token=PAD), short)
    padded_query = torch.cat([query, torch.full((1, 2), PAD)], 1)  # a short query, right-padded
    torch.testing.assert_close(model.raw_rewards(padded_query, response[:, :3], pad_token=PAD), short)
    # ...while a different last token does change it
    other = response[:, :3].clone()
    other[0, -1] = (other[0, -1] + 1) % 50257
    assert not torch.allclose(model.raw_rewards(query, other, pad_token=PAD), short)


def test_rows_are_independent():
    model = tiny_reward_model()
    queries, responses = random_tokens((4, 5), 7), random_tokens((4, 4), 8)
    batch = model(queries, responses, pad_token=PAD)
    one_by_one = torch.cat([model(queries[i:i + 1], responses[i:i + 1], pad_token=PAD) for i in range(4)])
    torch.testing.assert_close(batch, one_by_one)


def test_gradients_reach_head_gain_bias_and_trunk():
    model = tiny_reward_model()
    model.set_normalization(gain=1.5, bias=0.5)
    queries, responses = random_tokens((4, 5), 9), random_tokens((4, 4), 10)
    (model(queries, responses, pad_token=PAD) ** 2).sum().backward()
    for name in ("reward_head.weight", "reward_head.bias", "reward_gain", "reward_bias", "gpt.ln_f.weight",
                 "gpt.h.0.attn.c_attn.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_head_state_round_trip():
    a, b = tiny_reward_model(seed=0), tiny_reward_model(seed=1)
    a.set_normalization(gain=3.0, bias=-2.0)
    b.load_head_state(a.head_state(), "a")
    for name in ("reward_head.weight", "reward_head.bias", "reward_gain", "reward_bias"):
        torch.testing.assert_close(dict(b.named_parameters())[name], dict(a.named_parameters())[name])
    # the flat shapes a safetensors file gives back are accepted
    flat = {k: v.detach().reshape(-1) for k, v in a.head_state().items()}
    b.load_head_state(flat, "flat")
    assert float(b.reward_gain.detach()) == 3.0


def test_load_head_state_rejects_a_non_reward_model():
    model = tiny_reward_model()
    with pytest.raises(ValueError, match=r"policy_dir: not a reward model .*reward\.gain"):
        model.load_head_state({"reward.weight": torch.zeros(1, 16), "reward.bias": torch.zeros(1)}, "policy_dir")


@pytest.mark.parametrize("mean,std,target_mean,target_std", [(3.0, 0.5, 0.0, 1.0), (-1.2, 4.0, 0.5, 2.0)])
def test_normalization_constants_map_statistics_to_target(mean, std, target_mean, target_std):
    gain, bias = normalization_constants(mean=mean, std=std, target_mean=target_mean, target_std=target_std)
    x = torch.randn(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = (x - x.mean()) / x.std(unbiased=False) * std + mean  # exactly (mean, std)
    y = gain * x + bias
    assert float(y.mean()) == pytest.approx(target_mean, abs=1e-9)
    assert float(y.std(unbiased=False)) == pytest.approx(target_std, rel=1e-9)
    assert gain > 0  # normalization never flips the reward's order
