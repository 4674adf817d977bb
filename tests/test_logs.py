import builtins
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from lm_human_preferences import distributed, logs
from lm_human_preferences.logs import Logger


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def no_wandb_import(monkeypatch):
    """Fail the test if anything tries to import wandb."""
    real_import = builtins.__import__
    attempts = []

    def guarded(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            attempts.append(name)
            raise AssertionError("wandb must not be imported here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    return attempts


class FakeRun:
    def __init__(self, fail_log=False):
        self.id = "run123"
        self.logged = []
        self.finished = False
        self.fail_log = fail_log

    def log(self, data, step=None):
        if self.fail_log:
            raise ConnectionError("network down")
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def _fake_wandb(monkeypatch, *, api_key=None, init_error=None, run=None):
    mod = types.ModuleType("wandb")
    mod.init_calls = []
    mod.run = run or FakeRun()

    class Settings:
        def __init__(self, **kw):
            self.kw = kw

    def init(**kw):
        mod.init_calls.append(kw)
        if init_error is not None:
            raise init_error
        return mod.run

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    mod.Settings, mod.init, mod.Table = Settings, init, Table
    mod.api = types.SimpleNamespace(api_key=api_key)
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_metrics_and_samples_round_trip(tmp_path):
    run = tmp_path / "runs" / "exp"
    with Logger(run, enabled=True, wandb="off") as logger:
        logger.log(0, {"objective/score": 0.5, "objective/kl": torch.tensor(2.25), "ppo/lr": np.float32(1e-5)})
        logger.log(1, {"objective/score": 0.75, "count": np.int64(3), "step": 99})
        logger.log_samples(1, [{"query": "Hello", "response": " world ✓", "score": 1.5}, {"query": "a", "score": -1}])
        # flushed immediately: readable before close
        assert len(_read(run / "metrics.jsonl")) == 2
        assert len(_read(run / "samples.jsonl")) == 2
    metrics = _read(run / "metrics.jsonl")
    assert metrics[0] == {"step": 0, "objective/score": 0.5, "objective/kl": 2.25, "ppo/lr": pytest.approx(1e-5)}
    assert metrics[1] == {"step": 1, "objective/score": 0.75, "count": 3}  # the step argument wins
    assert list(metrics[0]) == ["step", "objective/score", "objective/kl", "ppo/lr"]
    assert type(metrics[1]["count"]) is int
    assert _read(run / "samples.jsonl") == [
        {"step": 1, "query": "Hello", "response": " world ✓", "score": 1.5},
        {"step": 1, "query": "a", "score": -1},
    ]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "samples.jsonl"]


def test_non_finite_values_are_valid_json_null(tmp_path):
    with Logger(tmp_path, enabled=True, wandb="off") as logger:
        logger.log(3, {"a": float("nan"), "b": float("inf"), "c": torch.tensor(float("-inf")), "d": [1.0, math.nan]})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert row == {"step": 3, "a": None, "b": None, "c": None, "d": [1.0, None]}


def test_fresh_run_empties_existing_files(tmp_path):
    with Logger(tmp_path, enabled=True, wandb="off") as logger:
        logger.log(0, {"x": 1.0})
    with Logger(tmp_path, enabled=True, wandb="off") as logger:
        logger.log(0, {"x": 2.0})
    assert _read(tmp_path / "metrics.jsonl") == [{"step": 0, "x": 2.0}]


def test_resume_step_drops_later_lines(tmp_path):
    with Logger(tmp_path, enabled=True, wandb="off") as logger:
        for step in range(6):
            logger.log(step, {"x": float(step)})
            logger.log_samples(step, [{"q": f"q{step}"}])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "x": 6.')  # a line cut short by a crash
    with Logger(tmp_path, enabled=True, wandb="off", resume_step=3) as logger:
        assert [r["step"] for r in _read(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
        assert [r["step"] for r in _read(tmp_path / "samples.jsonl")] == [0, 1, 2, 3]
        logger.log(4, {"x": 40.0})
        logger.log_samples(4, [{"q": "new"}])
    metrics = _read(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2, 3, 4] and metrics[-1]["x"] == 40.0
    assert _read(tmp_path / "samples.jsonl")[-1] == {"step": 4, "q": "new"}
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_without_existing_files(tmp_path):
    with Logger(tmp_path / "new", enabled=True, wandb="off", resume_step=10) as logger:
        logger.log(11, {"x": 1})
    assert _read(tmp_path / "new" / "metrics.jsonl") == [{"step": 11, "x": 1}]


def test_disabled_logger_does_nothing(tmp_path, no_wandb_import):
    run = tmp_path / "run"
    logger = Logger(run, enabled=False, wandb="on", config={"a": 1}, resume_step=2)
    logger.log(0, {"x": 1.0})
    logger.log_samples(0, [{"q": "a"}])
    logger.close()
    with Logger(run, enabled=False) as other:
        other.log(1, {"x": 2.0})
    assert not run.exists()
    assert no_wandb_import == []


def test_summary_line():
    stats = {"objective/score": 0.53, "objective/kl": torch.tensor(2.1), "n": 7, "ppo/lr": 1.234567e-5}
    assert Logger.summary_line(12, stats, ["objective/score", "objective/kl"]) == (
        "step 12 | objective/score 0.53 | objective/kl 2.1"
    )
    assert logs.summary_line(1, stats, ["missing", "n", "ppo/lr"]) == "step 1 | n 7 | ppo/lr 1.235e-05"
    assert logs.summary_line(2, {"a": float("nan")}) == "step 2 | a nan"


def test_bad_wandb_mode(tmp_path):
    with pytest.raises(ValueError, match="wandb must be one of"):
        Logger(tmp_path, enabled=True, wandb="yes")


# --------------------------------------------------------------------------------------------
# wandb selection (wandb is not installed here: fake modules stand in for it)
# --------------------------------------------------------------------------------------------


def test_wandb_auto_disabled_mode_never_imports(tmp_path, monkeypatch, no_wandb_import):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with Logger(tmp_path, enabled=True, wandb="auto") as logger:
        logger.log(0, {"x": 1.0})
        assert not logger.using_wandb
    assert no_wandb_import == []
    assert _read(tmp_path / "metrics.jsonl") == [{"step": 0, "x": 1.0}]


def test_wandb_off_never_imports(tmp_path, monkeypatch, no_wandb_import):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with Logger(tmp_path, enabled=True, wandb="off") as logger:
        assert not logger.using_wandb
    assert no_wandb_import == []


def test_wandb_on_not_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match="wandb='on' but the wandb package is not installed"):
        Logger(tmp_path / "run", enabled=True, wandb="on")
    assert not (tmp_path / "run").exists()


def test_wandb_auto_not_installed_uses_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with Logger(tmp_path, enabled=True, wandb="auto") as logger:
        assert not logger.using_wandb
        logger.log(0, {"x": 1.0})
    assert _read(tmp_path / "metrics.jsonl") == [{"step": 0, "x": 1.0}]


def test_wandb_auto_without_api_key_uses_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    fake = _fake_wandb(monkeypatch, api_key=None)
    with Logger(tmp_path, enabled=True, wandb="auto") as logger:
        assert not logger.using_wandb
    assert fake.init_calls == []


@pytest.mark.parametrize("how", ["env", "netrc", "offline"])
def test_wandb_auto_with_key_logs_with_step(tmp_path, monkeypatch, how):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if how == "env":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    elif how == "offline":
        monkeypatch.setenv("WANDB_MODE", "offline")
    fake = _fake_wandb(monkeypatch, api_key="k" if how == "netrc" else None)
    with Logger(tmp_path, enabled=True, wandb="auto", project="p", run_name="r", config={"lr": 1e-5}) as logger:
        assert logger.using_wandb
        logger.log(5, {"a": 1.0, "b": float("nan")})
        logger.log_samples(5, [{"q": "x", "score": 1.0}, {"q": "y", "extra": 2}])
    (call,) = fake.init_calls
    assert call["project"] == "p" and call["name"] == "r" and call["config"] == {"lr": 1e-5}
    assert call["settings"].kw == {"init_timeout": 30}
    (step_a, data_a), (step_s, data_s) = fake.run.logged
    assert step_a == 5 and data_a["a"] == 1.0 and math.isnan(data_a["b"])
    assert step_s == 5 and data_s["samples"].columns == ["q", "score", "extra"]
    assert data_s["samples"].data == [["x", 1.0, None], ["y", None, 2]]
    assert fake.run.finished
    assert (tmp_path / "wandb_run_id.txt").read_text() == "run123"
    assert _read(tmp_path / "metrics.jsonl") == [{"step": 5, "a": 1.0, "b": None}]


def test_wandb_resume_reuses_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "wandb_run_id.txt").write_text("abc\n")
    fake = _fake_wandb(monkeypatch)
    Logger(tmp_path, enabled=True, wandb="on", resume_step=3).close()
    assert fake.init_calls[0]["id"] == "abc" and fake.init_calls[0]["resume"] == "allow"


def test_wandb_init_failure_warns_once_and_continues(tmp_path, monkeypatch, capsys):
    fake = _fake_wandb(monkeypatch, init_error=TimeoutError("no network"))
    with Logger(tmp_path, enabled=True, wandb="on") as logger:
        assert not logger.using_wandb
        logger.log(0, {"x": 1.0})
        logger.log(1, {"x": 2.0})
    err = capsys.readouterr().err
    assert err.count("warning: wandb.init failed (TimeoutError: no network)") == 1
    assert len(fake.init_calls) == 1
    assert [r["step"] for r in _read(tmp_path / "metrics.jsonl")] == [0, 1]


def test_wandb_log_failure_falls_back_to_files(tmp_path, monkeypatch, capsys):
    fake = _fake_wandb(monkeypatch, run=FakeRun(fail_log=True))
    with Logger(tmp_path, enabled=True, wandb="on") as logger:
        logger.log(0, {"x": 1.0})
        assert not logger.using_wandb
        logger.log(1, {"x": 2.0})
    assert capsys.readouterr().err.count("warning: wandb.log failed") == 1
    assert fake.run.finished
    assert [r["step"] for r in _read(tmp_path / "metrics.jsonl")] == [0, 1]


def test_wandb_settings_without_init_timeout(tmp_path, monkeypatch):
    fake = _fake_wandb(monkeypatch)

    def old_settings(**kw):
        raise TypeError("unexpected keyword argument 'init_timeout'")

    fake.Settings = old_settings
    with Logger(tmp_path, enabled=True, wandb="on") as logger:
        assert logger.using_wandb
    assert "settings" not in fake.init_calls[0]


# --------------------------------------------------------------------------------------------
# stdout and progress bars
# --------------------------------------------------------------------------------------------


def test_print0_prints_on_rank0_only(monkeypatch, capsys):
    logs.print0("hello", 1, sep="-")
    assert capsys.readouterr().out == "hello-1\n"
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    logs.print0("hidden")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_interface(enabled, capsys):
    assert list(logs.progress(range(4), desc="it", enabled=enabled)) == [0, 1, 2, 3]
    with logs.progress(total=10, desc="train", unit="ep", enabled=enabled) as bar:
        for _ in range(3):
            bar.update(2)
            bar.set_postfix({"loss": 0.5})
        bar.set_description("train2")
    bar.close()
    bar2 = logs.progress(total=2, enabled=enabled)
    bar2.update()
    bar2.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    if enabled:
        assert "train2" in captured.err and "loss=0.5" in captured.err and "6/10" in captured.err
    else:
        assert captured.err == ""


def test_progress_silent_off_main_rank(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    with logs.progress(total=3, desc="x") as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
