"""Length-score correlations, the weighted reward gain and the length_report command
(length_analysis.py, length_report.py), on hand-computed cases."""

import json
import math

import pytest

import launch
from lm_human_preferences import length_analysis
from lm_human_preferences.preferences import PreferencePair, write_pairs


def test_pearson_and_kendall_by_hand():
    assert length_analysis.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert length_analysis.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(length_analysis.pearson([1, 1, 1], [1, 2, 3]))
    # 5 concordant pairs, 1 discordant: (5 - 1) / 6
    assert length_analysis.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # a tie in x: 2 concordant of 3 pairs, tau_b = 2 / sqrt((3 - 1) * 3)
    assert length_analysis.kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    with pytest.raises(ValueError, match="same length >= 2"):
        length_analysis.kendall_tau([1], [1])


def row(prompt: str, n_words: int, score: float, judge: str | None = None) -> dict:
    out = {"prompt": prompt, "response": " ".join(["w"] * n_words), "score": score}
    return out if judge is None else {**out, "judge": judge}


def test_correlations_pooled_and_per_prompt():
    # within each prompt the score rises with length; across prompts it falls
    rows = [row("a", 1, 10.0), row("a", 2, 11.0), row("a", 3, 12.0),
            row("b", 6, 0.0), row("b", 7, 1.0), row("b", 8, 3.0), row("c", 4, 5.0)]
    stats = length_analysis.correlations(rows)
    assert stats["pearson_per_prompt"] == pytest.approx((1.0 + length_analysis.pearson([6, 7, 8], [0, 1, 3])) / 2)
    assert stats["kendall_per_prompt"] == pytest.approx(1.0)
    assert stats["prompts_correlated"] == 2  # "c" has one row
    assert stats["pearson"] < 0
    lengths = [1, 2, 3, 6, 7, 8, 4]
    assert stats["kendall"] == pytest.approx(length_analysis.kendall_tau(lengths, [r["score"] for r in rows]))


def test_weighted_reward_gain_by_hand():
    before = [row("p", 1, 0.0), row("p", 2, 1.0), row("p", 3, 2.0)]
    after = [row("p", 2, 2.0), row("p", 4, 5.0), row("p", 4, 5.0), row("p", 9, 100.0)]
    out = length_analysis.weighted_reward_gain(before, after, width=2)
    # bins (0, 2]: before [0, 1], after [2] -> gain 1.5, 3 rows; (2, 4]: before [2], after [5, 5] -> 3, 3 rows;
    # (8, 10] has no row before: left out
    assert out["wrg"] == pytest.approx(2.25)
    assert out["gain"] == pytest.approx((2 + 5 + 5 + 100) / 4 - 1)
    assert out["rows_in_shared_bins"] == pytest.approx(6 / 7)
    assert math.isnan(length_analysis.weighted_reward_gain(before, [row("p", 20, 1.0)], width=2)["wrg"])


def test_summarize():
    rows = [row("p", 2, 1.0, "win"), row("p", 4, 3.0, "tie"), row("q", 6, 2.0, "loss")]
    assert length_analysis.summarize(rows) == {"rows": 3.0, "length_mean": 4.0, "length_std": pytest.approx(
        math.sqrt(8 / 3)), "score_mean": 2.0, "win_rate": 0.5}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_length_report_command(tmp_path, capsys):
    before = [row(f"p{i}", 2 + i % 3, float(i % 3), "tie") for i in range(6)]
    after = [row(f"p{i}", 4 + i % 3, 2.0 + i % 3, "win") for i in range(6)]
    write_rows(tmp_path / "before.jsonl", before)
    write_rows(tmp_path / "after.jsonl", after)
    write_pairs(tmp_path / "pairs.jsonl", [PreferencePair("q", "a b c", "a"), PreferencePair("q", "a", "a b")])
    write_rows(tmp_path / "metrics.jsonl", [{"step": 0, "eval/accuracy": 0.5}, {"step": 9, "eval/accuracy": 0.75}])
    out = tmp_path / "report"
    assert launch.main(["length_report", str(out), f"--before={tmp_path / 'before.jsonl'}",
                        f"--after=ppo={tmp_path / 'after.jsonl'}", f"--pairs={tmp_path / 'pairs.jsonl'}",
                        f"--rm_metrics={tmp_path / 'metrics.jsonl'}"]) == 0
    report = json.loads((out / "length_report.json").read_text())
    assert report["runs"]["before"]["length_mean"] == 3.0 and report["runs"]["ppo"]["length_mean"] == 5.0
    assert report["runs"]["ppo"]["gain"] == pytest.approx(2.0)
    # bins of 2: (2, 4] holds before lengths 3, 4 (scores 1, 2) and after length 4 (score 2) -> 0.5, 6 rows
    assert report["runs"]["ppo"]["wrg"] == pytest.approx(0.5)
    assert report["runs"]["ppo"]["win_rate"] == 1.0 and report["runs"]["before"]["pearson"] == pytest.approx(1.0)
    assert (report["longer_wins"], report["rm_accuracy"]) == (0.5, 0.75)
    assert (out / "lengths.png").is_file()
    text = (out / "report.md").read_text()
    assert "| ppo | 5.000 | 3.000 | 2.000 | 0.500 |" in text and "reward model held-out accuracy: 0.750" in text
    assert text in capsys.readouterr().out


def test_length_report_needs_scores(tmp_path, capsys):
    write_rows(tmp_path / "outputs.jsonl", [{"prompt": "p", "response": "r"}])
    assert launch.main(["length_report", str(tmp_path / "out"), f"--before={tmp_path / 'outputs.jsonl'}"]) == 2
    assert "line 1, field 'score': expected a finite number (evaluate with --reward_model)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
