import math
import random

import pytest
import torch

from lm_human_preferences.label_types import (
    BestOfN,
    LabelType,
    Pairwise,
    ScalarCompare,
    ScalarRating,
    SoftPairwise,
    bradley_terry_loss,
    get_label_type,
    pairwise_accuracy,
    soft_label_loss,
)
from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.rewards import RewardModel
from tiny import WORDS, small_encoding

VOCAB = 11


class TokenSumReward:
    """reward = sum of per-token weights over query and response; counts calls."""

    def __init__(self, weights):
        self.weights = weights  # (VOCAB,)
        self.calls = 0

    def __call__(self, queries, responses):
        self.calls += 1
        return self.weights[queries].sum(-1) * 0.1 + self.weights[responses].sum(-1)  # (B,)


def _value(reward, query, response):
    w = reward.weights.tolist()
    return 0.1 * sum(w[t] for t in query) + sum(w[t] for t in response)


def _batch(label_type, *, batch, query_length=3, response_length=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = {"query": torch.randint(0, VOCAB, (batch, query_length), generator=g)}
    for field in label_type.response_fields:
        labels[field] = torch.randint(0, VOCAB, (batch, response_length), generator=g)
    return labels


def test_best_of_n_schema():
    schema = BestOfN(4).label_schema(query_length=64, response_length=24)
    assert schema == {
        "query": ("tokens", (64,)),
        "sample0": ("tokens", (24,)),
        "sample1": ("tokens", (24,)),
        "sample2": ("tokens", (24,)),
        "sample3": ("tokens", (24,)),
        "best": ("int", ()),
    }
    lt = BestOfN(4)
    assert (lt.name, lt.num_responses, lt.target_mean, lt.target_std) == ("best_of_4", 4, 0.0, 1.0)
    assert lt.int_range("best") == (0, 4)


def test_scalar_schemas():
    assert ScalarRating().label_schema(query_length=5, response_length=2) == {
        "query": ("tokens", (5,)), "sample": ("tokens", (2,)), "score": ("float", ())}
    assert ScalarCompare().label_schema(query_length=5, response_length=2) == {
        "query": ("tokens", (5,)), "sample0": ("tokens", (2,)), "sample1": ("tokens", (2,)),
        "difference": ("float", ())}
    assert ScalarRating().num_responses == 1 and ScalarCompare().num_responses == 2
    for lt in (ScalarRating(), ScalarCompare()):
        assert (lt.target_mean, lt.target_std) == (0.0, 1.0)


def test_best_of_n_loss_matches_hand_computed_cross_entropy():
    lt = BestOfN(4)
    reward = TokenSumReward(torch.randn(VOCAB, generator=torch.Generator().manual_seed(1)))
    labels = _batch(lt, batch=6)
    labels["best"] = torch.tensor([0, 1, 2, 3, 1, 0])
    out = lt.loss(reward, labels)
    assert reward.calls == 1  # all n responses scored in one call

    losses, hits = [], []
    for b in range(6):
        logits = [_value(reward, labels["query"][b].tolist(), labels[f"sample{i}"][b].tolist()) for i in range(4)]
        log_z = math.log(sum(math.exp(x) for x in logits))
        best = int(labels["best"][b])
        losses.append(log_z - logits[best])
        hits.append(max(range(4), key=lambda i: logits[i]) == best)
    assert out["loss"].item() == pytest.approx(sum(losses) / 6, rel=1e-5)
    assert out["accuracy"].item() == pytest.approx(sum(hits) / 6)
    assert out["loss"].dtype == torch.float32 and out["loss"].dim() == 0


def test_best_of_n_accuracy_on_known_preferences():
    lt = BestOfN(3)
    weights = torch.zeros(VOCAB)
    weights[5] = 1.0  # a response's reward counts its 5s
    reward = TokenSumReward(weights)
    labels = {
        "query": torch.zeros(4, 2, dtype=torch.long),
        "sample0": torch.tensor([[5, 5], [0, 0], [0, 0], [5, 0]]),
        "sample1": torch.tensor([[5, 0], [5, 0], [0, 0], [5, 5]]),
        "sample2": torch.tensor([[0, 0], [5, 5], [5, 0], [0, 0]]),
        "best": torch.tensor([0, 2, 2, 0]),  # last one is wrong: sample1 scores highest
    }
    out = lt.loss(reward, labels)
    assert out["accuracy"].item() == pytest.approx(0.75)


def test_gradients_flow_to_reward_parameters():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(VOCAB, 1)

    def reward_fn(queries, responses):
        return embed(responses).sum(dim=(1, 2)) + 0.5 * embed(queries).sum(dim=(1, 2))  # (B,)

    for lt, targets in [
        (BestOfN(4), {"best": torch.tensor([0, 3, 1])}),
        (ScalarRating(), {"score": torch.tensor([0.5, -1.0, 2.0])}),
        (ScalarCompare(), {"difference": torch.tensor([0.5, -1.0, 2.0])}),
    ]:
        embed.zero_grad()
        out = lt.loss(reward_fn, {**_batch(lt, batch=3), **targets})
        out["loss"].backward()
        assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0

    # one SGD step on the best_of_4 loss lowers it
    lt, labels = BestOfN(4), {**_batch(BestOfN(4), batch=8, seed=3), "best": torch.arange(8) % 4}
    before = lt.loss(reward_fn, labels)["loss"]
    embed.zero_grad()
    before.backward()
    with torch.no_grad():
        embed.weight -= 0.5 * embed.weight.grad
    assert lt.loss(reward_fn, labels)["loss"].item() < before.item()


def test_scalar_rating_loss_is_mse():
    lt = ScalarRating()
    reward = TokenSumReward(torch.randn(VOCAB, generator=torch.Generator().manual_seed(2)))
    labels = {**_batch(lt, batch=5), "score": torch.tensor([0.0, 1.0, -2.0, 3.5, 0.25])}
    out = lt.loss(reward, labels)
    expected = sum(
        (_value(reward, labels["query"][b].tolist(), labels["sample"][b].tolist()) - labels["score"][b].item()) ** 2
        for b in range(5)) / 5
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert reward.calls == 1


def test_scalar_compare_loss_is_mse_of_difference_and_sign_accuracy():
    lt = ScalarCompare()
    reward = TokenSumReward(torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)))
    labels = {**_batch(lt, batch=6), "difference": torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -3.0])}
    out = lt.loss(reward, labels)
    predicted = [
        _value(reward, labels["query"][b].tolist(), labels["sample1"][b].tolist())
        - _value(reward, labels["query"][b].tolist(), labels["sample0"][b].tolist())
        for b in range(6)]
    targets = labels["difference"].tolist()
    assert out["loss"].item() == pytest.approx(sum((p - t) ** 2 for p, t in zip(predicted, targets)) / 6, rel=1e-5)
    agree = sum((p > 0) == (t > 0) for p, t in zip(predicted, targets)) / 6
    assert out["accuracy"].item() == pytest.approx(agree)
    assert reward.calls == 1


def test_reward_fn_with_wrong_shape_is_rejected():
    lt = BestOfN(2)
    labels = {**_batch(lt, batch=3), "best": torch.zeros(3, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        lt.loss(lambda q, r: torch.zeros(6, 1), labels)


def test_get_label_type():
    assert get_label_type("best_of_4") == BestOfN(4)
    assert get_label_type("best_of_7").num_responses == 7
    assert get_label_type("best_of_7").name == "best_of_7"
    assert get_label_type("best_of_2").response_fields == ("sample0", "sample1")
    assert isinstance(get_label_type("scalar_rating"), ScalarRating)
    assert isinstance(get_label_type("scalar_compare"), ScalarCompare)
    assert all(isinstance(get_label_type(n), LabelType) for n in ("best_of_3", "scalar_rating", "scalar_compare"))


@pytest.mark.parametrize("name", ["best_of_1", "best_of_0", "best_of_04", "best_of_x", "best_of_", "pairwise", ""])
def test_get_label_type_unknown(name):
    with pytest.raises(ValueError, match="best_of_N.*scalar_rating.*scalar_compare"):
        get_label_type(name)


@pytest.mark.parametrize("n", [1, 0, -3, 2.0, True])
def test_best_of_n_rejects_bad_n(n):
    with pytest.raises(ValueError):
        BestOfN(n)


def test_target_stats_for_normalization():
    import torch

    from lm_human_preferences.label_types import get_label_type
    assert get_label_type("best_of_4").target_stats({}) == (0.0, 1.0)
    mean, std = get_label_type("scalar_rating").target_stats({"score": torch.tensor([1.0, 3.0])})
    assert (mean, std) == (2.0, 1.0)


# ------------------------------------------------------------------------------------- pairwise


def _softplus(x):
    return math.log1p(math.exp(x))


def test_bradley_terry_loss_and_accuracy_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    # -log σ(d) = log(1 + exp(-d)) for d = 1, 0, -3
    expected = (_softplus(-1.0) + math.log(2.0) + _softplus(3.0)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.351665, rel=1e-6)
    assert pairwise_accuracy(chosen, rejected).item() == pytest.approx(1 / 3)  # the tie counts as wrong


def test_soft_label_loss_by_hand():
    r1, r2, win2 = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.8, 0.5])
    # logits r2 - r1 = [1, 0]; -(p log σ(x) + (1 - p) log σ(-x))
    first = 0.8 * _softplus(-1.0) + 0.2 * _softplus(1.0)
    expected = (first + math.log(2.0)) / 2
    assert soft_label_loss(r1, r2, win2).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.603204, rel=1e-5)
    # p = 1: Bradley–Terry with response 2 chosen; p = 0: with response 1 chosen
    a, b = torch.randn(5, generator=torch.Generator().manual_seed(0)), torch.randn(5)
    torch.testing.assert_close(soft_label_loss(a, b, torch.ones(5)), bradley_terry_loss(b, a))
    torch.testing.assert_close(soft_label_loss(a, b, torch.zeros(5)), bradley_terry_loss(a, b))


def test_pairwise_label_types():
    assert Pairwise().label_schema(query_length=3, response_length=2) == {
        "query": ("tokens", (3,)), "chosen": ("tokens", (2,)), "rejected": ("tokens", (2,))}
    assert SoftPairwise().label_schema(query_length=3, response_length=2) == {
        "query": ("tokens", (3,)), "chosen": ("tokens", (2,)), "rejected": ("tokens", (2,)),
        "chosen_prob": ("probability", ())}
    assert get_label_type("preference") == Pairwise() and get_label_type("soft_preference") == SoftPairwise()
    assert (Pairwise().name, SoftPairwise().name) == ("preference", "soft_preference")
    with pytest.raises(ValueError, match="'preference', 'soft_preference'"):
        get_label_type("preferences")


def test_pairwise_losses_score_both_responses_in_one_call():
    reward = TokenSumReward(torch.randn(VOCAB, generator=torch.Generator().manual_seed(4)))
    labels = _batch(Pairwise(), batch=6)
    out = Pairwise().loss(reward, labels)
    assert reward.calls == 1
    r_c = torch.tensor([_value(reward, labels["query"][b].tolist(), labels["chosen"][b].tolist()) for b in range(6)])
    r_r = torch.tensor([_value(reward, labels["query"][b].tolist(), labels["rejected"][b].tolist()) for b in range(6)])
    assert out["loss"].item() == pytest.approx(bradley_terry_loss(r_c, r_r).item(), rel=1e-5)
    assert out["accuracy"].item() == pytest.approx((r_c > r_r).float().mean().item())
    prob = torch.tensor([1.0, 0.9, 0.5, 0.7, 1.0, 0.6])
    soft = SoftPairwise().loss(reward, {**labels, "chosen_prob": prob})
    assert soft["loss"].item() == pytest.approx(soft_label_loss(r_r, r_c, prob).item(), rel=1e-5)
    assert soft["accuracy"].item() == out["accuracy"].item()
    hard = SoftPairwise().loss(reward, {**labels, "chosen_prob": torch.ones(6)})
    assert hard["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def _rule_pairs(n, *, encoding, seed, query_length=4, response_length=6):
    """Pairs whose chosen response holds more ' good' tokens than the rejected one."""
    rng = random.Random(seed)
    good = encoding.encode(" good")[0]
    vocab = [encoding.encode(" " + w)[0] for w in WORDS if w != "good"]

    def response(count):
        tokens = [good] * count + [rng.choice(vocab) for _ in range(response_length - count)]
        rng.shuffle(tokens)
        return tokens

    rows = []
    for _ in range(n):
        fewer, more = sorted(rng.sample(range(response_length + 1), 2))
        rows.append(([rng.choice(vocab) for _ in range(query_length)], response(more), response(fewer)))
    return {field: torch.tensor(column) for field, column in zip(("query", "chosen", "rejected"), zip(*rows))}


def test_tiny_pairwise_reward_model_learns_a_rule():
    """GPT + RewardModel trained with the Bradley–Terry loss on generated pairs reach >= 90%
    held-out accuracy (chance: 50%)."""
    encoding = small_encoding()
    torch.manual_seed(0)
    reward_model = RewardModel(GPT(GPTConfig(n_vocab=encoding.n_vocab, n_ctx=16, n_embd=16, n_head=2, n_layer=2)))
    train, held_out = _rule_pairs(256, encoding=encoding, seed=0), _rule_pairs(256, encoding=encoding, seed=1)

    def reward_fn(queries, responses):
        return reward_model(queries, responses, pad_token=encoding.padding_token)

    label_type = Pairwise()
    with torch.no_grad():
        before = label_type.loss(reward_fn, held_out)["accuracy"].item()
    optimizer = torch.optim.Adam(reward_model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        order = torch.randperm(256, generator=generator)
        for start in range(0, 256, 32):
            batch = {k: v[order[start:start + 32]] for k, v in train.items()}
            loss = label_type.loss(reward_fn, batch)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        after = label_type.loss(reward_fn, held_out)["accuracy"].item()
    assert before < 0.7 and after >= 0.9, (before, after)
