"""Tests for lm_human_preferences.ppo (docs/original.md §6)."""

import math

import pytest
import torch

from lm_human_preferences.ppo import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    advantages_and_returns,
    entropy_from_logits,
    gae,
    kl_estimate,
    kl_loss,
    kl_penalty_rewards,
    linear_lr,
    logprobs_and_entropies,
    logprobs_from_logits,
    policy_loss,
    ppo_losses,
    value_loss,
    var_explained,
    whiten,
)


def gae_reference(rewards, values, gamma, lam):
    """Straightforward double Python loop over (b, t), V_T = 0."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        lastgaelam = 0.0
        for t in reversed(range(T)):
            nextvalue = float(values[b, t + 1]) if t < T - 1 else 0.0
            delta = float(rewards[b, t]) + gamma * nextvalue - float(values[b, t])
            lastgaelam = delta + gamma * lam * lastgaelam
            adv[b][t] = lastgaelam
    adv = torch.tensor(adv, dtype=torch.float64)
    return adv, adv + values


# ------------------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("B,T", [(1, 1), (1, 5), (3, 1), (4, 7), (8, 24)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
def test_gae_matches_double_loop_reference(B, T, gamma, lam):
    g = torch.Generator().manual_seed(B * 100 + T)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = gae(rewards, values, gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_reference(rewards, values, gamma, lam)
    assert adv.shape == (B, T) and ret.shape == (B, T)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv, ref_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-12, atol=1e-12)


def test_gae_hand_example():
    # gamma=1, lam=0.5, T=2: V=[1, 2], r=[0, 3]
    # delta_1 = 3 + 0 - 2 = 1;           A_1 = 1
    # delta_0 = 0 + 2 - 1 = 1;           A_0 = 1 + 0.5 * 1 = 1.5
    # returns = A + V = [2.5, 3]
    adv, ret = gae(torch.tensor([[0.0, 3.0]]), torch.tensor([[1.0, 2.0]]), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[1.5, 1.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.5, 3.0]]))


def test_advantages_and_returns_pipeline():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3 + 1
    values = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for whiten_rewards in (False, True):
        adv, ret = advantages_and_returns(rewards, values, gamma=1.0, lam=0.95, whiten_rewards=whiten_rewards)
        r = whiten(rewards, shift_mean=False) if whiten_rewards else rewards
        ref_adv, ref_ret = gae_reference(r, values, 1.0, 0.95)
        torch.testing.assert_close(ret, ref_ret)  # returns use the UNwhitened advantages
        torch.testing.assert_close(adv, whiten(ref_adv))
        assert abs(adv.mean().item()) < 1e-12


# ------------------------------------------------------------------------------------- whiten


def test_whiten_mean_zero_var_one():
    x = torch.randn(16, 9, dtype=torch.float64) * 5 + 3
    w = whiten(x)
    assert w.shape == x.shape
    assert abs(w.mean().item()) < 1e-10
    assert abs(w.var(correction=0).item() - 1.0) < 1e-6


def test_whiten_shift_mean_false_keeps_mean():
    x = torch.randn(16, 9, dtype=torch.float64) * 5 + 3
    w = whiten(x, shift_mean=False)
    torch.testing.assert_close(w.mean(), x.mean())
    assert abs(w.var(correction=0).item() - 1.0) < 1e-6


def test_whiten_biased_variance_explicit():
    # x = [1, 2, 3, 6]: mean 3, biased var = (4 + 1 + 0 + 9) / 4 = 3.5 (unbiased would be 14/3)
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    expected = (x - 3.0) / math.sqrt(3.5 + 1e-8)
    torch.testing.assert_close(whiten(x), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(whiten(x, shift_mean=False), expected + 3.0, rtol=1e-14, atol=1e-14)
    # eps matters for a near-constant input: var = 0 -> divide by sqrt(eps)
    c = torch.tensor([2.0, 2.0, 2.0 + 1e-6], dtype=torch.float64)
    m = c.mean()
    v = ((c - m) ** 2).mean()
    torch.testing.assert_close(whiten(c), (c - m) / torch.sqrt(v + 1e-8), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(whiten(c, eps=1e-2), (c - m) / torch.sqrt(v + 1e-2), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------- losses


def _policy_example():
    # ratio = [[1, 1.5], [0.5, 0.5]]; A = [[1, 2], [-1, 2]]; cliprange = 0.2
    # clip(ratio)  = [[1, 1.2], [0.8, 0.5 -> 0.8]]
    # pg_losses    = -A*ratio       = [[-1, -3.0], [0.5, -1.0]]
    # pg_losses2   = -A*clip(ratio) = [[-1, -2.4], [0.8, -1.6]]
    # max          = [[-1, -2.4], [0.8, -1.0]] -> sum -3.6 -> mean -0.9
    # clipfrac: pg2 > pg -> [[F, T], [T, F]] = 0.5
    #   (|ratio - 1| > 0.2 would give 3/4: element [1,1] is out of range but not "clipped")
    # approxkl = 0.5 * mean(log(ratio)^2) = 0.5 * (ln1.5^2 + 2 ln0.5^2) / 4 = 0.14066...
    ratio = torch.tensor([[1.0, 1.5], [0.5, 0.5]], dtype=torch.float64)
    logprobs = torch.log(ratio) - 2.0
    old_logprobs = torch.full((2, 2), -2.0, dtype=torch.float64)
    adv = torch.tensor([[1.0, 2.0], [-1.0, 2.0]], dtype=torch.float64)
    return logprobs, old_logprobs, adv


def test_policy_loss_hand_computed():
    logprobs, old_logprobs, adv = _policy_example()
    logprobs.requires_grad_(True)
    loss, stats = policy_loss(logprobs, old_logprobs, adv, cliprange=0.2)
    assert loss.item() == pytest.approx(-0.9, abs=1e-12)
    assert stats["clipfrac"].item() == 0.5
    expected_kl = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4
    assert expected_kl == pytest.approx(0.1406635, abs=1e-6)
    assert stats["approxkl"].item() == pytest.approx(expected_kl, abs=1e-12)
    # Gradient: d/dlogp of -A*ratio/4 on unclipped elements, 0 where the clipped branch wins.
    # [0,0]: -1*1/4 = -0.25; [0,1]: 0; [1,0]: 0; [1,1]: -2*0.5/4 = -0.25
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.25, 0.0], [0.0, -0.25]], dtype=torch.float64))


def test_policy_loss_ratio_one():
    g = torch.Generator().manual_seed(1)
    logprobs = -torch.rand(3, 5, generator=g) * 5
    adv = torch.randn(3, 5, generator=g)
    loss, stats = policy_loss(logprobs.clone(), logprobs.clone(), adv, cliprange=0.2)
    assert stats["approxkl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    assert torch.equal(loss, -adv.mean())


def _value_example():
    # V = [[1, 2], [0, -1]]; V_old = [[0.5, 2], [0.5, 0]]; ret = [[2, 1], [1, 0]]; c = 0.2
    # clip(V, V_old -+ 0.2) = [[0.7, 2.0], [0.3, -0.2]]
    # vf1 = (V - ret)^2     = [[1, 1], [1, 1]]
    # vf2 = (Vclip - ret)^2 = [[1.69, 1], [0.49, 0.04]]
    # max = [[1.69, 1], [1, 1]] -> mean 4.69/4 = 1.1725 -> loss 0.5 * 1.1725 = 0.58625
    # clipfrac: vf2 > vf1 -> [[T, F], [F, F]] = 0.25; error = mean(vf1) = 1
    values = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    old_values = torch.tensor([[0.5, 2.0], [0.5, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    return values, old_values, returns


def test_value_loss_hand_computed():
    values, old_values, returns = _value_example()
    values.requires_grad_(True)
    loss, stats = value_loss(values, old_values, returns, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.58625, abs=1e-12)
    assert stats["clipfrac"].item() == 0.25
    assert stats["error"].item() == pytest.approx(1.0, abs=1e-12)
    assert stats["vpred"].item() == pytest.approx(0.5, abs=1e-12)
    # Gradient: 0.5 * 2 (V - ret) / 4 where vf1 wins; 0 on [0,0] (clipped branch, constant in V)
    # [0,1]: 0.25 * (2 - 1) = 0.25; [1,0]: 0.25 * (0 - 1) = -0.25; [1,1]: 0.25 * (-1 - 0) = -0.25
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.25], [-0.25, -0.25]], dtype=torch.float64))


def test_ppo_losses_combines_and_names():
    logprobs, old_logprobs, adv = _policy_example()
    values, old_values, returns = _value_example()
    logprobs.requires_grad_(True)
    values.requires_grad_(True)
    entropy = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    out = ppo_losses(
        logprobs=logprobs,
        values=values,
        old_logprobs=old_logprobs,
        old_values=old_values,
        advantages=adv,
        returns=returns,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        entropy=entropy,
    )
    required = [
        "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total",
        "ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/policy/entropy",
        "ppo/val/clipfrac", "ppo/val/error", "ppo/val/var_explained", "ppo/val/mean", "ppo/val/var",
        "ppo/returns/mean", "ppo/returns/var",
    ]  # fmt: skip
    for k in required:
        assert k in out, k
        assert out[k].dim() == 0, k
    assert out["ppo/loss/policy"].item() == pytest.approx(-0.9)
    assert out["ppo/loss/value"].item() == pytest.approx(0.58625)
    assert out["ppo/loss/total"].item() == pytest.approx(-0.9 + 0.1 * 0.58625)
    assert out["ppo/policy/clipfrac"].item() == 0.5
    assert out["ppo/val/clipfrac"].item() == 0.25
    assert out["ppo/val/error"].item() == pytest.approx(1.0)
    assert out["ppo/policy/entropy"].item() == pytest.approx(2.5)
    # returns [2, 1, 1, 0]: mean 1, biased var 0.5; old values [0.5, 2, 0.5, 0]: mean 0.75,
    # biased var (0.0625 + 1.5625 + 0.0625 + 0.5625) / 4 = 0.5625
    assert out["ppo/returns/mean"].item() == pytest.approx(1.0)
    assert out["ppo/returns/var"].item() == pytest.approx(0.5)
    assert out["ppo/val/mean"].item() == pytest.approx(0.75)
    assert out["ppo/val/var"].item() == pytest.approx(0.5625)
    # returns - V = [1, -1, 1, 1]: biased var = 1 - 0.25 = 0.75 -> 1 - 0.75 / 0.5 = -0.5
    assert out["ppo/val/var_explained"].item() == pytest.approx(-0.5)
    # only the losses carry a graph
    assert out["ppo/loss/total"].requires_grad
    assert not out["ppo/policy/approxkl"].requires_grad
    out["ppo/loss/total"].backward()
    assert logprobs.grad is not None and values.grad is not None
    assert "ppo/policy/entropy" not in ppo_losses(
        logprobs=logprobs, values=values, old_logprobs=old_logprobs, old_values=old_values,
        advantages=adv, returns=returns, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
    )  # fmt: skip


def test_ppo_losses_first_step_ratio_one():
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 6, generator=g) * 4
    v = torch.randn(4, 6, generator=g)
    adv = torch.randn(4, 6, generator=g)
    ret = v + torch.randn(4, 6, generator=g)
    out = ppo_losses(
        logprobs=lp.clone(), values=v.clone(), old_logprobs=lp, old_values=v, advantages=adv, returns=ret,
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
    )  # fmt: skip
    assert out["ppo/policy/approxkl"].item() == 0.0
    assert out["ppo/policy/clipfrac"].item() == 0.0
    assert out["ppo/val/clipfrac"].item() == 0.0
    assert torch.equal(out["ppo/loss/policy"], -adv.mean())
    torch.testing.assert_close(out["ppo/loss/value"], 0.5 * ((v - ret) ** 2).mean())


# ------------------------------------------------------------------------------------- rewards


def test_kl_penalty_rewards_score_on_last_position():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0], [-0.1, -0.4, -0.2]])
    scores = torch.tensor([3.0, -1.0])
    rewards, non_score, kl = kl_penalty_rewards(logprobs, ref_logprobs, scores, kl_coef=0.2)
    # kl = [[0.5, 0, 0.5], [0, 0.2, -0.1]]; non_score = -0.2 * kl
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.2, -0.1]]))
    torch.testing.assert_close(non_score, torch.tensor([[-0.1, 0.0, -0.1], [0.0, -0.04, 0.02]]))
    expected = torch.tensor([[-0.1, 0.0, -0.1 + 3.0], [0.0, -0.04, 0.02 - 1.0]])
    torch.testing.assert_close(rewards, expected)
    # non_score_reward is not modified in place by adding the score
    torch.testing.assert_close(rewards - non_score, torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, -1.0]]))


# ------------------------------------------------------------------------------------- KL control


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 512)
    assert c.value == 0.05
    d = FixedKLController(1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05


@pytest.mark.parametrize(
    "current,expected_e",
    [
        (6.6, 0.1),  # inside the band
        (6.0, 0.0),
        (5.4, -0.1),
        (7.2, 0.2),  # exactly at +0.2
        (100.0, 0.2),  # clipped above
        (4.8, -0.2),  # exactly at -0.2
        (0.0, -0.2),  # clipped below (KL/target - 1 = -1)
        (-3.0, -0.2),
    ],
)
def test_adaptive_kl_controller_formula(current, expected_e):
    target, horizon, n_steps, init = 6.0, 10000.0, 512, 0.15
    c = AdaptiveKLController(init, target=target, horizon=horizon)
    new = c.update(current, n_steps)
    expected = init * (1 + expected_e * n_steps / horizon)
    assert c.value == pytest.approx(expected, rel=1e-12)
    assert new == c.value


def test_adaptive_kl_controller_sequence_and_state_dict():
    c = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    kls = [1.0, 3.0, 8.0, 6.5, 20.0]
    expected = 0.15
    for kl in kls[:3]:
        c.update(kl, 512)
        expected *= 1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * 512 / 10000
    assert c.value == pytest.approx(expected, rel=1e-14)

    state = c.state_dict()
    assert all(type(v) is float for v in state.values())
    resumed = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    resumed.load_state_dict(state)
    assert resumed.value == c.value
    for kl in kls[3:]:
        c.update(kl, 512)
        resumed.update(kl, 512)
    assert resumed.value == c.value  # bitwise


# ------------------------------------------------------------------------------------- lr


def test_linear_lr():
    assert linear_lr(1e-5, step=0, total_steps=100) == 1e-5
    assert linear_lr(1e-5, step=50, total_steps=100) == pytest.approx(5e-6)
    assert linear_lr(1e-5, step=99, total_steps=100) == pytest.approx(1e-7)
    assert linear_lr(1e-5, step=100, total_steps=100) == 0.0
    assert linear_lr(1e-5, step=150, total_steps=100) == 0.0


# ------------------------------------------------------------------------------------- logits


def test_logprobs_and_entropy_from_logits():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 11, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    dist = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), dist.log_prob(tokens))
    torch.testing.assert_close(entropy_from_logits(logits), dist.entropy())
    # uniform logits -> entropy log V, logprob -log V
    u = torch.zeros(1, 2, 7)
    torch.testing.assert_close(entropy_from_logits(u), torch.full((1, 2), math.log(7)))
    torch.testing.assert_close(logprobs_from_logits(u, torch.tensor([[0, 6]])), torch.full((1, 2), -math.log(7)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropies_share_one_log_softmax(dtype):
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 5, 40, generator=g) * 4).to(dtype).requires_grad_()
    tokens = torch.randint(0, 40, (3, 5), generator=g)
    lp, ent = logprobs_and_entropies(logits, tokens)
    assert torch.equal(lp, logprobs_from_logits(logits, tokens))  # bit for bit: the PPO ratio's input
    torch.testing.assert_close(ent, entropy_from_logits(logits), rtol=0, atol=1e-5)
    assert lp.requires_grad and not ent.requires_grad and ent.dtype == torch.float32
    lp_only, none = logprobs_and_entropies(logits, tokens, entropies=False)
    assert none is None and torch.equal(lp_only, lp)


def test_logits_helpers_upcast_low_precision():
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(2, 4, 50, generator=g) * 4).to(torch.bfloat16)
    tokens = torch.randint(0, 50, (2, 4), generator=g)
    lp = logprobs_from_logits(logits, tokens)
    ent = entropy_from_logits(logits)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == (2, 4) and ent.shape == (2, 4)
    ref = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]
    assert torch.equal(lp, ref)  # log_softmax computed after the fp32 cast
    # deterministic: same inputs -> bitwise same logprobs (ratio exactly 1 at first step)
    assert torch.equal(lp, logprobs_from_logits(logits, tokens))


# ------------------------------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    ref_logprobs = torch.tensor([[-1.5, -2.0, -0.25]], dtype=torch.float64)
    r = [0.5, 0.0, -0.25]  # logp - ref_logp
    expected = {
        "k1": r,
        "k2": [0.5 * x * x for x in r],
        "k3": [math.exp(-x) - 1 + x for x in r],
        "k1_clamped": [max(x, 0.0) for x in r],
    }
    for name, values in expected.items():
        torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, estimator=name),
                                   torch.tensor([values], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; expected one of k1, k2, k3, k1_clamped"):
        kl_estimate(logprobs, ref_logprobs, estimator="k4")
    assert KL_ESTIMATORS == ("k1", "k2", "k3", "k1_clamped")


def test_kl_estimators_agree_in_expectation():
    """Tokens sampled from p: mean k1 and mean k3 estimate KL(p || q); k2, k3, k1_clamped are >= 0."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    tokens = torch.multinomial(p, 200000, replacement=True, generator=g)
    logp, logq = p.log()[tokens].reshape(1, -1), q.log()[tokens].reshape(1, -1)
    true_kl = float((p * (p.log() - q.log())).sum())
    for name in ("k1", "k3"):
        assert kl_estimate(logp, logq, estimator=name).mean().item() == pytest.approx(true_kl, abs=0.01)
    for name in ("k2", "k3", "k1_clamped"):
        assert kl_estimate(logp, logq, estimator=name).min().item() >= 0.0


def test_kl_penalty_rewards_default_is_the_original_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    logprobs, ref_logprobs, scores = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g), torch.randn(4, generator=g)
    rewards, non_score, kl = kl_penalty_rewards(logprobs, ref_logprobs, scores, kl_coef=0.15)
    explicit = kl_penalty_rewards(logprobs, ref_logprobs, scores, kl_coef=0.15, estimator="k1", mask=None)
    original_kl = logprobs - ref_logprobs
    original = -0.15 * original_kl
    assert torch.equal(kl, original_kl) and torch.equal(non_score, original)
    original = original.clone()
    original[:, -1] += scores
    assert torch.equal(rewards, original)
    assert all(torch.equal(x, y) for x, y in zip(explicit, (rewards, non_score, kl)))


def test_kl_penalty_rewards_with_an_estimator_and_a_mask():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0], [-0.1, -0.4, -0.2]])
    scores = torch.tensor([3.0, -1.0])
    mask = torch.tensor([[True, True, False], [True, True, True]])  # row 0 ends at its second token
    rewards, non_score, kl = kl_penalty_rewards(logprobs, ref_logprobs, scores, kl_coef=0.2, estimator="k2",
                                                mask=mask)
    # k2 = 0.5 * (logp - ref)^2 = [[0.125, 0, 0.125], [0, 0.02, 0.005]], zero after the mask
    torch.testing.assert_close(kl, torch.tensor([[0.125, 0.0, 0.0], [0.0, 0.02, 0.005]]))
    torch.testing.assert_close(non_score, -0.2 * kl)
    torch.testing.assert_close(rewards, torch.tensor([[-0.025, 3.0, 0.0], [0.0, -0.004, -0.001 - 1.0]]))


def test_kl_loss_term():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]], requires_grad=True)
    ref_logprobs = torch.tensor([[-1.5, -2.0], [-0.25, -0.25]])
    loss = kl_loss(logprobs, ref_logprobs, kl_coef=0.1, estimator="k3")
    r = [0.5, 0.0, -0.25, 0.0]
    assert loss.item() == pytest.approx(0.1 * sum(math.exp(-x) - 1 + x for x in r) / 4, rel=1e-6)
    loss.backward()
    # d/dlogp of k3 = 1 - exp(-(logp - ref)); averaged over 4 tokens, times 0.1
    expected = torch.tensor([[1 - math.exp(-0.5), 0.0], [1 - math.exp(0.25), 0.0]]) * 0.1 / 4
    torch.testing.assert_close(logprobs.grad, expected)
    mask = torch.tensor([[True, False], [True, True]])
    masked = kl_loss(logprobs, ref_logprobs, kl_coef=1.0, estimator="k1", mask=mask)
    assert masked.item() == pytest.approx((0.5 - 0.25 + 0.0) / 3)


def test_var_explained_of_averages():
    # minibatch errors 1 and 2, returns variances 1 and 4: 1 - 1.5 / 2.5 = 0.4 (a mean of the
    # per-minibatch ratios would give (0 + 0.5) / 2 = 0.25)
    assert var_explained((1.0 + 2.0) / 2, (1.0 + 4.0) / 2) == pytest.approx(0.4)
    assert var_explained(0.0, 2.0) == 1.0
    assert math.isnan(var_explained(1.0, 0.0))
