"""Hostile inputs through the command line: label files, flags, model configs, checkpoints (and,
with the checks that refuse them, output directories). Every case exits with status 2 and one
paragraph on stderr that names the input at fault, creates nothing (no run directory, no
converted model, no file a pickle payload would write) and prints nothing on stdout.

Each case builds its inputs in a fresh directory, which must be unchanged afterwards; trainers
write their runs into it (`--run.save_dir`). The commands run in-process (`launch.main`, the
converter's `main`). Cases of the same errors checked function by function live in
test_reliability.py; here each goes through the command line.
"""

import hashlib
import importlib.util
import io
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

import launch
from lm_human_preferences import lm_tasks, train_reward
from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.rewards import RewardModel

ROOT = Path(__file__).resolve().parents[1]
LQ, LR = 8, 6
MARKER = "payload_ran"


@dataclass
class Case:
    argv: Callable[[SimpleNamespace, Path], list[str]]  # (files, a fresh directory) -> the command line
    says: str  # a regex the message must match: the input at fault and the problem


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model with the corpus' 64-token vocabulary, its corpus, labels and a reward model."""
    d = tmp_path_factory.mktemp("hostile_inputs")
    enc = tiny.small_encoding()
    model = tiny.make_model(d / "model", encoding=enc)
    rm = train_reward.save_reward_model(d / "rm", train_reward.build_reward_model(
        lm_tasks.load_pretrained(str(model)), seed=1), encoding=enc.to_meta())
    labels = tiny.make_best_of_4_labels(d / "labels.json", n=80, query_length=LQ, response_length=LR, encoding=enc)
    return SimpleNamespace(model=model, rm=rm, labels=labels, corpus=tiny.make_corpus(d / "corpus.txt"))


# --------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------


def flags(config: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in config.items()]


def common(files, tmp: Path) -> dict:
    return {"run.save_dir": tmp / "run", "run.wandb": "off", "run.device": "cpu"}


def reward(**extra) -> Callable:
    def argv(files, tmp):
        config = {**tiny.task_overrides(files.model, files.corpus, query_length=LQ, response_length=LR),
                  "labels.source": files.labels, "labels.num_train": 64, "batch_size": 8, "rollout_batch_size": 16,
                  "normalize_samples": 16, **common(files, tmp), **extra}
        return ["train_reward", "offline_sentiment", "x", *flags(config)]
    return argv


def policy(**extra) -> Callable:
    def argv(files, tmp):
        config = {**tiny.task_overrides(files.model, files.corpus, query_length=LQ, response_length=LR),
                  "rewards.trained_model": files.rm, "ppo.batch_size": 8, "ppo.total_episodes": 16,
                  **common(files, tmp), **extra}
        return ["train_policy", "offline_sentiment", "x", *flags(config)]
    return argv


def sft(**extra) -> Callable:
    def argv(files, tmp):
        config = {"data": files.corpus, "initial_model": files.model, "seq_length": 16, "batch_size": 4, "steps": 2,
                  **common(files, tmp), **extra}
        return ["train_sft", "offline_sentiment", "x", *flags(config)]
    return argv


def collect(**extra) -> Callable:
    def argv(files, tmp):
        config = {**tiny.task_overrides(files.model, files.corpus, query_length=LQ, response_length=LR),
                  "num_labels": 8, "batch_size": 4, **common(files, tmp), **extra}
        return ["collect_labels", "offline_sentiment", "x", *flags(config)]
    return argv


def sample(*args: str) -> Callable:
    return lambda files, tmp: ["sample", "--model", str(files.model), "--prompt", "the cat", "--length", "2", *args]


def invoke(argv: list[str]) -> int:
    """launch.py's exit status, or the converter's (`prepare_pytorch_checkpoint ARGS`)."""
    if argv[0] != "prepare_pytorch_checkpoint":
        return launch.main(argv)
    spec = importlib.util.spec_from_file_location("prepare", ROOT / "saved_models" / "prepare_pytorch_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main(argv[1:])
    except SystemExit as e:
        return e.code
    return 0


# --------------------------------------------------------------------------------------------
# Label files (train_reward --labels.source=FILE)
# --------------------------------------------------------------------------------------------


def label_rows(n: int = 2) -> list[dict]:
    return [{"query": [1] * LQ, **{f"sample{i}": [2] * LR for i in range(4)}, "best": i % 4} for i in range(n)]


def labels(content: Callable[[], str | bytes], **extra) -> Callable:
    def argv(files, tmp):
        data = content()
        path = tmp / "labels.json"
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return reward(**{"labels.source": path, **extra})(files, tmp)
    return argv


def edited(field: str, value) -> Callable[[], str]:
    def content():
        rows = label_rows()
        rows[1][field] = value
        return json.dumps(rows)
    return content


LABEL_FILES = {
    "malformed JSON": Case(labels(lambda: "[{"), r"labels\.json: invalid JSON at line 1"),
    "not UTF-8": Case(labels(lambda: b"[\xff]"), r"labels\.json: expected UTF-8 JSON"),
    "missing field": Case(labels(lambda: json.dumps([{k: v for k, v in r.items() if k != "best"}
                                                     for r in label_rows()])),
                          r"labels\.json: row 0, field 'best': missing"),
    "unexpected field": Case(labels(edited("sample4", [2] * LR)), r"labels\.json: row 1, field 'sample4': unexpected"),
    "token outside the vocabulary": Case(labels(edited("query", [1] * (LQ - 1) + [64])),
                                         r"labels\.json: row 1, field 'query': token 7: expected an id in \[0, 64\)"),
    "response of another length": Case(labels(edited("sample3", [2] * (LR + 1))),
                                       r"labels\.json: row 1, field 'sample3': expected 6 token ids, got 7"),
    "best out of range": Case(labels(edited("best", 4)), r"labels\.json: row 1, field 'best': expected an integer "
                                                         r"in \[0, 4\)"),
    "fewer labels than num_train": Case(labels(lambda: json.dumps(label_rows(3))),
                                        r"labels\.json: 3 labels, but labels\.num_train=64"),
}

# --------------------------------------------------------------------------------------------
# Flags: ranges, types, and batches no memory can hold (refused before the model is built)
# --------------------------------------------------------------------------------------------

FLAGS = {
    "nan temperature": Case(reward(**{"task.policy.temperature": "nan"}),
                            r"'task\.policy\.temperature': must be a finite number .*\(got nan\)"),
    "nan penalty": Case(policy(**{"task.penalty_reward_value": "nan"}),
                        r"'task\.penalty_reward_value': must be a finite number \(got nan\)"),
    "infinite clip range": Case(policy(**{"ppo.cliprange": "inf"}), r"'ppo\.cliprange': must be a finite number"),
    "infinite timeout": Case(reward(**{"run.timeout_s": "inf"}), r"'run\.timeout_s': must be a finite number"),
    "1e20 episodes": Case(policy(**{"ppo.total_episodes": "1e20"}),
                          r"'ppo\.total_episodes': must be an integer >= 1 and <= 2\*\*40 \(got 10{20}\)"),
    "seed 1e23": Case(sft(**{"run.seed": "1e23"}), r"'run\.seed': must be an integer >= 0 and <= 4294967295"),
    "negative seed": Case(reward(**{"run.seed": -1}), r"'run\.seed': must be an integer >= 0"),
    "negative thread count": Case(sft(**{"run.threads": -1}), r"'run\.threads': must be an integer >= 0"),
    "negative truncate token": Case(policy(**{"task.truncate_token": -1}), r"'task\.truncate_token': must be"),
    "negative logged samples": Case(policy(num_logged_samples=-1), r"'num_logged_samples': must be an integer >= 0"),
    "negative warmup": Case(sft(warmup_steps=-1), r"'warmup_steps': must be an integer >= 0"),
    "no layers": Case(sft(**{"initial_model": "", "model.n_layer": 0}), r"'model\.n_layer': must be an integer >= 1"),
    "heads that do not divide the width": Case(sft(**{"initial_model": "", "model.n_head": 5}),
                                               r"'model\.n_head': n_embd=64 is not divisible by n_head=5"),
    "best of 2000": Case(reward(**{"labels.type": "best_of_2000"}),
                         r"'labels\.type': at most 1024 responses per label"),
    "unknown key": Case(sft(**{"model.n_layers": 3}),
                        r"unknown hyperparameter 'model\.n_layers'; did you mean 'model\.n_layer'"),
    "wrong type": Case(collect(num_labels="many"), r"'num_labels' expects int, got 'many'"),
    "rollout batch beyond memory": Case(reward(rollout_batch_size="1e10"),
                                        r"'rollout_batch_size': sampling 10000000000 responses at once .*needs at "
                                        r"least [\d,.]+ GiB of memory, more than the [\d,.]+ GiB of this machine"),
    "PPO batch beyond memory": Case(policy(**{"ppo.batch_size": 2**38, "ppo.total_episodes": 2**38}),
                                    r"'ppo\.batch_size': sampling 274877906944 responses at once"),
    "training micro-batch beyond memory": Case(sft(batch_size="1e9"),
                                               r"'batch_size': a training micro-batch of 1000000000 sequences"),
    "label collection batch beyond memory": Case(collect(batch_size="1e10"),
                                                 r"'batch_size': sampling 40000000000 responses at once"),
    "model beyond memory": Case(sft(**{"initial_model": "", "encoding": "gpt2-subset", "vocab_passages": 10,
                                       "model.n_embd": 2**20}),
                                r"'model': training a model of 2 layers of width 1048576 needs at least"),
    "samples beyond memory": Case(sample("--num_samples", str(10**10)),
                                  r"--num_samples 10000000000: sampling 10000000000 continuations at once"),
}

# --------------------------------------------------------------------------------------------
# Model configs and weights (--task.policy.initial_model=DIR, sample --model DIR, the converter)
# --------------------------------------------------------------------------------------------


def damaged_model(damage: Callable[[Path], None]) -> Callable[[SimpleNamespace, Path], Path]:
    def make(files, tmp):
        model = shutil.copytree(files.model, tmp / "model")
        damage(model)
        return model
    return make


def config_edit(section: str | None, key: str, value) -> Callable[[Path], None]:
    def damage(model):
        config = json.loads((model / "config.json").read_text())
        (config[section] if section else config)[key] = value
        (model / "config.json").write_text(json.dumps(config))
    return damage


def tensor_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(model):
        tensors = load_file(str(model / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(model / "model.safetensors"))
    return damage


class Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickled_weights(model: Path) -> None:
    """The model's weights replaced by a pytorch_model.bin whose unpickling would write a file."""
    (model / "model.safetensors").unlink()
    (model / "config.json").unlink()
    torch.save({"wte.weight": Payload(model.parent / MARKER)}, model / "pytorch_model.bin")


ABSURD_LAYERS = config_edit("gpt", "n_layer", 100000)
UNKNOWN_ENCODING = config_edit(None, "encoding", "gpt5")
TRUNCATED = (lambda model: (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:-64]))


def as_initial_model(damage, **extra) -> Callable:
    def argv(files, tmp):
        return reward(**{"task.policy.initial_model": damaged_model(damage)(files, tmp), **extra})(files, tmp)
    return argv


def as_sample_model(damage) -> Callable:
    return lambda files, tmp: ["sample", "--model", str(damaged_model(damage)(files, tmp)), "--prompt", "the cat"]


def converted(damage) -> Callable:
    return lambda files, tmp: ["prepare_pytorch_checkpoint", "--source", str(damaged_model(damage)(files, tmp)),
                               "--out", str(tmp / "converted")]


MODEL_CONFIGS = {
    "absurd n_layer": Case(as_initial_model(ABSURD_LAYERS),
                           r"model/config\.json: does not match its weights \(n_layer=100000 but the weights have 2\)"),
    "absurd n_embd": Case(as_sample_model(config_edit("gpt", "n_embd", 2**30)),
                          r"model/config\.json: does not match its weights \(n_embd=1073741824 but the weights "
                          r"have 16"),
    "heads that do not divide the width": Case(as_sample_model(config_edit("gpt", "n_head", 5)),
                                               r"model/config\.json: bad sizes .*n_embd a multiple of n_head"),
    "sizes that are not integers": Case(as_initial_model(config_edit("gpt", "n_ctx", "64")),
                                        r"model/config\.json: bad sizes .*positive integers expected"),
    "unknown encoding": Case(as_initial_model(UNKNOWN_ENCODING),
                             r"model: cannot build the encoding its config\.json names \(unknown encoding 'gpt5'"),
    "encoding ids that are not integers": Case(
        as_sample_model(config_edit(None, "encoding", {"name": "gpt2-subset", "ids": ["the", "cat"]})),
        r"model: cannot build the encoding its config\.json names \(unknown encoding description"),
    "a tensor of another shape": Case(
        as_sample_model(tensor_edit(lambda t: t.update({"h.1.mlp.c_fc.weight": t["h.1.mlp.c_fc.weight"][:-1]}))),
        r"model: checkpoint does not fit the model\n  shape mismatch: h\.1\.mlp\.c_fc\.weight"),
    "no weights file": Case(as_initial_model(lambda model: (model / "model.safetensors").unlink()),
                            r"model/model\.safetensors: not a readable weights file"),
    "no config.json": Case(as_sample_model(lambda model: (model / "config.json").unlink()),
                           r"model/model\.safetensors: cannot tell the number of heads for n_embd=16"),
    "no such model": Case(lambda files, tmp: ["sample", "--model", str(tmp / "nope"), "--prompt", "the cat"],
                          r"model '.*nope' not found"),
    "a reward model to sample from": Case(lambda files, tmp: ["sample", "--model", str(files.rm), "--prompt", "a"],
                                          r"rm: is a reward model"),
    "converting absurd sizes": Case(converted(ABSURD_LAYERS), r"model/config\.json: does not match its weights"),
    "converting an unknown encoding": Case(converted(UNKNOWN_ENCODING),
                                           r"model: cannot build the encoding its config\.json names"),
}

# --------------------------------------------------------------------------------------------
# Checkpoints: --run.resume=PATH, and weights given to sample and to the converter
# --------------------------------------------------------------------------------------------


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def resume_from(make: Callable[[Path], bytes], *, sidecar: Callable[[bytes], str | None] = None) -> Callable:
    """train_reward resuming from a checkpoint elsewhere holding `make(directory)`, beside its
    sha256 (or `sidecar(data)`: another text, or None for none)."""
    def argv(files, tmp):
        path = tmp / "elsewhere" / "step_000001.pt"
        path.parent.mkdir()
        data = make(tmp)
        path.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest() if sidecar is None else sidecar(data)
        if digest is not None:
            Path(f"{path}.sha256").write_text(digest)
        return reward(**{"run.resume": path})(files, tmp)
    return argv


def another_models_checkpoint(tmp: Path) -> bytes:
    other = RewardModel(GPT(GPTConfig(n_vocab=64, n_ctx=32, n_embd=8, n_head=2, n_layer=1)))
    return saved({"step": 1, "normalized_before": True, "model": other.state_dict(), "optimizer": {},
                  "queries": {}})


CHECKPOINTS = {
    "wrong sha256": Case(resume_from(lambda tmp: saved({"step": 1}), sidecar=lambda data: "0" * 64),
                         r"--run\.resume: .*step_000001\.pt: contents do not match step_000001\.pt\.sha256"),
    "no sha256 beside it": Case(resume_from(lambda tmp: saved({"step": 1}), sidecar=lambda data: None),
                                r"--run\.resume: .*step_000001\.pt: no step_000001\.pt\.sha256 beside it"),
    "corrupt, with a matching sha256": Case(resume_from(lambda tmp: b"PK\x03\x04" + bytes(range(256)) * 4),
                                            r"--run\.resume: .*step_000001\.pt: not a readable checkpoint"),
    "pickle payload": Case(resume_from(lambda tmp: saved({"step": 1, "model": Payload(tmp / MARKER)})),
                           r"step_000001\.pt: not a readable checkpoint \(it holds objects other than tensors"),
    "raw pickle payload": Case(resume_from(lambda tmp: pickle.dumps(Payload(tmp / MARKER), protocol=2)),
                               r"step_000001\.pt: not a readable checkpoint"),
    "a checkpoint of another model": Case(resume_from(another_models_checkpoint),
                                          r"step_000001\.pt: does not fit this run \(RuntimeError: Error\(s\) in "
                                          r"loading state_dict"),
    "pickle payload to sample from": Case(as_sample_model(pickled_weights),
                                          r"pytorch_model\.bin: not a readable weights file .*never unpickled"),
    "truncated weights to sample from": Case(as_sample_model(TRUNCATED),
                                             r"model/model\.safetensors: not a readable weights file"),
    "pickle payload to convert": Case(converted(pickled_weights),
                                      r"pytorch_model\.bin: not a readable weights file .*never unpickled"),
    "truncated weights to convert": Case(converted(TRUNCATED), r"model/model\.safetensors: not a readable weights"),
}

# --------------------------------------------------------------------------------------------
# Output directories (a read-only or full --run.save_dir): the cases go here, with the checks
# that refuse them.
# --------------------------------------------------------------------------------------------

def occupied(make: Callable, where: str) -> Callable:
    """`make`'s command line with --run.save_dir at `where` under a plain file the case writes."""
    def argv(files, tmp):
        (tmp / "occupied").write_text("not a directory\n")
        return [*make(files, tmp), f"--run.save_dir={tmp / where}"]
    return argv


# A read-only or full disk cannot be made here for root; tests/test_run_integrity.py simulates
# those (EROFS, ENOSPC) at the start, at a checkpoint and at the final save.
OUTPUT_DIRECTORIES: dict[str, Case] = {
    "save_dir is a file (train_reward)": Case(occupied(reward(), "occupied"), r"occupied"),
    "save_dir is a file (train_policy)": Case(occupied(policy(), "occupied"), r"occupied"),
    "save_dir inside a file (train_sft)": Case(occupied(sft(), "occupied/run"), r"occupied"),
    "save_dir inside a file (collect_labels)": Case(occupied(collect(), "occupied/run"), r"occupied"),
}

CASES = {f"{group}: {name}": case for group, cases in (
    ("label file", LABEL_FILES), ("flag", FLAGS), ("model config", MODEL_CONFIGS), ("checkpoint", CHECKPOINTS),
    ("output directory", OUTPUT_DIRECTORIES)) for name, case in cases.items()}


def tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_paragraph_with_exit_2_and_leaves_nothing(files, tmp_path, capsys, name):
    case = CASES[name]
    argv = case.argv(files, tmp_path)
    inputs = tree(tmp_path)
    status = invoke(argv)
    out, err = capsys.readouterr()
    assert status == 2, (status, err)
    assert out == "" and "Traceback" not in err, (out, err)
    assert err.startswith("error: ") and err.endswith("\n") and "\n\n" not in err, err
    assert re.search(case.says, err), (case.says, err)
    assert tree(tmp_path) == inputs  # no run directory, no converted model, no file a payload wrote
    assert not (tmp_path / MARKER).exists()
