"""Best-of-N: keeping the best of consecutive candidates, simulating it from a scored pool, and
the `generate --best_of` and `evaluate --best_of` options on a tiny model and reward model."""

import json

import pytest

import launch
import tiny
from lm_human_preferences import best_of_n, lm_tasks, train_reward
from lm_human_preferences.preferences import PreferenceFileError

RUN = ["--run.wandb=off", "--run.device=cpu"]
PROMPTS = ["the cat sat on a mat.", "the dog ran far away."]


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_keep_best_takes_the_argmax_of_each_group():
    candidates = [{"prompt": "p", "response": str(i), "sample": i} for i in range(6)]
    kept = best_of_n.keep_best(candidates, [0.1, 0.5, 0.5, -1.0, 2.0, 0.0], n=3)
    assert [(r["response"], r["sample"], r["score"], r["candidate"], r["best_of"]) for r in kept] == \
        [("1", 0, 0.5, 1, 3), ("4", 1, 2.0, 4, 3)]  # ties: the first
    with pytest.raises(ValueError, match="groups of 4"):
        best_of_n.keep_best(candidates, [0.0] * 6, n=4)


def test_simulate_draws_without_replacement_from_each_pool():
    pool = [{"prompt": p, "response": f"{p}{i}", "score": float(i)} for p in "ab" for i in range(4)]
    kept = best_of_n.simulate(pool, n=4, repeats=3, seed=0)  # N = K: always the pool's best
    assert [(r["prompt"], r["response"], r["sample"], r["candidate"]) for r in kept] == \
        [("a", "a3", s, 3) for s in range(3)] + [("b", "b3", s, 3) for s in range(3)]
    kept = best_of_n.simulate(pool, n=1, repeats=400, seed=1)  # N = 1: a uniform draw
    assert {r["candidate"] for r in kept} == {0, 1, 2, 3}
    assert sum(r["score"] for r in kept) / len(kept) == pytest.approx(1.5, abs=0.2)
    two = best_of_n.simulate(pool, n=2, repeats=2000, seed=2)  # E[max of 2 of 0..3] = (1 + 2*2 + 3*3) / 6
    assert sum(r["score"] for r in two) / len(two) == pytest.approx(14 / 6, abs=0.08)
    assert best_of_n.simulate(pool, n=2, repeats=5, seed=7) == best_of_n.simulate(pool, n=2, repeats=5, seed=7)
    with pytest.raises(ValueError, match="has 4 scored responses"):
        best_of_n.simulate(pool, n=5, repeats=1)


def test_read_scored_rows_names_the_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "r", "score": 1},
                                               {"prompt": "p", "response": "r"}])
    with pytest.raises(PreferenceFileError, match=r"line 2, field 'score': expected a finite number"):
        best_of_n.read_scored_rows(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bon_models")
    enc = tiny.small_encoding()
    model = tiny.make_model(d / "model", encoding=enc)
    rm = train_reward.build_reward_model(lm_tasks.load_pretrained(str(model)), seed=0)
    return {"model": model, "rm": train_reward.save_reward_model(d / "rm", rm, encoding=enc.to_meta())}


def run(command, out, *args):
    return launch.main([command, "offline_sentiment", "x", f"--run.save_dir={out}", *RUN, *args])


def test_generate_best_of_keeps_the_reward_models_best_candidate(models, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    common = [f"--model={models['model']}", f"--prompts={prompts}", "--length=4", "--batch_size=4"]
    assert run("generate", tmp_path / "bon", *common, "--num_samples=2", "--best_of=3",
               f"--reward_model={models['rm']}") == 0
    # the candidates are the rows of 6 samples a prompt; evaluate scores them as best-of-N did
    assert run("generate", tmp_path / "all", *common, "--num_samples=6") == 0
    assert run("evaluate", tmp_path / "scored", f"--outputs={tmp_path / 'all' / 'outputs.jsonl'}",
               f"--reward_model={models['rm']}") == 0
    scored = jsonl(tmp_path / "scored" / "scores.jsonl")
    kept = jsonl(tmp_path / "bon" / "outputs.jsonl")
    assert [(r["prompt"], r["sample"]) for r in kept] == [(p, s) for p in PROMPTS for s in range(2)]
    for i, row in enumerate(kept):
        group = scored[3 * i:3 * i + 3]
        best = best_of_n.argmax([g["score"] for g in group])
        assert row["response"] == group[best]["response"] and row["candidate"] == 3 * (i % 2) + best
        assert row["score"] == pytest.approx(group[best]["score"], abs=1e-6) and row["best_of"] == 3
    [metrics] = jsonl(tmp_path / "bon" / "metrics.jsonl")
    assert metrics["generate/best_of_score"] == pytest.approx(sum(r["score"] for r in kept) / 4)
    # simulated best-of-3 from the scored pool of 6
    assert run("evaluate", tmp_path / "sim", f"--outputs={tmp_path / 'scored' / 'scores.jsonl'}", "--best_of=3",
               "--best_of_repeats=5") == 0
    sim = jsonl(tmp_path / "sim" / "best_of.jsonl")
    assert len(sim) == 10 and all(r["best_of"] == 3 for r in sim)
    best = {p: max(r["score"] for r in scored if r["prompt"] == p) for p in PROMPTS}
    assert all(r["score"] <= best[r["prompt"]] for r in sim)
    assert json.loads((tmp_path / "sim" / "metrics.jsonl").read_text())["eval/best_of_score_mean"] == \
        pytest.approx(sum(r["score"] for r in sim) / 10)


@pytest.mark.parametrize("command, args, message", [
    ("generate", ["--best_of=3"], "pass both --best_of=N (N > 1) and --reward_model=DIR"),
    ("generate", ["--reward_model=RM"], "pass both --best_of=N"),
    ("evaluate", ["--outputs=OUT", "--best_of=2"], "field 'score': expected a finite number"),
    ("evaluate", ["--outputs=OUT", "--best_of=3", "--reward_model=RM"], "has 2 responses; best-of-3 draws 3"),
])
def test_bad_best_of_settings_exit_2(models, tmp_path, capsys, command, args, message):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    outputs = write_jsonl(tmp_path / "o.jsonl", [{"prompt": p, "response": " the cat."} for p in PROMPTS * 2])
    args = [a.replace("RM", str(models["rm"])).replace("OUT", str(outputs)) for a in args]
    if command == "generate":
        args += [f"--model={models['model']}", f"--prompts={prompts}"]
    assert run(command, tmp_path / "r", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
