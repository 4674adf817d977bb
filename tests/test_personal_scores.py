"""`datasets/personal.py scores`: the mean scripted score of one option over output files."""

import json
import subprocess
import sys

from lm_human_preferences import labelers


def test_scores_prints_each_files_mean(tmp_path):
    responses = [" a happy and kind day.", " a terrible sad night."]
    path = tmp_path / "outputs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "x.", "response": r}) + "\n" for r in responses))
    out = subprocess.run([sys.executable, "datasets/personal.py", "scores", "friendly", str(path)],
                         capture_output=True, text=True, check=True).stdout
    want = sum(labelers.PreferenceLabeler("friendly").score(responses)) / 2
    assert out == f"friendly {want:+.3f} {path}\n"
    bad = subprocess.run([sys.executable, "datasets/personal.py", "scores", "friendly", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "error:" in bad.stderr
