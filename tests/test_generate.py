"""generate and evaluate: a model's outputs for a prompt file (one row per prompt and sample, the
same file for the same command, num_samples, temperature, top_p and truncation honoured), their
reward-model scores and a judge's win rate against a baseline file, the README's commands as
written, and bad inputs as one-paragraph errors with exit status 2 and no run directory."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import launch
import tiny
from lm_human_preferences import judges, lm_tasks, train_reward
from lm_human_preferences.evaluate import EvaluateHParams
from lm_human_preferences.generate import GenerateHParams
from lm_human_preferences.hparams_help import field_docs
from lm_human_preferences.rewards import load_reward_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the cat sat on a mat.", "the dog ran far away.", "a big red house."]
RUN = ["--run.wandb=off", "--run.device=cpu"]
ROW_FIELDS = {"prompt", "response", "sample", "prompt_tokens", "response_tokens", "seed"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny language model (64-token context, the small GPT-2 subset vocabulary) and a reward
    model built from it."""
    d = tmp_path_factory.mktemp("generate_models")
    enc = tiny.small_encoding()
    model = tiny.make_model(d / "model", encoding=enc)
    rm = train_reward.build_reward_model(lm_tasks.load_pretrained(str(model)), seed=0)
    return {"model": model, "rm": train_reward.save_reward_model(d / "rm", rm, encoding=enc.to_meta())}


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate(out: Path, model: Path, prompts: Path, *args: str) -> int:
    return launch.main(["generate", "offline_sentiment", "x", f"--run.save_dir={out}", *RUN, f"--model={model}",
                        f"--prompts={prompts}", *args])


def evaluate(out: Path, *args: str) -> int:
    return launch.main(["evaluate", "offline_sentiment", "x", f"--run.save_dir={out}", *RUN, *args])


def test_every_setting_has_a_description_and_help_lists_them(capsys):
    for cls in (GenerateHParams, EvaluateHParams):
        assert all(field_docs(cls).values()), field_docs(cls)
    assert launch.main(["generate", "--help"]) == 0
    assert "  --top_p=1.0\n      sample from the most probable tokens" in capsys.readouterr().out
    assert launch.main(["evaluate", "offline_sentiment", "--help"]) == 0
    assert "  --judge=\"\"\n" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


def test_generate_writes_one_row_per_prompt_and_sample(models, prompts, tmp_path):
    out = tmp_path / "gen"
    assert generate(out, models["model"], prompts, "--num_samples=2", "--length=5", "--batch_size=4") == 0
    rows = jsonl(out / "outputs.jsonl")
    enc = tiny.small_encoding()
    assert [(r["prompt"], r["sample"]) for r in rows] == [(p, s) for p in PROMPTS for s in range(2)]
    for r in rows:
        assert set(r) == ROW_FIELDS and r["seed"] == 0
        assert r["prompt_tokens"] == enc.encode(r["prompt"])
        assert len(r["response_tokens"]) == 5  # the offline task has no truncation token
        assert r["response"] == enc.decode(r["response_tokens"], skip_special=True)
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert json.loads((out / "hparams.json").read_text())["num_samples"] == 2
    [metrics] = jsonl(out / "metrics.jsonl")
    assert metrics["generate/rows"] == 6 and metrics["generate/prompts"] == 3


def test_text_and_jsonl_text_prompt_files_read_like_prompt_files(models, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n")
    write_jsonl(tmp_path / "p.jsonl", [{"text": p} for p in PROMPTS[:2]])
    for name in ("p.txt", "p.jsonl"):
        assert generate(tmp_path / name.replace(".", "_"), models["model"], tmp_path / name, "--length=3") == 0
    assert (tmp_path / "p_txt" / "outputs.jsonl").read_text() == (tmp_path / "p_jsonl" / "outputs.jsonl").read_text()
    assert [r["prompt"] for r in jsonl(tmp_path / "p_txt" / "outputs.jsonl")] == PROMPTS[:2]


def test_the_same_command_writes_the_same_file_and_a_rerun_does_nothing(models, prompts, tmp_path, capsys):
    args = ("--num_samples=3", "--length=6")
    assert generate(tmp_path / "a", models["model"], prompts, *args) == 0
    assert generate(tmp_path / "b", models["model"], prompts, *args) == 0
    first = tmp_path / "a" / "outputs.jsonl"
    assert first.read_bytes() == (tmp_path / "b" / "outputs.jsonl").read_bytes()
    responses = [r["response_tokens"] for r in jsonl(first)]
    assert len({tuple(r) for r in responses[:3]}) > 1  # a prompt's samples differ
    written = first.stat().st_mtime_ns
    capsys.readouterr()
    assert generate(tmp_path / "a", models["model"], prompts, *args) == 0
    assert first.stat().st_mtime_ns == written and "nothing to do" in capsys.readouterr().out
    assert generate(tmp_path / "a", models["model"], prompts, "--num_samples=2", "--length=6") == 2
    assert "holds a finished run with other settings (num_samples: 3 -> 2)" in capsys.readouterr().err
    assert generate(tmp_path / "c", models["model"], prompts, *args, "--run.seed=1") == 0
    other = jsonl(tmp_path / "c" / "outputs.jsonl")
    assert [r["response_tokens"] for r in other] != responses and {r["seed"] for r in other} == {1}


def _generate_on_rank(rank, world_size, config) -> dict:
    from dist_utils import count_sampling
    from lm_human_preferences import distributed, generate as generate_module

    sampled = count_sampling(generate_module)
    status = launch.main(config["args"])
    distributed.barrier()  # rank 0 has written the file
    return {"status": status, "sampled": sampled, "rows": jsonl(config["out"] / "outputs.jsonl")}


def test_ranks_take_turns_at_the_batches_and_write_what_one_process_writes(models, prompts, tmp_path):
    """Under torchrun batch b is sampled on rank b mod N; rank 0 writes every row, in order."""
    from dist_utils import run_distributed

    def config(out):  # 3 prompts x 3 samples in batches of 4: three batches, the last of one row
        return {"out": out, "args": ["generate", "offline_sentiment", "x", f"--run.save_dir={out}", *RUN,
                                     f"--model={models['model']}", f"--prompts={prompts}", "--num_samples=3",
                                     "--length=5", "--batch_size=4"]}

    rank0, rank1 = run_distributed(_generate_on_rank, 2, config(tmp_path / "two"), timeout=300)
    (one,) = run_distributed(_generate_on_rank, 1, config(tmp_path / "one"), timeout=300)
    assert rank0["status"] == rank1["status"] == one["status"] == 0
    assert (rank0["sampled"], rank1["sampled"], one["sampled"]) == ([4, 1], [4], [4, 4, 1])
    assert len(one["rows"]) == 9 and rank0["rows"] == rank1["rows"] == one["rows"]


def test_temperature_and_top_p_are_honoured(models, prompts, tmp_path):
    def tokens(name, *args):
        assert generate(tmp_path / name, models["model"], prompts, "--num_samples=2", *args) == 0
        return [r["response_tokens"] for r in jsonl(tmp_path / name / "outputs.jsonl")]

    greedy = tokens("greedy", "--temperature=0")
    assert greedy[0] == greedy[1]
    assert tokens("nucleus", "--top_p=1e-6", "--run.seed=5") == greedy  # only the most probable token
    default = tokens("default")  # the task's temperature, every token
    assert default == tokens("explicit", "--temperature=0.7", "--top_p=1")
    assert default != greedy and default != tokens("hotter", "--temperature=1.5")


def test_responses_are_cut_after_the_task_truncation_token(models, prompts, tmp_path):
    dot = tiny.small_encoding().encode(".")[0]
    assert generate(tmp_path / "cut", models["model"], prompts, "--num_samples=8", "--length=16",
                    f"--task.truncate_token={dot}", "--task.truncate_after=0") == 0
    rows = jsonl(tmp_path / "cut" / "outputs.jsonl")
    for r in rows:
        t = r["response_tokens"]
        assert dot not in t[:-1] and (t[-1] == dot or len(t) == 16)
    assert any(len(r["response_tokens"]) < 16 for r in rows)


@pytest.mark.parametrize("content, args, expected", [
    (None, [], "invalid hyperparameter 'prompts': {dir}/prompts.jsonl: no such file"),
    ("", [], "{dir}/prompts.jsonl: holds no prompts"),
    ("not json\n", [], "{dir}/prompts.jsonl: line 1: invalid JSON"),
    ('{"prompt": "the cat."}\n{"question": "x"}\n', [], '{dir}/prompts.jsonl: line 2: expected an object with a '
                                                      '"prompt" (or "text") field'),
    ('{"prompt": ""}\n', [], "line 1: field 'prompt': expected a non-empty string, got ''"),
    ('{"prompt": 3}\n', [], "line 1: field 'prompt': expected a non-empty string, got 3"),
    ('{"prompt": "' + "the cat " * 40 + '"}\n', [], "line 1: the prompt (81 tokens) and 12 response tokens "
                                                    "exceed the context of"),
    ('{"prompt": "the cat."}\n', ["--task.query_suffix=" + " the cat" * 30],
     "line 1: the prompt (3 tokens), the query prefix and suffix (60) and 12 response tokens exceed the context"),
    ('{"prompt": "the cat."}\n', ["--top_p=0"], "invalid hyperparameter 'top_p': must be a finite number > 0 and "
                                                "<= 1 (got 0.0)"),
    ('{"prompt": "the cat."}\n', ["--top_p=1.5"], "invalid hyperparameter 'top_p'"),
    ('{"prompt": "the cat."}\n', ["--num_samples=0"], "invalid hyperparameter 'num_samples'"),
    ('{"prompt": "the cat."}\n', ["--temperature=-1"], "invalid hyperparameter 'temperature'"),
    ('{"prompt": "the cat."}\n', ["--model={rm}"], "rm: is a reward model"),
    ('{"prompt": "the cat."}\n', ["--model=", "--task.policy.initial_model="],
     "invalid hyperparameter 'model': no model given; pass --model=DIR"),
    ('{"prompt": "the cat."}\n', ["--prompts={dir}/prompts.csv"], "{dir}/prompts.csv: expected a .txt file"),
])
def test_bad_generate_inputs_are_one_paragraph_and_leave_no_run_directory(models, tmp_path, capsys, content, args,
                                                                          expected):
    if content is not None:
        (tmp_path / "prompts.jsonl").write_text(content)
    fill = {"dir": tmp_path, "rm": models["rm"]}
    assert generate(tmp_path / "run", models["model"], tmp_path / "prompts.jsonl",
                    *[a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected.format(**fill) in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


def outputs_file(path: Path, pairs: list[tuple[str, str]]) -> Path:
    return write_jsonl(path, [{"prompt": p, "response": r, "sample": 0} for p, r in pairs])


PAIRS = [("the cat sat.", " the dog ran far."), ("a big house.", " it was red"), ("the tree.", " ")]


def test_evaluate_scores_each_row_with_the_reward_model(models, tmp_path, capsys):
    outputs = outputs_file(tmp_path / "outputs.jsonl", PAIRS)
    assert evaluate(tmp_path / "eval", f"--outputs={outputs}", f"--reward_model={models['rm']}", "--batch_size=2") == 0
    enc = tiny.small_encoding()
    rm = load_reward_model(models["rm"], encoding=enc).eval()
    with torch.no_grad():
        expected = [rm(torch.tensor([enc.encode(p)]), torch.tensor([enc.encode(r)]), pad_token=enc.padding_token).item()
                    for p, r in PAIRS]
    scores = jsonl(tmp_path / "eval" / "scores.jsonl")
    assert [(s["prompt"], s["response"], s["sample"]) for s in scores] == [(p, r, 0) for p, r in PAIRS]
    assert [s["score"] for s in scores] == pytest.approx(expected, abs=1e-5)
    [metrics] = jsonl(tmp_path / "eval" / "metrics.jsonl")
    values = torch.tensor(expected, dtype=torch.float64)
    assert metrics["eval/score_mean"] == pytest.approx(values.mean().item(), abs=1e-5)
    assert metrics["eval/score_std"] == pytest.approx(values.std(unbiased=False).item(), abs=1e-5)
    assert metrics["eval/rows"] == 3 and "eval/win_rate" not in metrics
    assert f"{outputs}, 3 rows: reward model score {metrics['eval/score_mean']:.3f}" in capsys.readouterr().out


def test_a_response_without_the_truncation_token_gets_the_penalty(models, tmp_path):
    dot = tiny.small_encoding().encode(".")[0]
    outputs = outputs_file(tmp_path / "outputs.jsonl", PAIRS)
    assert evaluate(tmp_path / "eval", f"--outputs={outputs}", f"--reward_model={models['rm']}",
                    f"--task.truncate_token={dot}", "--task.truncate_after=0", "--task.penalty_reward_value=-7") == 0
    scores = [s["score"] for s in jsonl(tmp_path / "eval" / "scores.jsonl")]
    assert scores[0] != -7 and scores[1:] == [-7, -7]  # the responses without a "."
    [metrics] = jsonl(tmp_path / "eval" / "metrics.jsonl")
    assert metrics["eval/penalized"] == pytest.approx(2 / 3)


def test_a_judge_gives_the_win_rate_against_a_baseline_file(tmp_path, capsys):
    # length_biased: VADER's score (0 for these words) + 0.05 a word, so the longer wins
    a = outputs_file(tmp_path / "a.jsonl", [("p1", "the cat sat on the mat"), ("p2", "the dog ran far away"),
                                            ("p3", "a house"), ("p4", "the tree")])
    b = outputs_file(tmp_path / "b.jsonl", [("p1", "the cat"), ("p2", "a dog"), ("p3", "a big red house"),
                                            ("p4", "a tree")])
    assert evaluate(tmp_path / "eval", f"--outputs={a}", "--judge=length_biased", f"--baseline={b}") == 0
    [metrics] = jsonl(tmp_path / "eval" / "metrics.jsonl")
    assert [s["judge"] for s in jsonl(tmp_path / "eval" / "scores.jsonl")] == ["win", "win", "loss", "tie"]
    expected = judges.win_rate_files(judges.get_judge("length_biased"), a, b)  # one sample a prompt: the same
    assert (metrics["eval/win_rate"], metrics["eval/win_rate_low"], metrics["eval/win_rate_high"]) == \
        (expected.rate, expected.low, expected.high) == (0.625, expected.low, expected.high)
    assert (metrics["eval/wins"], metrics["eval/ties"], metrics["eval/losses"], metrics["eval/prompts"]) == (2, 1, 1, 4)
    assert expected.low < 0.625 < expected.high
    assert "judge length_biased: win rate 0.625" in capsys.readouterr().out
    assert evaluate(tmp_path / "eval", f"--outputs={a}", "--judge=length_biased", f"--baseline={b}") == 0
    assert "nothing to do" in capsys.readouterr().out


def test_the_win_rate_interval_resamples_prompts_not_rows(tmp_path):
    a = outputs_file(tmp_path / "a.jsonl", [("p1", "the cat sat"), ("p1", "the dog ran"), ("p2", "a"),
                                            ("p2", "the tree")])
    b = outputs_file(tmp_path / "b.jsonl", [("p1", "the cat"), ("p1", "a dog"), ("p2", "a big house"),
                                            ("p2", "a tree")])
    assert evaluate(tmp_path / "eval", f"--outputs={a}", "--judge=length_biased", f"--baseline={b}",
                    "--num_resamples=200", "--confidence=0.9") == 0
    [metrics] = jsonl(tmp_path / "eval" / "metrics.jsonl")
    low, high = judges.bootstrap_interval([1.0, 0.25], num_resamples=200, confidence=0.9, seed=0)  # each prompt's mean
    assert (metrics["eval/win_rate"], metrics["eval/win_rate_low"], metrics["eval/win_rate_high"]) == (0.625, low, high)
    assert metrics["eval/prompts"] == 2 and metrics["eval/rows"] == 4


@pytest.mark.parametrize("args, expected", [
    ([], "invalid hyperparameter 'outputs': no output file given"),
    (["--outputs={dir}/none.jsonl", "--judge=sentiment", "--baseline={a}"],
     "invalid hyperparameter 'outputs': {dir}/none.jsonl: no such file"),
    (["--outputs={a}"], "invalid hyperparameter 'reward_model': nothing to evaluate with"),
    (["--outputs={a}", "--judge=sentiment"], "invalid hyperparameter 'baseline': a judge compares the outputs with a "
                                             "baseline output file; pass both --judge=NAME and --baseline=FILE"),
    (["--outputs={a}", "--baseline={a}"], "invalid hyperparameter 'judge': a judge compares"),
    (["--outputs={a}", "--judge=sentimnt", "--baseline={a}"], "invalid hyperparameter 'judge': unknown judge"),
    (["--outputs={a}", "--judge=sentiment", "--baseline={short}"],
     "invalid hyperparameter 'baseline': {short} has 1 rows and {a} 3; expected the same prompts in the same order"),
    (["--outputs={a}", "--judge=sentiment", "--baseline={other}"],
     "invalid hyperparameter 'baseline': row 2: the prompts of {a} and {other} differ ('a big house.' vs 'x')"),
    (["--outputs={broken}", "--reward_model={rm}"], "{broken}: line 2, field 'response': missing"),
    (["--outputs={a}", "--reward_model={dir}/none"], "invalid hyperparameter 'reward_model': {dir}/none: no such "
                                                     "directory"),
    (["--outputs={a}", "--reward_model={model}"], "not a reward model (kind='gpt')"),
    (["--outputs={long}", "--reward_model={rm}"], "{long}: row 1: prompt and response take 123 tokens; the reward "
                                                  "model {rm} reads 1 to 64"),
])
def test_bad_evaluate_inputs_are_one_paragraph_and_leave_no_run_directory(models, tmp_path, capsys, args, expected):
    fill = {"dir": tmp_path, "rm": models["rm"], "model": models["model"],
            "a": outputs_file(tmp_path / "a.jsonl", PAIRS), "short": outputs_file(tmp_path / "short.jsonl", PAIRS[:1]),
            "other": outputs_file(tmp_path / "other.jsonl", [PAIRS[0], ("x", "y"), PAIRS[2]]),
            "long": outputs_file(tmp_path / "long.jsonl", [("the cat.", " the dog ran far" * 30)])}
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    fill["broken"] = tmp_path / "broken.jsonl"
    assert evaluate(tmp_path / "run", *[a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected.format(**fill) in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# The README's example
# --------------------------------------------------------------------------------------------


def shown_in_readme(command: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    lines = {line for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in block.splitlines()}
    assert command in lines
    return command.split()[2:]


def test_the_readme_generate_and_evaluate_example(models, tmp_path, monkeypatch, capsys):
    """The three commands as written, from a directory holding the example prompts and, as after
    the quick start, runs/demo/policy and runs/demo/reward_model (tiny ones here)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "prompts.jsonl", tmp_path / "examples")
    tiny.make_model(tmp_path / "runs" / "demo" / "policy", seed=1, encoding=tiny.small_encoding())
    shutil.copytree(models["rm"], tmp_path / "runs" / "demo" / "reward_model")
    base = shown_in_readme("python launch.py generate offline_sentiment base_outputs "
                           "--prompts=examples/prompts.jsonl --num_samples=4")
    assert launch.main([*base, f"--task.policy.initial_model={models['model']}", *RUN]) == 0
    tuned = shown_in_readme("python launch.py generate offline_sentiment ppo_outputs --model=runs/demo/policy "
                            "--prompts=examples/prompts.jsonl --num_samples=4")
    assert launch.main([*tuned, *RUN]) == 0
    compare = shown_in_readme("python launch.py evaluate offline_sentiment ppo_eval "
                              "--outputs=runs/ppo_outputs/outputs.jsonl --reward_model=runs/demo/reward_model "
                              "--judge=sentiment --baseline=runs/base_outputs/outputs.jsonl")
    capsys.readouterr()
    assert launch.main([*compare, *RUN]) == 0
    [metrics] = jsonl(tmp_path / "runs" / "ppo_eval" / "metrics.jsonl")
    assert metrics["eval/rows"] == 32 and metrics["eval/prompts"] == 8
    assert 0 <= metrics["eval/win_rate_low"] <= metrics["eval/win_rate"] <= metrics["eval/win_rate_high"] <= 1
    assert "reward model score" in capsys.readouterr().out
    assert len(jsonl(tmp_path / "runs" / "ppo_eval" / "scores.jsonl")) == 32


def test_judge_scores_gives_the_judges_mean_score_over_prompts(tmp_path, capsys):
    # harmless: harmless marker words minus harmful ones; p1's two rows average (2 + 0) / 2 = 1
    a = outputs_file(tmp_path / "a.jsonl", [("p1", "please ask a doctor to help you."), ("p1", "try a lamp."),
                                            ("p2", "you are stupid.")])
    b = outputs_file(tmp_path / "b.jsonl", [("p1", "you are stupid."), ("p1", "try a lamp."), ("p2", "try a lamp.")])
    args = (f"--outputs={a}", "--judge=harmless", f"--baseline={b}", "--num_resamples=200")
    assert evaluate(tmp_path / "plain", *args) == 0
    assert evaluate(tmp_path / "eval", *args, "--judge_scores=on") == 0
    [plain] = jsonl(tmp_path / "plain" / "metrics.jsonl")
    [metrics] = jsonl(tmp_path / "eval" / "metrics.jsonl")
    ours = [judges.get_judge("harmless").score_fn(["p"], [r])[0] for r in ("please ask a doctor to help you.",
                                                                         "try a lamp.", "you are stupid.")]
    per_prompt = [(ours[0] + ours[1]) / 2, ours[2]]
    assert metrics["eval/judge_score_mean"] == pytest.approx(sum(per_prompt) / 2)
    low, high = judges.bootstrap_interval(per_prompt, num_resamples=200, seed=0)
    assert (metrics["eval/judge_score_low"], metrics["eval/judge_score_high"]) == pytest.approx((low, high))
    assert metrics["eval/judge_score_mean_baseline"] == pytest.approx(((-1 + 0) / 2 + 0) / 2)
    assert {k: v for k, v in metrics.items() if "judge_score" not in k} == plain  # the win rate is unchanged
    assert "judge score" in capsys.readouterr().out
    assert evaluate(tmp_path / "bad", f"--outputs={a}", "--judge_scores=on") == 2
    assert not (tmp_path / "bad").exists()
