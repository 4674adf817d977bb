"""Top-p (nucleus) sampling: which tokens the nucleus keeps, that the sampler never draws the
others, and that top_p=1 (the default) draws exactly what sampling always drew."""

import pytest
import torch

from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.language.sample import nucleus, sample_from_logits, sample_sequence


@pytest.mark.parametrize("top_p, kept", [
    (1e-9, [0.5, 0, 0, 0]),  # always the most probable token
    (0.5, [0.5, 0, 0, 0]),
    (0.8, [0.5, 0.3, 0, 0]),  # 0.5 + 0.3 reaches 0.8: the third is not needed
    (0.81, [0.5, 0.3, 0.15, 0]),
    (1.0, [0.5, 0.3, 0.15, 0.05]),
])
def test_nucleus_keeps_the_most_probable_tokens_that_reach_top_p(top_p, kept):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    order = torch.tensor([2, 0, 3, 1])  # the same in another token order
    assert torch.equal(nucleus(probs, top_p), torch.tensor([kept]))
    assert torch.equal(nucleus(probs[:, order], top_p), torch.tensor([kept])[:, order])


def test_nucleus_breaks_ties_in_token_order_and_works_row_by_row():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(nucleus(probs, 0.5), torch.tensor([[0.25, 0.25, 0, 0], [0, 0, 0.3, 0.4]]))


def test_tokens_outside_the_nucleus_are_never_drawn():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    drawn = sample_from_logits(logits, temperature=1.0, top_p=0.8, generator=gen)
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2:].tolist() == [0, 0]
    assert counts[0].item() / len(drawn) == pytest.approx(0.5 / 0.8, abs=0.02)  # renormalized within the nucleus


def test_a_tiny_top_p_is_greedy():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    drawn = sample_from_logits(logits, temperature=0.7, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(drawn, logits.argmax(-1))


def test_top_p_one_draws_what_sampling_always_drew():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_vocab=50, n_ctx=32, n_embd=16, n_head=2, n_layer=2)).eval()
    context = torch.randint(0, 50, (6, 5))

    def draw(**top_p):
        return sample_sequence(gpt, context, length=8, temperature=0.7, pad_token=52,
                               generator=torch.Generator().manual_seed(3), **top_p)

    default = draw()
    assert torch.equal(draw(top_p=1.0), default)
    # the nucleus path itself leaves the draws alone when it keeps every token
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    full = sample_from_logits(logits, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_from_logits(logits, temperature=1.0, top_p=0.999999,
                                          generator=torch.Generator().manual_seed(1)), full)
