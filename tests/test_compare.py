"""compare: output files side by side on ID and OOD prompts (judge score, win rate against
references, ROUGE, diversity), its report files, and ID/OOD splits and corpus prompts."""

import json

import numpy as np
import pytest

import launch
import tiny
from lm_human_preferences import diversity, judges, rouge, splits
from lm_human_preferences.compare import CompareHParams
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.hparams_help import field_docs

RUN = ["--run.wandb=off", "--run.device=cpu", "--num_resamples=50"]
REFS = [{"prompt": "the cat sat.", "reference": " a happy dog.", "split": "id"},
        {"prompt": "a big house.", "reference": " the sad tree.", "split": "id"},
        {"prompt": "the dog ran. the cat sat. the tree was big.", "reference": " it was good.", "split": "ood"}]
RESPONSES = {  # two samples a prompt: a varied policy and a collapsed, happier one
    "varied": [" a good day.", " the bad cat ran.", " it was sad.", " we walked far.", " a red house.", " big."],
    "collapsed": [" a happy good day."] * 4 + [" a happy day.", " a happy good day."],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    refs = write_jsonl(tmp_path / "refs.jsonl", REFS)
    outputs = {}
    for name, responses in RESPONSES.items():
        rows = [{"prompt": REFS[i // 2]["prompt"], "response": r, "sample": i % 2} for i, r in enumerate(responses)]
        outputs[name] = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return {"refs": refs, **outputs}


def compare(out, files, *args):
    spec = f"--outputs=varied={files['varied']},collapsed={files['collapsed']}"
    return launch.main(["compare", "offline_sentiment", "x", f"--run.save_dir={out}", *RUN, spec, *args])


def test_every_setting_has_a_description():
    assert all(field_docs(CompareHParams).values()), field_docs(CompareHParams)


def test_compare_writes_results_report_and_plot(files, tmp_path):
    out = tmp_path / "cmp"
    assert compare(out, files, f"--references={files['refs']}", "--split=field",
                   "--metrics=distinct,ead,ngram_cosine") == 0
    results = json.loads((out / "comparison.json").read_text())
    assert list(results) == ["varied", "collapsed"] and list(results["varied"]) == ["id", "ood"]
    v = results["collapsed"]["id"]
    assert (v["prompts"], v["rows"]) == (2, 4)
    responses = RESPONSES["collapsed"][:4]
    prompts = [REFS[0]["prompt"]] * 2 + [REFS[1]["prompt"]] * 2
    judge = judges.get_judge("sentiment")
    scores = judge.score_fn(prompts, responses)
    assert v["judge_score"] == pytest.approx(np.mean(scores))
    assert v["judge_score_low"] <= v["judge_score"] <= v["judge_score_high"]
    refs = [REFS[0]["reference"]] * 2 + [REFS[1]["reference"]] * 2
    credit = [judges.CREDIT[o] for o in judge.compare_batch(prompts, responses, refs)]
    assert v["win_rate"] == pytest.approx(np.mean(credit))
    assert v["rougeL"] == pytest.approx(np.mean([rouge.rouge_l(r, f) for r, f in zip(responses, refs)]))
    groups = {REFS[0]["prompt"]: responses[:2], REFS[1]["prompt"]: responses[2:]}
    assert v["ead/per_input"] == pytest.approx(diversity.per_input(diversity.ead, groups))
    assert v["distinct/across_input"] == pytest.approx(diversity.across_input(diversity.METRICS["distinct"], groups))
    assert results["collapsed"]["id"]["ead/per_input"] < results["varied"]["id"]["ead/per_input"]
    report = (out / "compare.md").read_text()
    assert "| collapsed | id | 2 | 4 |" in report and "- judge score, collapsed − varied: id " in report
    assert "- judge score, varied, id − ood: " in report
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    [metrics] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["compare/varied/ood/rows"] == 2


def test_compare_embedding_and_nli_metrics_and_one_split(files, tmp_path):
    model = tiny.make_model(tmp_path / "m", encoding=tiny.small_encoding())
    plugin = tmp_path / "nli.py"
    plugin.write_text("def nli(premises, hypotheses):\n    return [float(p != h) for p, h in zip(premises, hypotheses)]\n")
    out = tmp_path / "cmp"
    assert compare(out, files, "--metrics=embedding,nli", f"--embedder={model}", f"--nli={plugin}:nli") == 0
    results = json.loads((out / "comparison.json").read_text())
    assert list(results["varied"]) == ["all"] and "win_rate" not in results["varied"]["all"]
    assert results["varied"]["all"]["nli/per_input"] == 1.0  # every pair differs
    assert results["collapsed"]["all"]["nli/per_input"] == pytest.approx(1 / 3)  # one pair of three prompts differs
    assert 0 <= results["collapsed"]["all"]["embedding/per_input"] < results["varied"]["all"]["embedding/per_input"]


@pytest.mark.parametrize("args, message", [
    (["--outputs=a"], "expected NAME=FILE, got 'a'"),
    (["--outputs=a=x.jsonl,a=y.jsonl"], "output names must differ"),
    (["--outputs=a=missing.jsonl"], "missing.jsonl (output file 'a'): no such file"),
    (["--metrics=ead,bleu"], "unknown diversity metric(s) ['bleu']"),
    (["--metrics=nli"], "the nli metric needs an NLI function"),
    (["--split=field"], "the 'field' split reads the \"split\" field"),
    (["--split=length:x"], "expected length:N, words:W1|W2|... or field"),
    (["--references=SHORT"], "has no reference for the prompt"),
    (["--judge=sentimnt"], "invalid hyperparameter 'judge': unknown judge 'sentimnt'"),
    (["--judge=no_such_module_here:fn"], "error: invalid hyperparameter 'judge': no module named 'no_such_module_here'"),
])
def test_bad_settings_exit_2_without_a_run_directory(files, tmp_path, capsys, args, message):
    short = write_jsonl(tmp_path / "short.jsonl", REFS[:1])
    args = [a.replace("SHORT", str(short)) for a in args]
    assert compare(tmp_path / "r", files, "--metrics=ead", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_split_specs():
    by_length = splits.parse_split("length:3")
    assert by_length("the cat sat.") == "id" and by_length("the cat sat on it.") == "ood"
    by_words = splits.parse_split("words:King|queen")
    assert by_words("the king, sat.") == "ood" and by_words("the kingdom.") == "id"
    assert splits.parse_split("field", fields={"p": "ood"})("p") == "ood"
    assert splits.parse_split("")("anything") == "all"
    with pytest.raises(HParamsError, match="expected length:N"):
        splits.parse_split("topic:x")


def test_read_references_checks_rows(tmp_path):
    refs, fields = splits.read_references(write_jsonl(tmp_path / "r.jsonl", REFS))
    assert refs["a big house."] == " the sad tree." and fields["the dog ran. the cat sat. the tree was big."] == "ood"
    with pytest.raises(HParamsError, match=r"line 1: field 'split': expected one of \('id', 'ood'\)"):
        splits.read_references(write_jsonl(tmp_path / "b.jsonl", [{**REFS[0], "split": "test"}]))
    with pytest.raises(HParamsError, match='line 1: expected an object with string "prompt" and "reference"'):
        splits.read_references(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p"}]))


def test_corpus_prompts_continue_held_out_passages():
    rows = splits.corpus_prompts(5, sentences=3, seed=2)
    assert len(rows) == 5 and len({r["prompt"] for r in rows}) == 5
    for r in rows:
        assert r["prompt"].count(".") == 3 and r["reference"].startswith(" ") and r["reference"].count(".") == 1
    assert splits.corpus_prompts(5, sentences=3, seed=2) == rows
