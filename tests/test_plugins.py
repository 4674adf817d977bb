"""Functions, prompts and labels of your own: the README's commands for examples/ run end to end
(with a tiny model and tiny sizes added), a spec that cannot be loaded is a one-paragraph error
with exit 2 and no run directory, and a function whose result is not one finite number per text
stops the run with exit 2, naming it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from dist_utils import run_distributed

import launch
from lm_human_preferences import labelers, plugins
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.label_types import BestOfN
from lm_human_preferences.labels import read_labels
from lm_human_preferences.language.datasets import QueryDataset, get_passages
from lm_human_preferences.language.encodings import encoding_from_meta, get_encoding

ROOT = Path(__file__).resolve().parents[1]
# the example functions, to compare with what the runs logged
keyword_reward = plugins.load_function(f"{ROOT}/examples/rewards.py:keyword_reward", key="test")
novelty_reward = plugins.load_function(f"{ROOT}/examples/rewards.py:novelty_reward", key="test")
positive_minus_negative = plugins.load_function(f"{ROOT}/examples/labelers.py:positive_minus_negative", key="test")

# What the tests add to the README's commands: a tiny model and tiny sizes, outputs in tmp_path.
POLICY_SIZES = ["--ppo.total_episodes=16", "--ppo.batch_size=8", "--ppo.nminibatches=2", "--ppo.noptepochs=1",
                "--num_logged_samples=8"]
REWARD_SIZES = ["--rollout_batch_size=4", "--normalize_samples=8", "--eval_batch_size=4"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`small`: the tiny vocabulary of `tiny.small_encoding()` (fast); `gpt2`: GPT-2's (the ids of
    examples/labels.json)."""
    d = tmp_path_factory.mktemp("plugin_models")
    return {"small": tiny.make_model(d / "small", encoding=tiny.small_encoding()),
            "gpt2": tiny.make_model(d / "gpt2", n_embd=8, n_layer=1)}


@pytest.fixture
def in_repo(monkeypatch):
    """Run commands from the repository root, as the README does."""
    monkeypatch.chdir(ROOT)


def shown_in_readme(program: str, argv: list[str]) -> list[str]:
    """`argv`, once checked to be a command the README shows (`program` + argv, one line)."""
    readme = (ROOT / "README.md").read_text()
    lines = {line for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in block.splitlines()}
    assert " ".join([program, *argv]) in lines
    return argv


def common(model: Path, out: Path) -> list[str]:
    return [f"--task.policy.initial_model={model}", f"--run.save_dir={out}", "--run.wandb=off", "--run.device=cpu"]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# The README's examples
# --------------------------------------------------------------------------------------------


def test_reward_function_example_trains_a_policy(models, tmp_path, in_repo, capsys):
    command = shown_in_readme("python launch.py", [
        "train_policy", "offline_sentiment", "my_ppo", "--rewards.function=examples/rewards.py:keyword_reward",
        "--task.query_dataset=examples/queries.jsonl"])
    out = tmp_path / "ppo"
    assert launch.main([*command, *POLICY_SIZES, *common(models["small"], out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "hparams.json").read_text())["rewards"]["function"] == "examples/rewards.py:keyword_reward"
    samples = jsonl(out / "samples.jsonl")
    assert len(samples) == 16  # 8 rows after each of the 2 updates
    # the logged scores are the function's, on the decoded texts (the offline task has no truncation)
    expected = keyword_reward([s["query"] for s in samples], [s["response"] for s in samples])
    assert [s["score"] for s in samples] == pytest.approx(expected)
    assert any(expected)  # the random model writes ' good' and ' happy' now and then
    metrics = jsonl(out / "metrics.jsonl")
    assert [m["objective/score"] for m in metrics] == pytest.approx([np.mean(expected[:8]), np.mean(expected[8:])])

    # another function is another setting: the finished run is not taken for this one
    capsys.readouterr()
    other = [a.replace("keyword_reward", "novelty_reward") for a in command]
    assert launch.main([*other, *POLICY_SIZES, *common(models["small"], out)]) == 2
    assert ('rewards.function: "examples/rewards.py:keyword_reward" -> "examples/rewards.py:novelty_reward"'
            in capsys.readouterr().err)


def test_novelty_reward_reads_the_queries_and_returns_a_tensor():
    scores = novelty_reward(["the cat sat.", "a dog."], [" the cat ran far", ""])
    assert torch.equal(scores, torch.tensor([0.5, 0.0]))
    assert plugins.check_scores(scores, n=2, spec="x:y", key="k").tolist() == [0.5, 0.0]


def test_labeler_example_collects_labels(models, tmp_path, in_repo):
    command = shown_in_readme("python launch.py", [
        "collect_labels", "offline_sentiment", "my_labels", "--labeler=examples/labelers.py:positive_minus_negative",
        "--task.query_dataset=examples/queries.jsonl"])
    out = tmp_path / "labels"
    assert launch.main([*command, "--num_labels=16", "--batch_size=8", *common(models["small"], out)]) == 0
    enc = tiny.small_encoding()
    rows = read_labels(out / "labels.json", label_type=BestOfN(4), query_length=16, response_length=12,
                       vocab_size=enc.n_vocab, pad_token=enc.padding_token)
    assert len(rows) == 16
    decided = 0
    for row in rows:
        scores = positive_minus_negative([enc.decode(row[f"sample{i}"]) for i in range(4)])
        assert row["best"] == scores.index(max(scores))  # the highest; the first one on ties
        decided += len(set(scores)) > 1
    assert decided > 0


def test_example_label_file_trains_a_reward_model(models, tmp_path, in_repo):
    command = shown_in_readme("python launch.py", [
        "train_reward", "offline_sentiment", "my_rm", "--labels.source=examples/labels.json", "--labels.num_train=4",
        "--batch_size=4", "--task.query_dataset=examples/queries.jsonl", "--task.policy.initial_model=gpt2"])
    out = tmp_path / "rm"
    assert launch.main([*command, *REWARD_SIZES, *common(models["gpt2"], out)]) == 0
    assert (out / "model.safetensors").is_file()
    final = jsonl(out / "metrics.jsonl")[-1]
    assert 0 <= final["eval/accuracy"] <= 1  # the 4 labels after num_train were held out


def make_labels(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "examples/make_labels.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_the_example_label_file_is_made_from_the_text_labels(tmp_path):
    shown_in_readme("python examples/make_labels.py", ["examples/labels_text.jsonl", "examples/labels.json",
                                                       "--query_length", "16", "--response_length", "12"])
    done = make_labels("examples/labels_text.jsonl", str(tmp_path / "labels.json"), "--query_length", "16",
                       "--response_length", "12")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "labels.json").read_bytes() == (ROOT / "examples" / "labels.json").read_bytes()
    enc = get_encoding("gpt2")
    rows = read_labels(ROOT / "examples" / "labels.json", label_type=BestOfN(4), query_length=16, response_length=12,
                       vocab_size=enc.n_vocab, pad_token=enc.padding_token)
    readme = (ROOT / "README.md").read_text()
    assert json.loads(re.search(r'```json\n(\{"query": .*)\n```', readme).group(1)) == rows[0]  # the row shown
    text = jsonl(ROOT / "examples" / "labels_text.jsonl")
    assert [enc.decode(r["query"]) for r in rows] == [t["query"] for t in text]
    assert [enc.decode(r["sample3"]) for r in rows] == [t["samples"][3] for t in text]


def test_make_labels_for_a_model_of_another_vocabulary(models, tmp_path):
    assert make_labels("examples/labels_text.jsonl", str(tmp_path / "labels.json"), "--query_length", "16",
                       "--response_length", "12", "--model", str(models["small"])).returncode == 0
    enc = encoding_from_meta(json.loads((models["small"] / "config.json").read_text())["encoding"])
    rows = read_labels(tmp_path / "labels.json", label_type=BestOfN(4), query_length=16, response_length=12,
                       vocab_size=enc.n_vocab, pad_token=enc.padding_token)
    assert len(rows) == 8 and max(max(r["query"]) for r in rows) == enc.padding_token


def test_make_labels_names_a_text_too_long(tmp_path):
    done = make_labels("examples/labels_text.jsonl", str(tmp_path / "labels.json"), "--query_length", "4",
                       "--response_length", "12")
    assert done.returncode == 2 and not (tmp_path / "labels.json").exists()
    assert done.stderr == ("error: examples/labels_text.jsonl:1: 'my sister was happy about the new boat.' is 9 "
                           "tokens, more than 4\n")


def test_example_query_file_is_a_query_dataset():
    enc = get_encoding("gpt2")
    queries = QueryDataset(get_passages(ROOT / "examples" / "queries.jsonl", data_dir="unused", seed=0), encoding=enc,
                           query_length=16, start_text=".", end_text=None, batch_size=8)
    texts = [enc.decode(q) for q in next(queries).tolist()]
    lines = [row["text"] for row in jsonl(ROOT / "examples" / "queries.jsonl")]
    assert f'{{"text": "{lines[0]}"}}' in (ROOT / "README.md").read_text()  # the line the README shows
    # each query is the start of the passage's second sentence (start_text '.'), cut at 16 tokens
    assert sorted(texts) == sorted(enc.decode(enc.encode(line.split(".", 1)[1])[:16]) for line in lines)


# --------------------------------------------------------------------------------------------
# Specs that cannot be loaded, and results that are not scores
# --------------------------------------------------------------------------------------------


BROKEN = "import no_such_package_of_anyones\n"
NOT_SCORES = '''
def too_few(*texts):
    return [1.0] * (len(texts[-1]) - 1)

def not_finite(*texts):
    return [float("nan")] * len(texts[-1])

def words(*texts):
    return ["good"] * len(texts[-1])
'''


@pytest.mark.parametrize("spec, says", [
    ("keyword_reward", "expected MODULE:FUNCTION or path/to/file.py:FUNCTION, got 'keyword_reward'"),
    ("no_such_module:fn", "no module named 'no_such_module' in the current directory"),
    ("examples/rewards.py:keyword_rewards", "examples/rewards.py has no attribute 'keyword_rewards'; did you mean "
                                            "'keyword_reward'?"),
    ("examples/rewards.py:POSITIVE", "examples/rewards.py:POSITIVE is a frozenset, not a function"),
    ("examples/nope.py:fn", "examples/nope.py does not exist"),
    ("{tmp}/broken.py:fn", "importing {tmp}/broken.py failed: ModuleNotFoundError: No module named "
                           "'no_such_package_of_anyones'"),
])
@pytest.mark.parametrize("command", ["train_policy", "collect_labels", "pipeline"])
def test_a_spec_that_cannot_be_loaded_is_a_user_error(command, spec, says, models, tmp_path, in_repo, capsys):
    (tmp_path / "broken.py").write_text(BROKEN)
    spec, says = spec.format(tmp=tmp_path), says.format(tmp=tmp_path)
    if command == "collect_labels" and ":" not in spec:  # a labeler's name, not a function
        says = ("unknown labeler 'keyword_reward'; expected one of descriptiveness, sentiment, "
                "offline_descriptiveness, offline_sentiment, or a function of your own as MODULE:FUNCTION or "
                "path/to/file.py:FUNCTION")
    key = {"train_policy": "rewards.function", "collect_labels": "labeler",
           "pipeline": "train_policy.rewards.function"}[command]
    out = tmp_path / "run"
    args = [command, "offline_sentiment", "x", f"--{key}={spec}", *common(models["small"], out)]
    if command == "pipeline":
        args = [a for a in args if not a.startswith("--run.save_dir")]  # it writes runs/x here: must not
    assert launch.main(args) == 2
    err = capsys.readouterr().err
    shown_key = "rewards.function" if command == "pipeline" else key  # the stage's own validation names it
    assert err.startswith(f"error: invalid hyperparameter '{shown_key}': {says}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not (ROOT / "runs" / "x").exists()


def test_a_reward_function_replaces_the_reward_model(models, tmp_path, capsys):
    args = ["train_policy", "offline_sentiment", "x", "--rewards.function=json:loads",
            f"--rewards.trained_model={tmp_path}", *common(models["small"], tmp_path / "run")]
    assert launch.main(args) == 2
    assert ("give exactly one of --rewards.trained_model=DIR, --rewards.train_new_model=on and "
            "--rewards.function=MODULE:FUNCTION") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_pipeline_does_not_take_a_reward_function(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text("def score(queries, responses):\n    return [0.0] * len(responses)\n")
    assert launch.main(["pipeline", "offline_sentiment", "x", "--train_policy.rewards.function=my_rewards:score"]) == 2
    assert ("'train_policy.rewards.function': the pipeline trains the policy against the reward model it trains"
            in capsys.readouterr().err)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "saved_models").exists()


@pytest.mark.parametrize("fn, says", [
    ("too_few", r"returned 7 scores for 8 responses; expected a list of 8 finite numbers, one per response"),
    ("not_finite", r"returned nan for response 0; expected a list of 8 finite numbers"),
    ("words", r"returned a list whose item 0 is str 'good'; expected a list of 8 finite numbers"),
])
def test_a_reward_function_that_returns_no_scores_stops_the_run(fn, says, models, tmp_path, capsys):
    (tmp_path / "mine.py").write_text(NOT_SCORES)
    spec = f"{tmp_path}/mine.py:{fn}"
    args = ["train_policy", "offline_sentiment", "x", f"--rewards.function={spec}", *POLICY_SIZES,
            *common(models["small"], tmp_path / "run")]
    assert launch.main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert re.fullmatch(rf"error: invalid hyperparameter 'rewards.function': {re.escape(spec)} {says}.*", err), err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_labeler_that_returns_no_scores_stops_the_collection(models, tmp_path, capsys):
    (tmp_path / "mine.py").write_text(NOT_SCORES)
    args = ["collect_labels", "offline_sentiment", "x", f"--labeler={tmp_path}/mine.py:too_few", "--num_labels=8",
            "--batch_size=8", *common(models["small"], tmp_path / "run")]
    assert launch.main(args) == 2
    assert (f"error: invalid hyperparameter 'labeler': {tmp_path}/mine.py:too_few returned 3 scores for 4 texts; "
            f"expected a list of 4 finite numbers, one per text") in capsys.readouterr().err
    assert not (tmp_path / "run" / "labels.json").exists()


# --------------------------------------------------------------------------------------------
# The loader and the checks, alone
# --------------------------------------------------------------------------------------------


def test_a_module_of_the_current_directory_or_an_installed_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_scores.py").write_text("class Judge:\n    @staticmethod\n    def score(texts):\n"
                                           "        return [len(t) for t in texts]\n")
    path = list(sys.path)
    labeler = labelers.get_labeler("my_scores:Judge.score")
    assert sys.path == path  # the current directory was on it for the import only
    assert labeler.score(["ab", "abc"]) == [2.0, 3.0] and labeler.best_of(["ab", "abc", "a"]) == 1
    assert plugins.load_function("json:loads", key="k") is json.loads
    with pytest.raises(HParamsError, match="module json .* has no attribute 'load_s'; did you mean 'loads'"):
        plugins.load_function("json:load_s", key="k")


def test_a_file_named_like_an_installed_module_does_not_replace_it(tmp_path):
    (tmp_path / "json.py").write_text("def loads(texts):\n    return [1.0] * len(texts)\n")
    fn = plugins.load_function(f"{tmp_path}/json.py:loads", key="k")
    assert fn(["a"]) == [1.0] and sys.modules["json"].loads is json.loads


@pytest.mark.parametrize("values", [[1, 2.5], (1, 2.5), np.array([1, 2.5]), np.array([1, 2]), torch.tensor([1, 2.5]),
                                    torch.tensor([1.0, 2.5], dtype=torch.bfloat16), [np.float32(1), 2.5]])
def test_scores_as_a_list_tuple_array_or_tensor(values):
    scores = plugins.check_scores(values, n=2, spec="x:y", key="k")
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, float(values[1])]


@pytest.mark.parametrize("values, says", [
    (3.0, "returned float 3.0; expected a list of 2 finite numbers"),
    (None, "returned NoneType None"),
    ([True, 1.0], "returned a list whose item 0 is bool True"),
    (torch.tensor([True, False]), "returned a tensor of dtype torch.bool"),
    (np.array(["a", "b"]), "returned an array of dtype <U1"),
    (torch.ones(2, 1), r"returned an array of shape \(2, 1\) for 2 responses"),
    ([1.0, 1e39], r"returned 1e\+39 for response 1; .*, within float32 range"),
    (np.array([1.0, -np.inf]), "returned -inf for response 1"),
])
def test_what_is_not_scores(values, says):
    with pytest.raises(HParamsError, match=f"^invalid hyperparameter 'k': x:y {says}"):
        plugins.check_scores(values, n=2, spec="x:y", key="k")


# --------------------------------------------------------------------------------------------
# Two ranks: each scores its own rows; the statistics are those of the whole batch
# --------------------------------------------------------------------------------------------


def _train_with_function(rank, world_size, model: Path, out: Path):
    os.chdir(ROOT)
    args = ["train_policy", "offline_sentiment", "x", "--rewards.function=examples/rewards.py:keyword_reward",
            "--ppo.total_episodes=8", "--ppo.batch_size=8", "--ppo.nminibatches=1", "--ppo.noptepochs=1",
            "--ppo.whiten_across_ranks=true", *common(model, out)]
    assert launch.main(args) == 0
    return jsonl(out / "metrics.jsonl") if rank == 0 else None


def test_two_ranks_score_with_the_function_like_one_process(models, tmp_path, in_repo):
    two = run_distributed(_train_with_function, 2, models["small"], tmp_path / "two")[0]
    one = _train_with_function(0, 1, models["small"], tmp_path / "one")
    assert two[0]["objective/score"] == pytest.approx(one[0]["objective/score"], abs=1e-6)
    assert one[0]["objective/score"] > 0
