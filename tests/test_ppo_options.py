"""train_policy's options past the original (policy_hparams, rollouts): responses that stop at
EOS or at a stop text and are masked after it, the KL estimators, the KL as a loss term, reward
shaping (a stateful one resumes bitwise) and score whitening. Their defaults are the original's,
which test_train_policy checks unchanged; here each option changes what it should, on small
hand-computed cases and on tiny runs."""

import functools

import pytest
import tiny
import torch
# files: the module's tiny models and corpus (a fixture of test_train_policy's)
from test_train_policy import Crash, files, hparams, metrics, record_updates, token_score  # noqa: F401

from lm_human_preferences import lm_tasks, ppo, rollouts, shaping, train_policy
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language.checkpoints import load_weights
from lm_human_preferences.policy import Policy


@pytest.fixture
def updates():
    log: list = []
    step = record_updates(log)
    yield log
    train_policy.PPOTrainer.step = step


# --------------------------------------------------------------------------------------------
# Masks: where a response stops
# --------------------------------------------------------------------------------------------

PIECES = {0: "x", 1: "\n", 2: "\nHu", 3: "man:", 4: "y", 5: "<eot>"}


def decode(ids):
    return "".join(PIECES[i] for i in ids)


def test_stop_text_keeps_the_token_that_completes_it():
    responses = torch.tensor([[0, 1, 2, 3, 4, 4],    # "\n\nHuman:" spans tokens 1-3
                              [4, 4, 4, 4, 4, 4],    # no stop text: all kept
                              [1, 2, 3, 1, 2, 3],    # the first occurrence counts
                              [0, 1, 2, 4, 1, 4]])   # "\n\nHuy": not the text
    mask = lm_tasks.stop_text_mask(responses, text="\n\nHuman:", decode=decode)
    assert mask.tolist() == [[True] * 4 + [False] * 2, [True] * 6, [True] * 3 + [False] * 3, [True] * 6]


def test_response_mask_the_earlier_stop_wins():
    enc = tiny.small_encoding()
    eot, the, dot = enc.eot_token, enc.encode(" the")[0], enc.encode(".")[0]
    responses = torch.tensor([[the, eot, the, dot, the], [the, dot, the, eot, the], [the] * 5])
    task = lm_tasks.TaskHParams(stop_at_eos=True, stop_text=".")
    assert lm_tasks.response_mask(responses, task=task, encoding=enc).tolist() == [
        [True, True, False, False, False], [True, True, False, False, False], [True] * 5]
    task.stop_text = ""
    assert lm_tasks.response_mask(responses, task=task, encoding=enc).tolist() == [
        [True, True, False, False, False], [True, True, True, True, False], [True] * 5]
    assert lm_tasks.response_mask(responses, task=lm_tasks.TaskHParams(), encoding=enc) is None  # the original


def test_masked_gae_sees_nothing_after_the_stop():
    """A row that stops at its second token: its advantages are those of the two-token row
    alone, whatever rewards and values follow; zero after it; whitening is over kept tokens."""
    rewards = torch.tensor([[0.5, 1.0, 7.0, -3.0], [0.1, 0.2, 0.3, 0.4]])
    values = torch.tensor([[0.2, 0.4, 9.0, 5.0], [0.0, 0.1, 0.2, 0.3]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    adv, ret = ppo.advantages_and_returns(rewards, values, gamma=1.0, lam=0.5, whiten_rewards=False, mask=mask)
    raw0, _ = ppo.gae(rewards[:1, :2], values[:1, :2], gamma=1.0, lam=0.5)  # by hand: A1 = 0.6, A0 = 0.7 + 0.5 * 0.6
    torch.testing.assert_close(raw0, torch.tensor([[1.0, 0.6]]))
    raw1, _ = ppo.gae(rewards[1:], values[1:], gamma=1.0, lam=0.5)
    kept = torch.cat([raw0[0], raw1[0]])
    torch.testing.assert_close(adv[mask], (kept - kept.mean()) / (kept.var(unbiased=False) + 1e-8).sqrt())
    assert adv[~mask].tolist() == [0.0, 0.0] and ret[~mask].tolist() == [0.0, 0.0]


def test_masked_losses_are_those_of_the_kept_tokens():
    g = torch.Generator().manual_seed(0)
    full = {k: torch.randn(2, 5, generator=g) for k in ("logprobs", "values", "old_logprobs", "old_values",
                                                       "advantages", "returns")}
    mask = torch.tensor([[True, True, True, False, False]] * 2)
    kw = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    masked = ppo.ppo_losses(**full, **kw, mask=mask)
    kept = ppo.ppo_losses(**{k: v[:, :3] for k, v in full.items()}, **kw)
    for key in kept:
        torch.testing.assert_close(masked[key], kept[key], msg=key)


# --------------------------------------------------------------------------------------------
# Scores to rewards
# --------------------------------------------------------------------------------------------


def test_score_whitening_no_shift_keeps_the_mean_shift_centres():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    pad = 99
    responses = torch.zeros(4, 3, dtype=torch.long)
    no_shift = rollouts.shape_scores(scores, responses, shaping=None, whiten="no_shift", pad_token=pad)
    shift = rollouts.shape_scores(scores, responses, shaping=None, whiten="shift", pad_token=pad)
    std = scores.std(unbiased=False)
    torch.testing.assert_close(no_shift, (scores - 3.0) / std + 3.0)
    assert float(no_shift.mean()) == pytest.approx(3.0) and float(no_shift.std(unbiased=False)) == pytest.approx(1.0)
    torch.testing.assert_close(shift, (scores - 3.0) / std)


def test_shaping_sees_the_lengths_up_to_truncation():
    pad = 9
    shown = torch.tensor([[1, 2, pad, pad], [1, 2, 3, 4]])
    out = rollouts.shape_scores(torch.tensor([1.0, 1.0]), shown, shaping=shaping.parse_shaping("length_penalty=0.25"),
                                whiten="off", pad_token=pad)
    assert out.tolist() == [0.5, 0.0]


def test_rewards_clamped_kl_penalty_and_kl_as_loss():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])  # log ratio 0.5, -1, 0
    score = torch.tensor([2.0])
    rewards, non_score, kl = rollouts.rewards_of(logprobs, ref, score, kl_coef=0.1, estimator="k1_clamped",
                                                 kl_as="penalty", mask=None)
    assert kl.tolist() == [[0.5, 0.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 2.0]]))
    mask = torch.tensor([[True, True, False]])
    rewards, non_score, kl = rollouts.rewards_of(logprobs, ref, score, kl_coef=0.1, estimator="k1", kl_as="loss",
                                                 mask=mask)
    assert rewards.tolist() == [[0.0, 2.0, 0.0]] and kl.tolist() == [[0.5, -1.0, 0.0]]  # the score at the stop
    assert not non_score.any()


def test_bad_options_name_their_key():
    hp = train_policy.TrainPolicyHParams()
    for key, value in (("rewards.shaping", "clip=3"), ("rewards.shaping", "nope=1"), ("ppo.kl_estimator", "k4"),
                       ("ppo.kl_as", "both"), ("ppo.whiten_scores", "on")):
        with pytest.raises(HParamsError) as e:
            hp.override_from_dict({key: value})
            hp.validate()
        assert key.split(".")[-1] in str(e.value)
        hp = train_policy.TrainPolicyHParams()


# --------------------------------------------------------------------------------------------
# Tiny runs
# --------------------------------------------------------------------------------------------


def test_tokens_after_the_stop_do_not_change_training(files, tmp_path, monkeypatch):
    """With --task.stop_text the policy after one update is the same whatever tokens follow each
    response's stop; without it (fixed-length responses) they matter."""
    respond = Policy.respond
    task = lm_tasks.TaskHParams(stop_text=".")
    enc = tiny.small_encoding()

    def overwrite_after_stop(self, *args, **kwargs):
        out = respond(self, *args, **kwargs)
        return out.masked_fill(~lm_tasks.response_mask(out, task=task, encoding=enc), files.good)

    def trained(name, overrides):
        run = train_policy.train(hparams(files, tmp_path / name, {"ppo.total_episodes": 8, **overrides}),
                                 exp_name=name, score_fn=token_score)
        return load_weights(run).trunk

    stopped = trained("stopped", {"task.stop_text": "."})
    fixed = trained("fixed", {})
    monkeypatch.setattr(Policy, "respond", overwrite_after_stop)
    stopped_overwritten = trained("stopped_overwritten", {"task.stop_text": "."})
    fixed_overwritten = trained("fixed_overwritten", {})
    for k in stopped:
        torch.testing.assert_close(stopped[k], stopped_overwritten[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.allclose(fixed[k], fixed_overwritten[k]) for k in fixed)


def test_stop_text_rollout_masks_kl_and_places_the_score(files, tmp_path, updates):
    seen = []

    def scorer(queries, responses):
        seen.append(responses.clone())
        return token_score(queries, responses)

    hp = hparams(files, tmp_path / "run", {"task.stop_text": ".", "ppo.total_episodes": 8, "ppo.batch_size": 8})
    train_policy.train(hp, exp_name="stop", score_fn=scorer)
    data, stats = updates[0]["data"], updates[0]["stats"]
    mask, responses = data["mask"], data["responses"]
    enc = tiny.small_encoding()
    for row, m in zip(responses.tolist(), mask.tolist()):
        stop = next((i + 1 for i in range(len(row)) if "." in enc.decode(row[:i + 1])), len(row))
        assert m == [True] * stop + [False] * (len(row) - stop)
    assert (~mask).any() and mask.all(1).any()  # some stop, some run to the end
    assert torch.equal(seen[0], responses.masked_fill(~mask, files.small_pad))  # scored as they stop
    assert torch.equal(data["postprocessed_responses"], seen[0])
    rewards, kl = data["rewards"], (data["logprobs"] - data["ref_logprobs"]) * mask
    assert not rewards[~mask].any()
    last = mask.sum(1) - 1
    rows = torch.arange(8)
    torch.testing.assert_close(rewards[rows, last], -0.2 * kl[rows, last] + data["scores"])
    assert stats["objective/kl"] == pytest.approx(float(kl.sum(1).mean()), rel=1e-6)
    assert stats["objective/response_length"] == pytest.approx(float(mask.sum(1).float().mean()))


def test_stop_at_eos_in_a_run(files, tmp_path, monkeypatch, updates):
    eot = tiny.small_encoding().eot_token
    respond = Policy.respond

    def eot_in_even_rows(self, *args, **kwargs):
        out = respond(self, *args, **kwargs).clone()
        out[::2, 2] = eot
        return out

    monkeypatch.setattr(Policy, "respond", eot_in_even_rows)
    hp = hparams(files, tmp_path / "run", {"task.stop_at_eos": True, "ppo.total_episodes": 8})
    train_policy.train(hp, exp_name="eos", score_fn=token_score)
    data = updates[0]["data"]
    first = [row.index(eot) + 1 if eot in row else len(row) for row in data["responses"].tolist()]
    assert data["mask"].sum(1).tolist() == first and all(n <= 3 for n in first[::2])
    assert not data["rewards"][~data["mask"]].any()


def test_kl_as_a_loss_term(files, tmp_path, updates):
    """No KL in the rewards; the loss adds β·mean(k3) over the minibatch, which in the first
    minibatch (ratio exactly 1) is that of the rollout's logprobs."""
    hp = hparams(files, tmp_path / "run", {"ppo.kl_as": "loss", "ppo.kl_estimator": "k3", "ppo.noptepochs": 1,
                                           "ppo.total_episodes": 8, "rewards.kl_coef": 0.5})
    train_policy.train(hp, exp_name="kl_loss", score_fn=token_score)
    data, stats = updates[0]["data"], updates[0]["stats"]
    expected = torch.zeros_like(data["rewards"])
    expected[:, -1] = data["scores"]
    assert torch.equal(data["rewards"], expected)
    log_ratio = data["logprobs"] - data["ref_logprobs"]
    k3 = torch.expm1(-log_ratio) + log_ratio
    assert stats["ppo/loss/kl"] == pytest.approx(0.5 * float(k3.mean()), rel=1e-5)
    assert stats["ppo/loss/total"] == pytest.approx(
        stats["ppo/loss/policy"] + 0.1 * stats["ppo/loss/value"] + stats["ppo/loss/kl"], rel=1e-5)
    assert stats["objective/kl"] == pytest.approx(float(k3.sum(1).mean()), rel=1e-6)  # the estimate used
    assert stats["objective/non_score_reward"] == 0.0


def test_shaping_and_whitening_in_a_run(files, tmp_path, updates):
    hp = hparams(files, tmp_path / "run", {"task.truncate_token": files.period, "task.penalty_reward_value": -1.0,
                                           "rewards.shaping": "length_penalty=0.5,scale=2",
                                           "ppo.whiten_scores": "no_shift", "ppo.total_episodes": 8})
    train_policy.train(hp, exp_name="shaped", score_fn=token_score)
    data, stats = updates[0]["data"], updates[0]["stats"]
    lengths = (data["postprocessed_responses"] != files.small_pad).sum(1)
    shaped = (data["scores"] - 0.5 * lengths) * 2
    expected = (shaped - shaped.mean()) / (shaped.var(unbiased=False) + 1e-8).sqrt() + shaped.mean()
    torch.testing.assert_close(data["shaped_scores"], expected)
    torch.testing.assert_close(data["rewards"][:, -1], data["shaped_scores"] - 0.2 * (
        data["logprobs"] - data["ref_logprobs"])[:, -1])
    assert stats["objective/score"] == pytest.approx(float(data["scores"].mean()))  # the scorer's
    assert stats["objective/shaped_score"] == pytest.approx(float(shaped.mean()), rel=1e-5)


class CallCount:
    """A stateful shaping: adds the number of batches it shaped before."""

    def __init__(self):
        self.calls = 0

    def __call__(self, scores, lengths):
        self.calls += 1
        return scores + (self.calls - 1)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_resume_with_a_stateful_shaping_is_bitwise(files, tmp_path, monkeypatch, updates):
    monkeypatch.setitem(shaping.SHAPINGS, "call_count", (CallCount, (0,)))
    overrides = {"ppo.total_episodes": 32, "run.save_interval": 1, "rewards.shaping": "call_count"}
    full = train_policy.train(hparams(files, tmp_path / "full", overrides), exp_name="full", score_fn=token_score)
    assert [u["stats"]["objective/shaped_score"] - u["stats"]["objective/score"] for u in updates] == \
        pytest.approx([0, 1, 2, 3])
    step = train_policy.PPOTrainer.step

    @functools.wraps(step)
    def crash_after_two(self):
        if self.update == 2:
            raise Crash
        return step(self)

    monkeypatch.setattr(train_policy.PPOTrainer, "step", crash_after_two)
    resumed = tmp_path / "resumed"
    with pytest.raises(Crash):
        train_policy.train(hparams(files, resumed, overrides), exp_name="resumed", score_fn=token_score)
    monkeypatch.setattr(train_policy.PPOTrainer, "step", step)
    train_policy.train(hparams(files, resumed, overrides), exp_name="resumed", score_fn=token_score)
    a, b = load_weights(full), load_weights(resumed)
    assert all(torch.equal(a.trunk[k], b.trunk[k]) for k in a.trunk)
    drop = ("time/", "elapsed/")
    assert [{k: v for k, v in r.items() if not k.startswith(drop)} for r in metrics(full)] == \
           [{k: v for k, v in r.items() if not k.startswith(drop)} for r in metrics(resumed)]
