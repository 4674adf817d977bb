"""Tests for lm_human_preferences.optim.TFAdam (docs/original.md §7)."""

import copy
import io
import math

import pytest
import torch

from lm_human_preferences.optim import TFAdam

LRS = [1e-2, 5e-3, 2e-2, 1e-3, 7e-3]


def _make_params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(3, 4, generator=g, dtype=dtype).requires_grad_(True),
        torch.randn(5, generator=g, dtype=dtype).requires_grad_(True),
        torch.randn((), generator=g, dtype=dtype).requires_grad_(True),
    ]


def _grads(params, step, scale=1.0):
    """Deterministic pseudo-gradients for a given step."""
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) * scale for p in params]


def _reference_tf_adam(params, grads_per_step, lrs, beta1=0.9, beta2=0.999, eps=1e-5):
    """Hand-written TF1 Adam in float64."""
    theta = [p.detach().clone().double() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        lr_t = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        for i, g in enumerate(grads):
            g = g.double()
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            theta[i] = theta[i] - lr_t * m[i] / (torch.sqrt(v[i]) + eps)
    return theta


def _run(opt, params, steps, lrs, scale=1.0):
    for k in steps:
        for group in opt.param_groups:
            group["lr"] = lrs[k]
        for p, g in zip(params, _grads(params, k, scale)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_tf_adam_matches_formula_with_changing_lr(foreach):
    params = _make_params()
    opt = TFAdam(params, lr=LRS[0], foreach=foreach)
    grads_per_step = [_grads(params, k) for k in range(5)]
    expected = _reference_tf_adam(params, grads_per_step, LRS)
    _run(opt, params, range(5), LRS)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-13, atol=1e-13)
    for p in params:
        st = opt.state[p]
        assert st["step"] == 5
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}


def test_tf_adam_foreach_equals_loop():
    pa, pb = _make_params(torch.float32), _make_params(torch.float32)
    oa, ob = TFAdam(pa, lr=1e-2, foreach=False), TFAdam(pb, lr=1e-2, foreach=True)
    _run(oa, pa, range(5), LRS)
    _run(ob, pb, range(5), LRS)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_tf_adam_differs_from_torch_adam_epsilon_placement():
    # Small gradients (|g| ~ 1e-4, comparable to eps = 1e-5 after sqrt(1 - beta2) scaling):
    # TF1 step 1: lr * sqrt(1e-3)/0.1 * 0.1 g / (sqrt(1e-3)|g| + eps) ~ lr * 0.24
    # torch Adam: lr * g / (|g| + eps)                                  ~ lr * 0.91
    lr = 1e-3
    p_tf = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    p_pt = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    g = torch.full((64,), 1e-4, dtype=torch.float64)
    opt_tf = TFAdam([p_tf], lr=lr, eps=1e-5)
    opt_pt = torch.optim.Adam([p_pt], lr=lr, eps=1e-5)
    p_tf.grad, p_pt.grad = g.clone(), g.clone()
    opt_tf.step()
    opt_pt.step()
    step_tf = -p_tf.detach()[0].item()
    step_pt = -p_pt.detach()[0].item()
    s = math.sqrt(1 - 0.999)
    assert step_tf == pytest.approx(lr * (s / 0.1) * (0.1 * 1e-4) / (s * 1e-4 + 1e-5), rel=1e-10)
    assert step_pt == pytest.approx(lr * 1e-4 / (1e-4 + 1e-5), rel=1e-10)
    assert step_pt / step_tf > 3.0  # torch's early updates are several times larger

    # Over several steps with random gradients the trajectories keep differing.
    pa, pb = _make_params(), _make_params()
    oa, ob = TFAdam(pa, lr=1e-3), torch.optim.Adam(pb, lr=1e-3, eps=1e-5)
    _run(oa, pa, range(5), LRS, scale=1e-4)
    _run(ob, pb, range(5), LRS, scale=1e-4)
    assert max((a - b).abs().max().item() for a, b in zip(pa, pb)) > 1e-4

    # With eps = 0 the two parameterisations are mathematically identical.
    pa, pb = _make_params(), _make_params()
    oa, ob = TFAdam(pa, lr=1e-3, eps=0.0), torch.optim.Adam(pb, lr=1e-3, eps=0.0)
    _run(oa, pa, range(5), LRS)
    _run(ob, pb, range(5), LRS)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_tf_adam_state_dict_round_trip_is_bitwise(foreach):
    total, split = 6, 3
    # Uninterrupted run.
    pa = _make_params(torch.float32, seed=7)
    oa = TFAdam(pa, lr=LRS[0], foreach=foreach)
    _run(oa, pa, range(total), LRS + LRS)

    # Interrupted run: train, checkpoint through torch.save, rebuild everything, resume.
    pb = _make_params(torch.float32, seed=7)
    ob = TFAdam(pb, lr=LRS[0], foreach=foreach)
    _run(ob, pb, range(split), LRS + LRS)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in pb], "optim": ob.state_dict()}, buf)
    del ob, pb
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    pc = [t.clone().requires_grad_(True) for t in ckpt["params"]]
    oc = TFAdam(pc, lr=123.0, foreach=foreach)  # lr is restored from the checkpoint groups
    oc.load_state_dict(ckpt["optim"])
    assert oc.param_groups[0]["lr"] == LRS[split - 1]
    assert all(oc.state[p]["step"] == split for p in pc)
    _run(oc, pc, range(split, total), LRS + LRS)

    for a, c in zip(pa, pc):
        assert torch.equal(a.detach(), c.detach())
    for a, c in zip(pa, pc):
        sa, sc = oa.state[a], oc.state[c]
        assert sa["step"] == sc["step"] == total
        assert torch.equal(sa["exp_avg"], sc["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sc["exp_avg_sq"])


def test_tf_adam_deepcopy_state_dict_round_trip():
    pa = _make_params(seed=3)
    oa = TFAdam(pa, lr=1e-2)
    _run(oa, pa, range(2), LRS)
    sd = copy.deepcopy(oa.state_dict())
    pb = [p.detach().clone().requires_grad_(True) for p in pa]
    ob = TFAdam(pb, lr=1e-2)
    ob.load_state_dict(sd)
    _run(oa, pa, range(2, 5), LRS)
    _run(ob, pb, range(2, 5), LRS)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def test_tf_adam_skips_params_without_grad():
    params = _make_params()
    before = params[1].detach().clone()
    opt = TFAdam(params, lr=1e-2)
    params[0].grad = torch.ones_like(params[0])
    params[2].grad = torch.ones_like(params[2])
    opt.step()
    assert params[1] not in opt.state
    assert torch.equal(params[1].detach(), before)
    assert opt.state[params[0]]["step"] == 1


def test_tf_adam_param_groups_have_own_lr():
    p1 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    p2 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = TFAdam([{"params": [p1], "lr": 1e-2}, {"params": [p2], "lr": 1e-3}])
    p1.grad = torch.ones(3, dtype=torch.float64)
    p2.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    # step 1 with g = 1: lr * sqrt(1e-3)/0.1 * 0.1 / (sqrt(1e-3) + 1e-5)
    s = math.sqrt(1e-3)
    torch.testing.assert_close(p1.detach(), torch.full((3,), -1e-2 * s / (s + 1e-5), dtype=torch.float64))
    torch.testing.assert_close(p2.detach(), torch.full((3,), -1e-3 * s / (s + 1e-5), dtype=torch.float64))
