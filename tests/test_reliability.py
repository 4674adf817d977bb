"""Reliability: runs killed mid-training resume exactly; checkpoints are written atomically and
bad ones are detected; hostile label files, configs and checkpoints give one clear error (never
a traceback, never a half-written run directory); non-finite losses and gradients stop the run
(exit 3) or skip the batch; ranks stay identical and a failing rank never leaves the other
hanging; a run is a pure function of its seed and config on CPU.

Tiny models with `tiny.small_encoding()`, CPU, one thread per process.
"""

import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny
import torch
from dist_utils import free_port, run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import launch
from lm_human_preferences import lm_tasks, train_policy, train_reward, train_sft
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.label_types import BestOfN, ScalarRating
from lm_human_preferences.labels import LabelFileError, labels_to_tensors, read_labels
from lm_human_preferences.language.checkpoints import CheckpointError, load_weights

ROOT = Path(__file__).resolve().parents[1]
LQ, LR = 8, 6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
TIMING = ("elapsed/", "time/")




@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model with the corpus' 64-token vocabulary, the corpus, 520 labels and a reward model."""
    d = tmp_path_factory.mktemp("reliability")
    enc = tiny.small_encoding()
    model = tiny.make_model(d / "model", encoding=enc)
    labels = tiny.make_best_of_4_labels(d / "labels.json", n=520, query_length=LQ, response_length=LR, encoding=enc)
    initial = lm_tasks.load_pretrained(str(model))
    rm = train_reward.save_reward_model(d / "rm", train_reward.build_reward_model(initial, seed=1),
                                        encoding=enc.to_meta())
    return SimpleNamespace(dir=d, model=model, corpus=tiny.make_corpus(d / "corpus.txt"), labels=labels, rm=rm)


def reward_config(files, save_dir, **extra) -> dict:
    """8 steps of 8 labels; normalization on 16 samples; 40 held-out labels."""
    return {**tiny.task_overrides(files.model, files.corpus, query_length=LQ, response_length=LR),
            "labels.source": str(files.labels), "labels.num_train": 64, "batch_size": 8, "lr": 1e-3,
            "rollout_batch_size": 16, "normalize_samples": 16, "eval_batch_size": 40,
            "run.save_dir": str(save_dir), "run.wandb": "off", "run.device": "cpu", "run.seed": 0, **extra}


def policy_config(files, save_dir, **extra) -> dict:
    """4 updates of 8 episodes, 2 minibatches, adaptive KL, against the tiny reward model."""
    return {**tiny.task_overrides(files.model, files.corpus, query_length=LQ, response_length=LR),
            "rewards.trained_model": str(files.rm), "rewards.kl_coef": 0.2, "rewards.adaptive_kl": "on",
            "rewards.adaptive_kl.target": 0.01, "rewards.adaptive_kl.horizon": 16, "ppo.batch_size": 8,
            "ppo.total_episodes": 32, "ppo.nminibatches": 2, "ppo.noptepochs": 1, "ppo.lr": 1e-3,
            "run.save_dir": str(save_dir), "run.wandb": "off", "run.device": "cpu", "run.seed": 0, **extra}


def sft_config(files, save_dir, **extra) -> dict:
    return {"data": str(files.corpus), "initial_model": str(files.model), "seq_length": 16, "batch_size": 4,
            "steps": 4, "warmup_steps": 1, "eval_interval": 100, "eval_batches": 1,
            "run.save_dir": str(save_dir), "run.wandb": "off", "run.device": "cpu", **extra}


def hparams(cls, config: dict):
    hp = cls()
    hp.override_from_dict(config)
    return hp


def train_rm(files, save_dir, **extra) -> Path:
    return train_reward.train(hparams(train_reward.TrainRewardHParams, reward_config(files, save_dir, **extra)),
                              exp_name="rm")


def train_ppo(files, save_dir, **extra) -> Path:
    return train_policy.train(hparams(train_policy.TrainPolicyHParams, policy_config(files, save_dir, **extra)),
                              exp_name="ppo")


def cli_args(config: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in config.items()]


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def untimed(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows(run_dir, name)]


def assert_same_model(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"tensors differ: {different[:5]}"


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise-equal final models, equal metrics (timing aside) and samples."""
    assert_same_model(a, b)
    assert untimed(a) == untimed(b)
    assert rows(a, "samples.jsonl") == rows(b, "samples.jsonl")


def temporary_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if ".tmp" in p.name]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


class Crash(Exception):
    pass


def reward_steps(monkeypatch, *, crash_at: int | None = None) -> list[tuple[int, list[str]]]:
    """Make `RewardTrainer.train_step` record (step, the checkpoints on disk) before each step
    and raise Crash at step index `crash_at`."""
    seen: list[tuple[int, list[str]]] = []
    train_step = train_reward.RewardTrainer.train_step

    def spy(self, indices, lr):
        if self.step == crash_at:
            raise Crash(f"simulated crash at step {crash_at}")
        ckpt = self.run.checkpoint_dir
        seen.append((self.step, sorted(p.name for p in ckpt.glob("step_*.pt")) if ckpt.is_dir() else []))
        return train_step(self, indices, lr)

    monkeypatch.setattr(train_reward.RewardTrainer, "train_step", spy)
    return seen


# ---------------------------------------------------------------------------------------------
# 1. SIGKILL at a random point, rerun: the same result as an uninterrupted run
# ---------------------------------------------------------------------------------------------


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "launch.py", *args], cwd=ROOT, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT)


@pytest.mark.parametrize("trainer", ["train_reward", "train_policy"])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(files, tmp_path, trainer):
    long = ({"labels.num_train": 480} if trainer == "train_reward"  # 60 steps
            else {"ppo.total_episodes": 320})  # 40 updates
    config = (reward_config if trainer == "train_reward" else policy_config)(files, "", **long, **{
        "run.save_interval": 1})

    def args(save_dir: Path) -> list[str]:
        return [trainer, "offline_sentiment", "x", *cli_args({**config, "run.save_dir": save_dir})]

    reference = start(args(tmp_path / "reference"), tmp_path / "reference.log")  # alongside, on the other core
    killed = tmp_path / "killed"
    victim = start(args(killed), tmp_path / "killed.log")
    # Kill somewhere after the checkpoint of a random step in the first half, at a random moment.
    target, delay = random.randint(1, 20), random.uniform(0.0, 0.03)
    where = f"after checkpoint {target} + {delay:.3f} s"
    try:
        deadline = time.monotonic() + 120
        while not any(int(p.name[5:11]) >= target for p in (killed / "checkpoints").glob("step_*.pt")):
            assert victim.poll() is None, (where, (tmp_path / "killed.log").read_text()[-2000:])
            assert time.monotonic() < deadline, f"no checkpoint {target} within 120 s"
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(victim.pid, signal.SIGKILL)
        print(f"killed {where}")  # shown if the test fails
        assert victim.wait(timeout=30) == -signal.SIGKILL, f"the run ended before the kill ({where})"
    finally:
        victim.kill()
    assert not (killed / "model.safetensors").exists()
    left = checkpoint_names(killed)

    rerun = subprocess.run([sys.executable, "launch.py", *args(killed)], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    good = [n for n in left if n.endswith(".pt") and n + ".sha256" in left]
    if good:
        assert "resuming from" in rerun.stdout, (left, rerun.stdout[-2000:])
    assert reference.wait(timeout=120) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    assert_same_run(killed, tmp_path / "reference")
    steps = [row["step"] for row in rows(killed)]
    assert steps == sorted(steps), f"a step was logged again after resuming (killed {where}): {steps}"
    for run in (killed, tmp_path / "reference"):
        assert not (run / "checkpoints").exists()
        assert temporary_files(run) == []


# ---------------------------------------------------------------------------------------------
# 2. Checkpoints: atomic, verified, pruned; resume = auto | never | PATH
# ---------------------------------------------------------------------------------------------

EVERY_STEP = {"run.save_interval": 1, "run.keep_checkpoints": 3}


@pytest.fixture(scope="module")
def straight_rm(files, tmp_path_factory):
    """An uninterrupted reward run saving a checkpoint after every step (8 steps)."""
    return train_rm(files, tmp_path_factory.mktemp("straight") / "rm", **EVERY_STEP)


@pytest.fixture
def crashed_rm(files, tmp_path, monkeypatch):
    """The same run crashed at step index 6: checkpoints after steps 4, 5 and 6 are kept (K=3)."""
    reward_steps(monkeypatch, crash_at=6)
    with pytest.raises(Crash):
        train_rm(files, tmp_path / "crashed", **EVERY_STEP)
    monkeypatch.undo()
    return tmp_path / "crashed"


def test_keep_checkpoints_keeps_the_last_k_and_writes_leave_no_temporary_files(straight_rm, crashed_rm):
    assert checkpoint_names(crashed_rm) == [f"step_00000{s}.pt{ext}" for s in (4, 5, 6) for ext in ("", ".sha256")]
    for s in (4, 5, 6):
        path = crashed_rm / "checkpoints" / f"step_00000{s}.pt"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == Path(f"{path}.sha256").read_text()
    assert temporary_files(crashed_rm) == []
    assert not (straight_rm / "checkpoints").exists() and temporary_files(straight_rm) == []


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def wrong_hash(path: Path):
    Path(f"{path}.sha256").write_text("0" * 64)


def no_sidecar(path: Path):
    Path(f"{path}.sha256").unlink()


def junk_with_matching_hash(path: Path):
    data = os.urandom(1000)
    path.write_bytes(data)
    Path(f"{path}.sha256").write_text(hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("corrupt", [truncate, wrong_hash, no_sidecar, junk_with_matching_hash])
def test_bad_newest_checkpoint_is_reported_and_the_previous_one_used(files, straight_rm, crashed_rm, monkeypatch,
                                                                      capsys, corrupt):
    newest = crashed_rm / "checkpoints" / "step_000006.pt"
    corrupt(newest)
    capsys.readouterr()
    seen = reward_steps(monkeypatch)
    train_rm(files, crashed_rm, **EVERY_STEP)
    warning = capsys.readouterr().err
    assert f"skipping bad checkpoint {newest}:" in warning, warning
    assert [step for step, _ in seen] == [5, 6, 7]  # resumed after step 5
    assert "step_000006.pt" not in seen[0][1]  # the bad one was dropped
    assert_same_run(crashed_rm, straight_rm)


def test_resume_never_starts_over_and_drops_old_checkpoints(files, straight_rm, crashed_rm, monkeypatch):
    seen = reward_steps(monkeypatch)
    train_rm(files, crashed_rm, **EVERY_STEP, **{"run.resume": "never"})
    assert [step for step, _ in seen] == list(range(8))
    assert seen[0][1] == []
    assert_same_run(crashed_rm, straight_rm)


def test_resume_from_a_path_continues_there_and_drops_later_checkpoints(files, straight_rm, crashed_rm, monkeypatch):
    seen = reward_steps(monkeypatch)
    train_rm(files, crashed_rm, **EVERY_STEP, **{"run.resume": str(crashed_rm / "checkpoints" / "step_000004.pt")})
    assert [step for step, _ in seen] == [4, 5, 6, 7]
    assert seen[0][1] == ["step_000004.pt"]
    assert_same_run(crashed_rm, straight_rm)


def test_resuming_with_other_settings_is_an_error_but_other_run_options_are_not(files, straight_rm, crashed_rm,
                                                                                  monkeypatch):
    before = checkpoint_names(crashed_rm)
    with pytest.raises(HParamsError, match=r"step_000006.pt: its run was started with other settings \(lr: 0.001 -> "
                                           r"0.002; run.seed: 0 -> 1\); rerun with those to resume it, or pass "
                                           r"--run.resume=never to start over"):
        train_rm(files, crashed_rm, **EVERY_STEP, **{"lr": 2e-3, "run.seed": 1})
    assert checkpoint_names(crashed_rm) == before  # nothing touched
    seen = reward_steps(monkeypatch)  # how a run executes may change: logging, checkpoints, device, ...
    train_rm(files, crashed_rm, **{**EVERY_STEP, "run.log_interval": 3, "run.keep_checkpoints": 2})
    assert [step for step, _ in seen] == [6, 7]  # resumed from the newest checkpoint
    assert_same_model(crashed_rm, straight_rm)


def test_rerunning_a_finished_run_does_nothing_unless_its_settings_changed(files, straight_rm, monkeypatch, capsys):
    model = straight_rm / "model.safetensors"
    written = model.stat().st_mtime_ns
    seen = reward_steps(monkeypatch)
    capsys.readouterr()
    assert train_rm(files, straight_rm, **EVERY_STEP) == straight_rm
    assert seen == [] and model.stat().st_mtime_ns == written
    assert "holds this run, finished; nothing to do" in capsys.readouterr().out
    with pytest.raises(HParamsError, match=r"holds a finished run with other settings \(batch_size: 8 -> 16\); "
                                           r"pass --run.resume=never to train it again"):
        train_rm(files, straight_rm, **EVERY_STEP, batch_size=16)
    assert seen == [] and model.stat().st_mtime_ns == written


KILL_DURING_RENAME = """
import os, sys
sys.path.insert(0, os.getcwd())
replace = os.replace
def dying_replace(src, dst):
    if os.path.basename(dst) == "step_000003.pt":
        os._exit(137)  # killed between writing the temporary file and renaming it
    return replace(src, dst)
os.replace = dying_replace
import launch
sys.exit(launch.main(sys.argv[1:]))
"""


def test_a_crash_mid_write_leaves_no_partial_checkpoint(files, straight_rm, tmp_path, capsys):
    run = tmp_path / "rm"
    args = ["train_reward", "offline_sentiment", "x", *cli_args(reward_config(files, run, **EVERY_STEP))]
    died = subprocess.run([sys.executable, "-c", KILL_DURING_RENAME, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert died.returncode == 137, died.stderr[-3000:]
    names = checkpoint_names(run)
    assert [n for n in names if not n.startswith(".")] == ["step_000001.pt", "step_000001.pt.sha256",
                                                          "step_000002.pt", "step_000002.pt.sha256"]
    assert [n for n in names if n.startswith(".step_000003.pt.tmp-")]  # the interrupted write, under a temporary name
    assert launch.main(args) == 0
    assert f"resuming from {run / 'checkpoints' / 'step_000002.pt'}" in capsys.readouterr().out
    assert temporary_files(run) == [] and not (run / "checkpoints").exists()
    assert_same_run(run, straight_rm)


# ---------------------------------------------------------------------------------------------
# 3. Hostile inputs: label files
# ---------------------------------------------------------------------------------------------

SIZES = dict(query_length=3, response_length=2, vocab_size=10, pad_token=12)
BEST_OF_2 = BestOfN(2)


def valid_rows(n: int) -> list[dict]:
    return [{"query": [i % 10, 1, 12], "sample0": [2, 12], "sample1": [3, 4], "best": i % 2} for i in range(n)]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)
field_names = st.sampled_from(["query", "sample0", "sample1", "best"]) | st.text(max_size=6)


@st.composite
def label_file_bytes(draw) -> bytes:
    """A label file damaged one way or another (or, by chance, still valid)."""
    rows = valid_rows(draw(st.integers(1, 3)))
    kind = draw(st.sampled_from(["field", "token", "delete", "row", "document", "cut", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "document":
        return json.dumps(draw(json_values)).encode()
    row = rows[draw(st.integers(0, len(rows) - 1))]
    if kind == "field":
        row[draw(field_names)] = draw(json_values)
    elif kind == "token":
        tokens = row[draw(st.sampled_from(["query", "sample0", "sample1"]))]
        tokens[draw(st.integers(0, len(tokens) - 1))] = draw(json_values)
    elif kind == "delete":
        row.pop(draw(field_names), None)
    elif kind == "row":
        rows[rows.index(row)] = draw(json_values)
    text = json.dumps(rows)
    if kind == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    return text.encode()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@settings(max_examples=300, deadline=None)
@given(data=label_file_bytes())
def test_hostile_label_files_raise_only_label_file_errors(scratch, data):
    path = scratch / "labels.json"
    path.write_bytes(data)
    try:
        rows_ = read_labels(path, label_type=BEST_OF_2, **SIZES)
    except LabelFileError as e:
        assert str(e).startswith(f"{path}: "), e
    else:  # still valid: it must become tensors
        tensors = labels_to_tensors(rows_, label_type=BEST_OF_2)
        assert tensors["query"].shape == (len(rows_), 3)


def _edit(field, value):
    def make():
        rows_ = valid_rows(3)
        rows_[1][field] = value
        return json.dumps(rows_)
    return make


HOSTILE_LABELS = {
    "empty file": (lambda: "", r"invalid JSON at line 1"),
    "truncated": (lambda: json.dumps(valid_rows(3))[:-7], r"invalid JSON .*truncated or corrupt"),
    "a 5000-digit integer": (lambda: '[{"query": [1' + "0" * 5000 + ", 1, 1]}]", r"unreadable JSON"),
    "nesting 100000 deep": (lambda: "[" * 100000 + "]" * 100000, r"unreadable JSON|invalid JSON"),
    "NaN token": (lambda: json.dumps(valid_rows(3)).replace("[2, 12]", "[NaN, 12]", 1),
                  r"row 0, field 'sample0': token 0: expected an integer token id, got the JSON literal NaN"),
    "Infinity best": (lambda: json.dumps(valid_rows(3)).replace('"best": 1', '"best": Infinity', 1),
                      r"row 1, field 'best': expected an integer in \[0, 2\), got the JSON literal Infinity"),
    "negative token": (_edit("sample1", [-1, 4]), r"row 1, field 'sample1': token 0: expected an id in \[0, 10\)"),
    "token past the vocabulary": (_edit("query", [1, 2, 11]), r"row 1, field 'query': token 2: .*got 11"),
    "huge token id": (_edit("query", [1, 2, 10**30]), r"row 1, field 'query': token 2: .*got 10{30}$"),
    "float token": (_edit("query", [1, 2.0, 3]), r"token 1: expected an integer token id, got float 2.0"),
    "boolean best": (_edit("best", True), r"row 1, field 'best': expected an integer in \[0, 2\), got boolean true"),
    "string best": (_edit("best", "1"), r"row 1, field 'best': expected an integer .*got str '1'"),
    "wrong length": (_edit("sample0", [1]), r"row 1, field 'sample0': expected 2 token ids, got 1"),
    "nested junk": (_edit("sample0", [[[[[]]]], {"a": [None]}]),
                    r"row 1, field 'sample0': token 0: expected an integer"),
    "missing field": (lambda: json.dumps([{k: v for k, v in r.items() if k != "best"} for r in valid_rows(2)]),
                      r"row 0, field 'best': missing"),
    "extra field": (_edit("sample2", [1, 2]), r"row 1, field 'sample2': unexpected field"),
    "an object, not a list": (lambda: json.dumps({"rows": valid_rows(2)}), r"expected a JSON list"),
    "not UTF-8": (lambda: b"[\xff]", r"expected UTF-8 JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE_LABELS))
def test_hostile_label_file_cases(tmp_path, case):
    make, message = HOSTILE_LABELS[case]
    path = tmp_path / "labels.json"
    data = make()
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    with pytest.raises(LabelFileError, match=message) as error:
        read_labels(path, label_type=BEST_OF_2, **SIZES)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize("score", ["1e400", "1e39", str(10**400), "NaN", "-Infinity"])
def test_float_labels_must_fit_float32(tmp_path, score):
    path = tmp_path / "ratings.json"
    path.write_text('[{"query": [1, 2, 3], "sample": [1, 2], "score": %s}]' % score)
    with pytest.raises(LabelFileError, match=r"row 0, field 'score': expected a finite number"):
        read_labels(path, label_type=ScalarRating(), **SIZES)


# ---------------------------------------------------------------------------------------------
# 3. Hostile inputs: configs
# ---------------------------------------------------------------------------------------------


def all_keys() -> list[str]:
    hp = train_policy.TrainPolicyHParams()
    hp.override_from_args(["--rewards.adaptive_kl=on", "--rewards.train_new_model=on"])
    leaves = list(hp.flat_items())
    return sorted(set(leaves) | {k.rsplit(".", i)[0] for k in leaves for i in range(1, k.count(".") + 1)})


KEYS = all_keys()
VALUES = ["on", "off", "true", "None", "none", "", "nan", "inf", "-inf", "1e400", "-1", "0", "1e6", "9" * 5000, "1.5",
          "0x10", "best_of_4", "best_of_0", "auto", "cpu", "cuda", "cuda:7", "tpu", "bf16", ",", "a,b", "1,2"]
keys = st.sampled_from(KEYS) | st.text(max_size=10) | st.builds(str.__add__, st.sampled_from(KEYS), st.text(max_size=3))
values = st.sampled_from(VALUES) | st.text(max_size=8) | st.integers().map(str) | st.floats().map(str)
arguments = st.lists(st.builds(lambda k, v: [f"--{k}={v}"], keys, values)
                     | st.builds(lambda k, v: [f"--{k}", v], keys, values)
                     | st.lists(st.text(max_size=6), max_size=2), max_size=5).map(lambda parts: sum(parts, []))


@settings(max_examples=400, deadline=None)
@given(args=arguments)
def test_random_overrides_raise_only_hparams_errors(args):
    hp = train_policy.TrainPolicyHParams()
    try:
        hp.override_from_args(args)
        hp.validate()
    except HParamsError as e:
        assert str(e)
    else:
        json.dumps(hp.to_dict())


CONTRADICTIONS = {
    "batch not divisible by minibatches": ({"ppo.batch_size": 8, "ppo.nminibatches": 3}, "ppo.nminibatches"),
    "micro batch of 0": ({"ppo.micro_batch_size": 0}, "ppo.micro_batch_size"),
    "truncate_after past the response": ({"task.response_length": 6, "task.truncate_after": 7}, "task.truncate_after"),
    "fewer episodes than a batch": ({"ppo.total_episodes": 4, "ppo.batch_size": 8}, "ppo.total_episodes"),
    "num_train not a multiple of the batch": ({"rewards.train_new_model": "on",
                                               "rewards.train_new_model.labels.num_train": 60,
                                               "rewards.train_new_model.batch_size": 8},
                                              "rewards.train_new_model.batch_size"),
    "no timeout": ({"run.timeout_s": 0}, "run.timeout_s"),
    "a device that is not there": ({"run.device": "tpu"}, "run.device"),
}


@pytest.mark.parametrize("case", list(CONTRADICTIONS))
def test_contradictory_settings_are_named(case):
    overrides, key = CONTRADICTIONS[case]
    with pytest.raises(HParamsError, match=f"invalid hyperparameter '{key}'"):
        hparams(train_policy.TrainPolicyHParams, overrides).validate()


# ---------------------------------------------------------------------------------------------
# 3. Hostile inputs: checkpoints
# ---------------------------------------------------------------------------------------------

MARKER_NAME = "payload_ran"


class Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def corrupt_model(kind: str, src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    tensors = load_file(str(weights))
    if kind == "random bytes":
        weights.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif kind == "missing tensor":
        del tensors["h.1.mlp.c_fc.weight"]
        save_file(tensors, str(weights))
    elif kind == "wrong shape":
        tensors["h.0.attn.c_attn.weight"] = tensors["h.0.attn.c_attn.weight"][:-1]
        save_file(tensors, str(weights))
    elif kind == "config not JSON":
        (dst / "config.json").write_text("{")
    elif kind == "config a list":
        (dst / "config.json").write_text("[]")
    elif kind == "negative sizes":
        config = json.loads((dst / "config.json").read_text())
        config["gpt"]["n_embd"] = -16
        (dst / "config.json").write_text(json.dumps(config))
    elif kind == "pickle payload":
        weights.unlink()
        (dst / "config.json").unlink()
        torch.save({"wte.weight": Payload(dst / MARKER_NAME)}, dst / "pytorch_model.bin")
    elif kind == "raw pickle payload":
        weights.unlink()
        (dst / "config.json").unlink()
        (dst / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(dst / MARKER_NAME), protocol=2))
    return dst


MODEL_DAMAGE = ["random bytes", "truncated", "missing tensor", "wrong shape", "config not JSON", "config a list",
                "negative sizes", "pickle payload", "raw pickle payload"]


@pytest.mark.parametrize("kind", MODEL_DAMAGE)
def test_damaged_models_are_checkpoint_errors(files, tmp_path, kind):
    model = corrupt_model(kind, files.model, tmp_path / "model")
    with pytest.raises(CheckpointError) as error:
        lm_tasks.load_pretrained(str(model))
    assert str(model) in str(error.value) and "\n\n" not in str(error.value)
    assert not (model / MARKER_NAME).exists()


def test_damaged_reward_heads_are_checkpoint_errors(files, tmp_path):
    rm = shutil.copytree(files.rm, tmp_path / "rm")
    tensors = load_file(str(rm / "model.safetensors"))
    tensors["heads.reward.weight"] = torch.zeros(3)
    save_file(tensors, str(rm / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"reward heads do not fit the model \(reward.weight: \[3\]"):
        train_policy.load_reward_model(rm, encoding=tiny.small_encoding())
    with pytest.raises(CheckpointError, match="not a reward model"):
        train_policy.load_reward_model(files.model, encoding=tiny.small_encoding())


def with_sidecar(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    Path(f"{path}.sha256").write_text(hashlib.sha256(data).hexdigest())
    return path


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good_checkpoint(files, tmp_path_factory):
    """A reward-training checkpoint (and its step) from a run crashed after 2 steps."""
    run = tmp_path_factory.mktemp("good_ckpt") / "rm"
    train_step = train_reward.RewardTrainer.train_step

    def crash(self, indices, lr):
        if self.step == 2:
            raise Crash
        return train_step(self, indices, lr)

    train_reward.RewardTrainer.train_step = crash
    try:
        with pytest.raises(Crash):
            train_rm(files, run, **{"run.save_interval": 1})
    finally:
        train_reward.RewardTrainer.train_step = train_step
    return torch.load(run / "checkpoints" / "step_000002.pt", weights_only=True)


def resume_checkpoints(state: dict, marker: Path) -> dict:
    model = dict(state["model"])
    model["gpt.wte.weight"] = model["gpt.wte.weight"][:, :8]
    return {
        "random bytes": os.urandom(2048),
        "pickle payload": saved({"step": 2, "model": Payload(marker)}),
        "raw pickle payload": pickle.dumps(Payload(marker), protocol=2),
        "a list": saved([1, 2, 3]),
        "missing entries": saved({"step": 2}),
        "wrong shapes": saved({**state, "model": model}),
        "missing tensors": saved({**state, "model": {k: v for k, v in state["model"].items() if "h.1." not in k}}),
    }


RESUME_DAMAGE = ["random bytes", "pickle payload", "raw pickle payload", "a list", "missing entries", "wrong shapes",
                 "missing tensors"]


@pytest.mark.parametrize("kind", RESUME_DAMAGE)
def test_damaged_resume_checkpoints_are_checkpoint_errors(files, tmp_path, good_checkpoint, kind):
    marker = tmp_path / MARKER_NAME
    path = with_sidecar(tmp_path / "elsewhere" / "step_000002.pt", resume_checkpoints(good_checkpoint, marker)[kind])
    with pytest.raises(CheckpointError) as error:
        train_rm(files, tmp_path / "rm", **{"run.resume": str(path)})
    assert str(path) in str(error.value) and "\n\n" not in str(error.value), error.value
    assert not marker.exists()
    assert not (tmp_path / "rm").exists()


# ---------------------------------------------------------------------------------------------
# 3. The command line: one paragraph, exit 2, no traceback, no run directory
# ---------------------------------------------------------------------------------------------


def cli_cases(files, tmp: Path) -> dict:
    """name -> (trainer, config overrides, regex the message must match)."""
    bad_labels = tmp / "bad_labels.json"
    bad_labels.write_text(json.dumps(valid_rows(2)))
    truncated = with_sidecar(tmp / "ckpt" / "step_000001.pt", b"PK\x03\x04 not a whole zip")
    truncated.write_bytes(truncated.read_bytes()[:10])
    corrupt = corrupt_model("random bytes", files.model, tmp / "corrupt_model")
    payload = corrupt_model("pickle payload", files.model, tmp / "payload_model")
    return {
        "label file of another task": ("train_reward", {"labels.source": bad_labels},
                                       rf"{bad_labels}: row 0, field 'query': expected 8 token ids, got 3"),
        "missing label file": ("train_reward", {"labels.source": tmp / "nope.json"}, r"nope\.json does not exist"),
        "unknown key": ("train_policy", {"ppo.nminibatch": 2}, r"unknown hyperparameter 'ppo.nminibatch'"),
        "wrong type": ("train_policy", {"ppo.batch_size": "eight"}, r"'ppo.batch_size' expects int, got 'eight'"),
        "minibatches": ("train_policy", {"ppo.nminibatches": 3}, r"'ppo.nminibatches'.*not divisible"),
        "num_train": ("train_reward", {"labels.num_train": 60}, r"'batch_size'.*num_train=60"),
        "truncate_after": ("train_policy", {"task.truncate_after": 9}, r"'task.truncate_after'"),
        "two reward models": ("train_policy", {"rewards.train_new_model": "on"}, r"exactly one of"),
        "new reward model without labels": (
            "train_policy", {"rewards.trained_model": "None", "rewards.train_new_model": "on"},
            r"'rewards.train_new_model.labels.source': no label file; pass "
            r"--rewards.train_new_model.labels.source=PATH_OR_URL"),
        "longer than the context": ("train_policy", {"task.query_length": 60}, r"'task.response_length'.*context"),
        "unknown query dataset": ("train_policy", {"task.query_dataset": "nope"}, r"'task.query_dataset'.*unknown"),
        "policy as reward model": ("train_policy", {"rewards.trained_model": files.model}, r"not a reward model"),
        "negative learning rate": ("train_policy", {"ppo.lr": -1}, r"'ppo.lr': must be a finite number > 0"),
        "nan learning rate": ("train_reward", {"lr": "nan"}, r"'lr': must be a finite number > 0 \(got nan\)"),
        "gamma above 1": ("train_policy", {"ppo.gamma": 2}, r"'ppo.gamma': must be a finite number >= 0 and <= 1"),
        "negative kl_coef": ("train_policy", {"rewards.kl_coef": -1}, r"'rewards.kl_coef': must be .* >= 0"),
        "reward model as policy": ("train_policy", {"task.policy.initial_model": files.rm},
                                   r"rm: is a reward model; start from a language model or a policy"),
        "corrupt initial model": ("train_reward", {"task.policy.initial_model": corrupt},
                                  r"model.safetensors: not a readable weights file"),
        "pickle payload model": ("train_reward", {"task.policy.initial_model": payload},
                                 r"pytorch_model.bin: not a readable weights file .*never unpickled"),
        "resume from a truncated checkpoint": ("train_reward", {"run.resume": truncated},
                                               rf"--run.resume: {truncated}: contents do not match"),
        "resume from nothing": ("train_policy", {"run.resume": tmp / "no.pt"},
                                r"'run.resume': expected auto, never or a checkpoint file; there is no file '.*no\.pt'"),
        "truncate token outside the vocabulary": ("train_policy", {"task.truncate_token": 99999},
                                                  r"'task.truncate_token': 99999 is not a token of .*vocabulary"),
    }


def test_cli_user_errors_are_one_paragraph_with_exit_2(files, tmp_path, capsys):
    for name, (trainer, overrides, message) in cli_cases(files, tmp_path).items():
        run = tmp_path / f"run_{name.replace(' ', '_')}"
        config = (reward_config if trainer == "train_reward" else policy_config)(files, run, **overrides)
        assert launch.main([trainer, "offline_sentiment", "x", *cli_args(config)]) == 2, name
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and "\n\n" not in err.strip() and "Traceback" not in out + err, (name, err)
        assert re.search(message, err), (name, message, err)
        assert not run.exists(), name
    assert not (tmp_path / "payload_model" / MARKER_NAME).exists()


def test_cli_subprocess_exit_2_without_traceback_and_debug_shows_it(files, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    args = ["train_reward", "offline_sentiment", "x", *cli_args(reward_config(files, tmp_path / "rm", **{
        "labels.source": bad}))]
    plain, debug = (subprocess.Popen([sys.executable, "launch.py", *args, *extra], cwd=ROOT, env=ENV, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for extra in ([], ["--debug"]))
    out, err = plain.communicate(timeout=120)
    assert plain.returncode == 2
    assert "Traceback" not in out + err
    assert err.startswith(f"error: {bad}: invalid JSON at line 1") and err.count("\n") == 1, err
    out, err = debug.communicate(timeout=120)
    assert debug.returncode == 1 and "Traceback" in err and "LabelFileError" in err
    assert not (tmp_path / "rm").exists()


# ---------------------------------------------------------------------------------------------
# 4. Numerical guards
# ---------------------------------------------------------------------------------------------


def nan_score_at(update: int):
    """A scripted score, NaN at the `update`-th rollout (1-based)."""
    calls = []

    def score(queries, responses):
        calls.append(1)
        scores = (responses % 7).float().mean(1)
        return scores * math.nan if len(calls) == update else scores
    return score


def record_policy(monkeypatch) -> list[dict]:
    log: list[dict] = []
    step = train_policy.PPOTrainer.step

    def recording(self):
        out = step(self)
        log.append({k: v.detach().clone() for k, v in self.policy.state_dict().items()})
        return out

    monkeypatch.setattr(train_policy.PPOTrainer, "step", recording)
    return log


def test_policy_nan_score_stops_at_that_step_and_keeps_checkpoints(files, tmp_path):
    run = tmp_path / "ppo"
    hp = hparams(train_policy.TrainPolicyHParams, policy_config(files, run, **{"run.save_interval": 1}))
    with pytest.raises(FloatingPointError, match=r"^step 3: non-finite ppo/loss/total on rank 0; the run stopped "
                                                 r"\(rerun to resume from its last checkpoint"):
        train_policy.train(hp, exp_name="ppo", score_fn=nan_score_at(3))
    assert [row["step"] for row in rows(run)] == [1, 2]
    assert checkpoint_names(run) == ["step_000001.pt", "step_000001.pt.sha256", "step_000002.pt",
                                     "step_000002.pt.sha256"]
    assert not (run / "model.safetensors").exists()
    hp = hparams(train_policy.TrainPolicyHParams, policy_config(files, tmp_path / "unsaved"))
    with pytest.raises(FloatingPointError, match=r"it saved no checkpoint \(--run.save_interval\), so a rerun "
                                                 r"starts over"):
        train_policy.train(hp, exp_name="ppo", score_fn=nan_score_at(3))


def test_policy_skip_nonfinite_skips_the_batches_and_counts_them(files, tmp_path, monkeypatch, capsys):
    params = record_policy(monkeypatch)
    run = tmp_path / "ppo"
    hp = hparams(train_policy.TrainPolicyHParams, policy_config(files, run, **{"run.skip_nonfinite": True}))
    train_policy.train(hp, exp_name="ppo", score_fn=nan_score_at(3))
    metrics = rows(run)
    assert [row["run/skipped_batches"] for row in metrics] == [0, 0, 2, 2]  # 2 minibatches of update 3
    assert "ppo/loss/total" not in metrics[2] and "ppo/loss/total" in metrics[3]
    assert all(torch.equal(params[1][k], params[2][k]) for k in params[1])  # no optimizer step in update 3
    assert not all(torch.equal(params[2][k], params[3][k]) for k in params[2])
    assert "warning: step 3: non-finite ppo/loss/total on rank 0; batch skipped (1 so far)" in capsys.readouterr().err


def nan_reward_at(monkeypatch, step: int):
    reward_fn = train_reward.RewardTrainer.reward_fn

    def nan_at(self, model):
        fn = reward_fn(self, model)
        return (lambda q, r: fn(q, r) * math.nan) if self.step + 1 == step else fn

    monkeypatch.setattr(train_reward.RewardTrainer, "reward_fn", nan_at)


def nan_gradient_at(monkeypatch, step: int):
    """A finite loss whose gradient is NaN at `step` (1-based)."""
    train_step = train_reward.RewardTrainer.train_step

    def poisoned(self, indices, lr):
        if self.step + 1 != step:
            return train_step(self, indices, lr)
        hook = self.reward_model.reward_head.weight.register_hook(lambda grad: grad * math.nan)
        try:
            return train_step(self, indices, lr)
        finally:
            hook.remove()

    monkeypatch.setattr(train_reward.RewardTrainer, "train_step", poisoned)


def test_reward_nan_gradient_stops_the_run(files, tmp_path, monkeypatch):
    nan_gradient_at(monkeypatch, 3)
    with pytest.raises(FloatingPointError, match=r"^step 3: non-finite gradient norm on rank 0"):
        train_rm(files, tmp_path / "rm", **{"run.save_interval": 1})
    assert (tmp_path / "rm" / "checkpoints" / "step_000002.pt").is_file()


def test_reward_skip_nonfinite(files, tmp_path, monkeypatch):
    nan_reward_at(monkeypatch, 3)
    train_rm(files, tmp_path / "rm", **{"run.skip_nonfinite": True})
    train = [row for row in rows(tmp_path / "rm") if "run/skipped_batches" in row]
    assert [row["run/skipped_batches"] for row in train] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert "train/loss" not in train[2] and all("train/loss" in row for row in train[3:])
    assert math.isfinite(rows(tmp_path / "rm")[-1]["eval/loss"])


def nan_lm_loss_at(monkeypatch, step: int):
    calls = []
    lm_loss = train_sft.lm_loss

    def loss(model, batch, *, pad_token):
        calls.append(1)
        out = lm_loss(model, batch, pad_token=pad_token)
        return out * math.nan if len(calls) == step else out

    monkeypatch.setattr(train_sft, "lm_loss", loss)


@pytest.mark.parametrize("skip", [False, True])
def test_sft_nan_loss(files, tmp_path, monkeypatch, skip):
    nan_lm_loss_at(monkeypatch, 2)
    hp = hparams(train_sft.TrainSFTHParams, sft_config(files, tmp_path / "lm", **{"run.save_interval": 1,
                                                                                   "run.skip_nonfinite": skip}))
    if not skip:
        with pytest.raises(FloatingPointError, match=r"^step 2: non-finite train/loss on rank 0"):
            train_sft.train(hp, exp_name="lm")
        assert checkpoint_names(tmp_path / "lm") == ["step_000001.pt", "step_000001.pt.sha256"]
        return
    train_sft.train(hp, exp_name="lm")
    assert [row.get("run/skipped_batches") for row in rows(tmp_path / "lm")] == [0, 1, 1, 1]
    assert "train/loss" not in rows(tmp_path / "lm")[1]


def test_cli_non_finite_exits_3_naming_step_and_statistic(files, tmp_path, monkeypatch, capsys):
    nan_reward_at(monkeypatch, 4)
    run = tmp_path / "rm"
    args = ["train_reward", "offline_sentiment", "x", *cli_args(reward_config(files, run, **{"run.save_interval": 1}))]
    assert launch.main(args) == 3
    out, err = capsys.readouterr()
    progress, error = err.rstrip("\n").rsplit("\n", 1)  # the progress bar is closed first, on its own line
    assert progress.lstrip("\r").startswith("train_reward:"), err
    assert error.startswith("error: step 4: non-finite train/loss on rank 0; "), err
    assert "Traceback" not in out + err
    assert checkpoint_names(run) == ["step_000002.pt", "step_000002.pt.sha256", "step_000003.pt",
                                     "step_000003.pt.sha256"]
    with pytest.raises(FloatingPointError):
        launch.main([*args, "--debug"])


# ---------------------------------------------------------------------------------------------
# 5. Distributed invariants and failure
# ---------------------------------------------------------------------------------------------


def _train_both(rank, world_size, reward_cfg: dict, policy_cfg: dict) -> dict:
    """Train a reward model and a policy on this rank; return what every rank must agree on."""
    out = {}
    reward_train, ppo_train = train_reward.RewardTrainer.train, train_policy.PPOTrainer.train

    def capture_reward(self, logger):
        final = reward_train(self, logger)
        out["reward"] = {k: v.detach().clone() for k, v in self.reward_model.state_dict().items()}
        out["normalization"] = (float(self.reward_model.reward_gain), float(self.reward_model.reward_bias))
        return final

    def capture_policy(self, logger):
        stats = ppo_train(self, logger)
        out["policy"] = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        out["beta"] = self.kl_ctl.value
        out["updates"] = self.update
        return stats

    train_reward.RewardTrainer.train, train_policy.PPOTrainer.train = capture_reward, capture_policy
    train_reward.train(hparams(train_reward.TrainRewardHParams, reward_cfg), exp_name="rm")
    train_policy.train(hparams(train_policy.TrainPolicyHParams, policy_cfg), exp_name="ppo")
    return out


def test_ranks_hold_identical_parameters_beta_and_normalization(files, tmp_path):
    rank0, rank1 = run_distributed(_train_both, 2, reward_config(files, tmp_path / "rm", **{"micro_batch_size": 2}),
                                   policy_config(files, tmp_path / "ppo"))
    for part in ("reward", "policy"):
        assert rank0[part].keys() == rank1[part].keys()
        assert all(torch.equal(rank0[part][k], rank1[part][k]) for k in rank0[part]), part
    assert rank0["normalization"] == rank1["normalization"] and rank0["normalization"] != (1.0, 0.0)
    assert rank0["beta"] == rank1["beta"] != 0.2 and rank0["updates"] == 4


FAILING_RANK = """
import os, sys, time
sys.path.insert(0, os.getcwd())
import launch
from lm_human_preferences import train_policy
if os.environ["RANK"] == "1":
    step = train_policy.PPOTrainer.step
    def failing(self):
        if self.update == 2:
            if sys.argv[1] == "raise":
                raise RuntimeError("rank 1 fails on purpose")
            time.sleep(3600)  # hangs
        return step(self)
    train_policy.PPOTrainer.step = failing
sys.exit(launch.main(sys.argv[2:]))
"""


def test_a_failing_rank_never_leaves_the_other_hanging(files, tmp_path):
    """Rank 1 raises (or hangs) in update 3; rank 0 exits with an error well within 60 s (a hung
    peer: after `run.timeout_s`)."""
    jobs = {}
    for mode in ("raise", "hang"):
        port = free_port()
        args = ["train_policy", "offline_sentiment", "x", *cli_args(policy_config(files, tmp_path / mode, **{
            "ppo.total_episodes": 320, "run.timeout_s": 5}))]
        jobs[mode] = [subprocess.Popen([sys.executable, "-c", FAILING_RANK, mode, *args], cwd=ROOT, text=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       env={**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                      for rank in (0, 1)]
    t0 = time.monotonic()
    try:
        for mode, (rank0, rank1) in jobs.items():
            err = rank0.communicate(timeout=max(1.0, 60 - (time.monotonic() - t0)))[1]
            assert rank0.returncode not in (0, None), (mode, err[-2000:])
            if mode == "raise":
                assert rank1.wait(timeout=30) != 0 and "rank 1 fails on purpose" in rank1.communicate()[1]
    finally:
        for procs in jobs.values():
            for p in procs:
                p.kill()
                p.wait()
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------------------------------------
# 6. Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_and_config_give_identical_runs_on_cpu(files, tmp_path):
    for name, trainer in (("rm", train_rm), ("ppo", train_ppo)):
        a, b = trainer(files, tmp_path / f"{name}_a"), trainer(files, tmp_path / f"{name}_b")
        assert_same_run(a, b)
    other = train_ppo(files, tmp_path / "ppo_seed1", **{"run.seed": 1})
    assert untimed(other) != untimed(tmp_path / "ppo_a")
    assert load_weights(other).trunk["wte.weight"].ne(load_weights(tmp_path / "ppo_a").trunk["wte.weight"]).any()
