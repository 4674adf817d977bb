"""Policy = GPT + LM head + value head (docs/original.md §4, §6): zero value head, exact-length sampling with
the KV cache and temperature, logprobs under logits / temperature."""

import pytest
import torch

from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.language.sample import sample_from_logits
from lm_human_preferences.policy import Policy

V = 40  # vocabulary of the test model
PAD = V + 2  # outside the vocabulary, as GPT-2's 50259




def make_policy(seed: int = 0) -> Policy:
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_vocab=V, n_ctx=32, n_embd=16, n_head=2, n_layer=2))
    with torch.no_grad():  # a peaked next-token distribution, so temperature visibly matters
        gpt.wte.weight.normal_(std=0.3)
    return Policy(gpt).eval()


def contexts_with_pads() -> torch.Tensor:
    return torch.tensor([[5, 6, 7, 8, 9],
                         [PAD, PAD, 3, 4, 5],  # left padding
                         [1, 2, PAD, PAD, PAD],  # right padding
                         [11, PAD, 12, PAD, 13]])  # (4, 5)


def reference_sample(gpt: GPT, contexts, *, length: int, temperature: float, generator) -> torch.Tensor:
    """Sampling without a KV cache: a full forward pass over everything so far for each token."""
    tokens = contexts
    for _ in range(length):
        logits = gpt(tokens, pad_token=PAD).logits[:, -1]  # (B, V)
        token = sample_from_logits(logits, temperature=temperature, generator=generator)
        tokens = torch.cat([tokens, token[:, None]], 1)
    return tokens[:, contexts.shape[1]:]


def test_value_head_is_zero_initialised():
    policy = make_policy()
    assert torch.count_nonzero(policy.value_head.weight) == 0
    assert torch.count_nonzero(policy.value_head.bias) == 0
    out = policy(contexts_with_pads(), torch.randint(0, V, (4, 3)), temperature=0.7, pad_token=PAD)
    assert out.values.shape == (4, 3) and out.values.dtype == torch.float32
    assert torch.count_nonzero(out.values) == 0
    assert set(policy.head_state()) == {"value.weight", "value.bias"}


@pytest.mark.parametrize("length", [1, 7])
def test_respond_returns_exactly_length_tokens(length):
    policy = make_policy()
    contexts = contexts_with_pads()
    responses = policy.respond(contexts, length=length, temperature=0.7, pad_token=PAD,
                               generator=torch.Generator().manual_seed(0))
    assert responses.shape == (4, length) and responses.dtype == torch.long
    assert ((responses >= 0) & (responses < V)).all()  # never a pad, never outside the vocabulary
    assert torch.equal(contexts, contexts_with_pads())  # input untouched


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_forward_logprobs_are_log_softmax_of_tempered_logits(temperature):
    policy = make_policy()
    contexts = contexts_with_pads()
    responses = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(1))
    out = policy(contexts, responses, temperature=temperature, pad_token=PAD)

    full = policy.gpt(torch.cat([contexts, responses], 1), pad_token=PAD)
    logits = full.logits[:, contexts.shape[1] - 1:-1] / temperature  # predicts each response token (4, 6, V)
    logp = torch.log_softmax(logits, -1)
    want = logp.gather(-1, responses[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.entropies, -(logp.exp() * logp).sum(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.values, policy.value_head(full.hidden[:, contexts.shape[1] - 1:-1]).squeeze(-1))
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (4, 6)

    untempered = torch.log_softmax(full.logits[:, contexts.shape[1] - 1:-1], -1).gather(-1, responses[..., None])
    if temperature != 1.0:
        assert (out.logprobs - untempered.squeeze(-1)).abs().max() > 0.1


def test_forward_under_bf16_autocast_gives_fp32_logprobs():
    policy = make_policy()
    contexts, responses = contexts_with_pads(), torch.randint(0, V, (4, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = policy(contexts, responses, temperature=0.7, pad_token=PAD)
    assert out.logprobs.dtype == out.values.dtype == out.entropies.dtype == torch.float32
    ref = policy(contexts, responses, temperature=0.7, pad_token=PAD)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=0, atol=0.1)


def test_value_head_stays_fp32_under_bf16_autocast():
    policy = make_policy()
    with torch.no_grad():
        policy.value_head.weight.normal_()
        policy.value_head.bias.fill_(0.1)
    contexts, responses = contexts_with_pads(), torch.randint(0, V, (4, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = policy(contexts, responses, temperature=0.7, pad_token=PAD)
        h = policy.gpt.hidden_states(torch.cat([contexts, responses], 1), pad_token=PAD)[:, 4:-1]
    want = h.float() @ policy.value_head.weight[0] + policy.value_head.bias  # fp32, outside autocast
    torch.testing.assert_close(out.values, want, rtol=1e-6, atol=1e-6)  # bf16 would be ~1e-2 off


def test_respond_uses_the_kv_cache():
    policy = make_policy()
    calls = []
    forward = policy.gpt.forward

    def spy(tokens, **kw):
        calls.append((tuple(tokens.shape), kw.get("cache"), kw.get("pad_token")))
        return forward(tokens, **kw)

    policy.gpt.forward = spy
    policy.respond(contexts_with_pads(), length=5, temperature=0.7, pad_token=PAD,
                   generator=torch.Generator().manual_seed(0))
    # one pass over the contexts, then one token per call, all into the same cache
    assert [shape for shape, _, _ in calls] == [(4, 5)] + [(4, 1)] * 4
    cache = calls[0][1]
    assert cache is not None and all(c is cache for _, c, _ in calls)
    # sampled tokens are never the pad (outside the vocabulary): the steps skip pad handling
    assert [pad for _, _, pad in calls] == [PAD] + [None] * 4


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_cached_sampling_equals_full_forward_sampling(temperature):
    policy = make_policy()
    contexts = contexts_with_pads()
    got = policy.respond(contexts, length=8, temperature=temperature, pad_token=PAD,
                         generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference_sample(policy.gpt, contexts, length=8, temperature=temperature,
                                generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_sampling_is_seeded():
    policy = make_policy()
    contexts = contexts_with_pads().repeat(4, 1)  # (16, 5)

    def sample(seed):
        return policy.respond(contexts, length=6, temperature=0.7, pad_token=PAD,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_sampling_follows_the_tempered_distribution():
    policy = make_policy()
    context = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        logits = policy.gpt(context).logits[0, -1]  # (V,)
    n = 20000
    for temperature in (1.0, 0.5):
        tokens = policy.respond(context.expand(n, -1), length=1, temperature=temperature, pad_token=PAD,
                                generator=torch.Generator().manual_seed(0))[:, 0]
        freq = torch.bincount(tokens, minlength=V).float() / n
        want = torch.softmax(logits / temperature, -1)
        other = torch.softmax(logits / (1.5 - temperature), -1)  # the other temperature's distribution
        assert 0.5 * (freq - want).abs().sum() < 0.03  # total variation distance
        assert 0.5 * (freq - other).abs().sum() > 0.1


def test_sharded_draws_are_rows_of_the_global_draw():
    logits = torch.randn(12, V, generator=torch.Generator().manual_seed(2)) * 3
    full = sample_from_logits(logits, temperature=0.7, generator=torch.Generator().manual_seed(5))
    for world_size in (2, 3):
        for rank in range(world_size):
            got = sample_from_logits(logits[rank::world_size], temperature=0.7, shard=(rank, world_size),
                                     generator=torch.Generator().manual_seed(5))
            assert torch.equal(got, full[rank::world_size])


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.full((4000, V), -1e4)
    logits[:, [0, 7, V - 2]] = torch.tensor([0.0, 1.0, 2.0])  # every other token underflows to 0
    tokens = sample_from_logits(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 7, V - 2}
    assert sample_from_logits(logits[:3], temperature=0, generator=None).tolist() == [V - 2] * 3


def test_entropies_carry_no_graph_but_logprobs_and_values_do():
    policy = make_policy()
    responses = torch.randint(0, V, (4, 3))
    out = policy(contexts_with_pads(), responses, temperature=0.7, pad_token=PAD)
    assert out.logprobs.requires_grad and out.values.requires_grad
    assert not out.entropies.requires_grad
    without = policy(contexts_with_pads(), responses, temperature=0.7, pad_token=PAD, entropies=False)
    assert without.entropies is None
    assert torch.equal(without.logprobs, out.logprobs) and torch.equal(without.values, out.values)
