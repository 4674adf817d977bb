"""train_policy --rewards.omit_long (rollouts.omit_long): responses without the truncation token
are replaced by terminated ones of the batch, with their own score (corrected) or the long one's
(released, the length-bias paper's code)."""

import pytest
import torch
from test_ppo_options import updates  # noqa: F401
from test_train_policy import files, hparams, token_score  # noqa: F401

from lm_human_preferences import rollouts, train_policy
from lm_human_preferences.hparams import HParamsError


def test_rollouts_omit_long_gathers_every_row_tensor():
    data = {"queries": torch.tensor([[0], [1], [2]]), "responses": torch.tensor([[10, 11], [12, 13], [14, 15]]),
            "scores": torch.tensor([0.5, -1.0, 2.0]), "score_stats": {"x": 1.0}, "scalar": torch.tensor(3.0)}
    terminated = torch.tensor([True, False, False])  # only row 0 terminated: rows 1 and 2 become row 0
    for variant, scores in (("corrected", [0.5, 0.5, 0.5]), ("released", [0.5, -1.0, 2.0])):
        out = rollouts.omit_long(data, terminated, variant=variant, generator=None)
        assert out["queries"].tolist() == [[0], [0], [0]] and out["responses"].tolist() == [[10, 11]] * 3
        assert out["scores"].tolist() == scores and out["scalar"] is data["scalar"]
        assert out["score_stats"] == {"x": 1.0, "objective/omitted": pytest.approx(2 / 3)}


@pytest.mark.parametrize("variant", ["corrected", "released"])
def test_omit_long_in_a_run(files, tmp_path, updates, variant):
    hp = hparams(files, tmp_path / "run", {"task.truncate_token": files.period, "task.penalty_reward_value": -1.0,
                                           "rewards.omit_long": variant, "ppo.total_episodes": 8})
    train_policy.train(hp, exp_name="omit", score_fn=token_score)
    data, stats = updates[0]["data"], updates[0]["stats"]
    omitted = stats["objective/omitted"]
    assert 0 < omitted < 1  # this seed: half the rows lack a period
    assert bool((data["responses"] == files.period).any(1).all())  # every row now holds a terminated response
    penalized = int((data["scores"] == -1.0).sum())  # the penalty of a response without a period
    # released: a replaced row keeps the long one's penalized score; corrected: the terminated row's own
    assert penalized == (round(omitted * len(data["scores"])) if variant == "released" else 0)


def test_omit_long_needs_a_truncation_token(files, tmp_path):
    with pytest.raises(HParamsError, match="omit_long replaces the responses without the truncation token"):
        hparams(files, tmp_path / "run", {"rewards.omit_long": "corrected"}).validate()
    with pytest.raises(HParamsError, match="expected off, released or corrected"):
        hparams(files, tmp_path / "run", {"rewards.omit_long": "yes", "task.truncate_token": files.period}).validate()
