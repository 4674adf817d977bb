"""Personal preferences (personalization.py, labelers.PreferenceLabeler, the `preferences` judge):
preference prompts, the six scripted options, P-MORL's mean reward (response-scored and as
released), the multitask SFT data and the prep script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_human_preferences import judges, labelers, personalization
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language.encodings import SubsetEncoding

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [s for _, s, _ in labelers.PREFERENCES.values()]


def test_prompts_carry_sentences_in_dimension_order_and_strip_back():
    prompt = personalization.preference_prompt("the cat sat.", ["friendly", "expert"])
    assert prompt == "the cat sat. the serious teacher. friendly and kind."
    assert personalization.strip_preferences(prompt) == ("the cat sat.", ["expert", "friendly"])
    assert judges.active_preferences("the cat sat.") == []
    with pytest.raises(ValueError, match="unknown preferences"):
        personalization.preference_prompt("x", ["polite"])
    assert personalization.combinations(["expertise", "tone"]) == [
        ["simple", "friendly"], ["simple", "unfriendly"], ["expert", "friendly"], ["expert", "unfriendly"]]


def test_options_score_their_dimension_with_opposite_signs():
    texts = ["the old man walked slowly. he was happy and kind.", "the man. the dog."]
    for dim, ((a, _, _), (b, _, _)) in labelers.PREFERENCE_DIMENSIONS.items():
        sa, sb = labelers.get_labeler(a).score(texts), labelers.get_labeler(b).score(texts)
        assert sa == [-s for s in sb] and sa != [0.0, 0.0], dim
    assert labelers.get_labeler("expert").score(texts) == [4 / 3, 0.0]  # old slowly happy kind: 4 words / 3
    assert labelers.get_labeler("verbose").score(texts) == [0.5, 0.2]  # mean words per sentence / 10
    assert labelers.get_labeler("friendly").best_of(["he was sad.", "he was happy."]) == 1
    assert labelers.get_labeler("unfriendly").best_of(["he was sad.", "he was happy."]) == 0


def test_preferences_judge_averages_the_active_options():
    judge = judges.get_judge("preferences")
    friendly_expert = personalization.preference_prompt("the cat sat.", ["friendly", "expert"])
    # happy and kind (friendly) but not descriptive vs. the old quiet man (expert, neutral)
    a, b = "he was happy.", "the old quiet man slowly walked."
    scores = judges.preference_scores()([friendly_expert] * 2, [a, b])
    fr, ex = labelers.get_labeler("friendly"), labelers.get_labeler("expert")
    assert scores == pytest.approx([(fr.score([r])[0] + ex.score([r])[0]) / 2 for r in (a, b)])
    assert judge.compare(friendly_expert, "he was happy and kind. the old quiet man.", "the man.") == "a"
    unfriendly = personalization.preference_prompt("the cat sat.", ["unfriendly"])
    assert judge.compare(unfriendly, "he was happy.", "he was sad.") == "b"
    assert judge.compare("no preference here.", "he was happy.", "he was sad.") == "tie"
    assert judges.get_judge("friendly").compare("", "he was happy.", "he was sad.") == "a"


def encoding():
    return SubsetEncoding.from_texts(["the cat sat on a mat. he was happy and sad." + "".join(SENTENCES)])


def token_counts(token: int):
    """A scorer that counts `token` in the responses and records the queries it saw."""
    seen = []

    def score(queries, responses):
        seen.append(queries.clone())
        return (responses == token).float().sum(1)
    return score, seen


def test_pmorl_scores_the_mean_of_the_active_preferences_rewards():
    enc = encoding()
    prompts = [personalization.preference_prompt("the cat sat.", c) for c in (["friendly", "expert"], ["friendly"])]
    q = [enc.encode(p) for p in prompts]
    queries = torch.tensor([r + [enc.padding_token] * (20 - len(r)) for r in q])
    responses = torch.tensor([enc.encode(" cat cat mat"), enc.encode(" mat mat mat")])
    friendly, seen = token_counts(enc.encode(" cat")[0])
    expert, _ = token_counts(enc.encode(" mat")[0])
    score = personalization.pmorl_scorer({"friendly": friendly, "expert": expert}, encoding=enc)
    assert score(queries, responses).tolist() == [(2 + 1) / 2, 0.0]
    assert enc.decode_batch(seen[0].tolist()) == ["the cat sat.", "the cat sat."]  # without the sentences
    released = personalization.pmorl_scorer({"friendly": friendly, "expert": expert}, encoding=enc, mode="released")
    assert released(queries, responses).tolist() == [0.0, 0.0]  # the response is not scored
    with pytest.raises(HParamsError, match="no reward for expert"):
        personalization.pmorl_scorer({"friendly": friendly}, encoding=enc)(queries, responses)


def test_released_mode_scores_the_prompt_and_divides_by_three():
    enc = encoding()
    prompt = personalization.preference_prompt("the cat sat.", ["friendly", "expert"])
    queries = torch.tensor([enc.encode(prompt)])
    constant = lambda q, r: torch.full((q.shape[0],), 1.5)  # noqa: E731
    score = personalization.pmorl_scorer({"friendly": constant, "expert": constant}, encoding=enc, mode="released")
    assert score(queries, torch.tensor([enc.encode(" cat")])).tolist() == [3.0 / 3]


def test_multitask_sft_rows_keep_the_best_sample_per_prompt():
    p = personalization.preference_prompt("the cat sat.", ["friendly"])
    rows = [{"prompt": p, "response": "he was sad."}, {"prompt": p, "response": "he was happy."},
            {"prompt": "x", "response": "y"}]
    assert personalization.multitask_sft_rows(rows) == [{"prompt": p, "response": "he was happy."},
                                                        {"prompt": "x", "response": "y"}]


def test_prep_script_writes_query_and_prompt_files(tmp_path):
    subprocess.run([sys.executable, "datasets/personal.py", "queries", "--out", str(tmp_path), "--n", "8",
                    "--n_test", "4", "--dimensions", "verbosity"], cwd=ROOT, check=True, capture_output=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["concise.jsonl", "plain.jsonl", "pmorl.jsonl", "test_concise.jsonl", "test_verbose.jsonl",
                     "verbose.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "pmorl.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["text"] == r["prompt"] for r in rows)
    assert all(personalization.strip_preferences(r["prompt"])[1] == r["preferences"] for r in rows)
    assert {tuple(r["preferences"]) for r in rows} <= {("concise",), ("verbose",)}


def test_pmorl_settings_are_checked(tmp_path):
    hp = personalization.PMORLHParams(reward_models="polite=x")
    with pytest.raises(HParamsError, match="OPTION=DIR"):
        hp.validate()
    hp = personalization.PMORLHParams(reward_models=f"friendly={tmp_path}", mode="sum")
    with pytest.raises(HParamsError, match="expected one of"):
        hp.validate()


def test_reward_model_per_preference_scores_the_stripped_query_and_the_response(tmp_path):
    from lm_human_preferences.language.gpt import GPT, GPTConfig
    from lm_human_preferences.rewards import RewardModel
    from lm_human_preferences.train_reward import save_reward_model

    enc = encoding()
    models = {}
    for seed, name in enumerate(["friendly", "expert"]):
        torch.manual_seed(seed)
        models[name] = RewardModel(GPT(GPTConfig(n_vocab=enc.n_vocab, n_ctx=48, n_embd=16, n_head=2, n_layer=1)))
        save_reward_model(tmp_path / name, models[name], encoding=enc.to_meta())
    dirs = {name: str(tmp_path / name) for name in models}
    scorers = personalization.reward_model_scorers({**dirs, "simple": "labeler"}, encoding=enc)
    score = personalization.pmorl_scorer(scorers, encoding=enc)
    prompt = personalization.preference_prompt("the cat sat.", ["friendly", "expert"])
    queries = torch.tensor([enc.encode(prompt)])
    plain = torch.tensor([enc.encode("the cat sat.") + [enc.padding_token] * (queries.shape[1] - 4)])
    responses = torch.tensor([enc.encode(" he was happy")])
    with torch.no_grad():
        want = sum(m(plain, responses, pad_token=enc.padding_token) for m in models.values()) / 2
    torch.testing.assert_close(score(queries, responses), want)
    simple = personalization.preference_prompt("the cat sat.", ["simple"])
    labeler = labelers.get_labeler("simple").score(["he was happy"])
    q = torch.tensor([enc.encode(simple)])
    assert score(q, responses).tolist() == pytest.approx(labeler)


def test_train_pmorl_cli_trains_a_lora_policy_on_preference_prompts(tmp_path, monkeypatch):
    import launch
    from lm_human_preferences.language import lora

    import tiny
    enc = SubsetEncoding.from_texts([" " + " ".join(tiny.WORDS) + "." + "".join(SENTENCES), *tiny.WORDS])
    model = tiny.make_model(tmp_path / "model", encoding=enc)
    corpus = tiny.make_corpus(tmp_path / "corpus.txt").read_text().splitlines()
    queries = personalization.write_preference_queries(
        tmp_path / "q.jsonl", iter(corpus * 2), combos=personalization.combinations(["tone"]), n=32, words=6)
    monkeypatch.chdir(ROOT)
    args = ["train_pmorl", "offline_personal", "pm", f"--run.save_dir={tmp_path / 'pm'}", "--run.device=cpu",
            f"--task.policy.initial_model={model}", f"--task.query_dataset={queries}", "--task.query_length=16",
            "--task.response_length=4", "--ppo.total_episodes=16", "--ppo.batch_size=8", "--ppo.nminibatches=1",
            "--lora.rank=2", "--pmorl.reward_models=friendly=labeler,unfriendly=labeler"]
    assert launch.main(args) == 0
    assert lora.load_adapter(tmp_path / "pm")[0]["base"] == str(model)
    assert launch.main([*args[:3], "--run.save_dir=" + str(tmp_path / "bad"),
                        *args[5:-1], "--pmorl.reward_models=friendly=labeler"]) == 2  # unfriendly has no reward
