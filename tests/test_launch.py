"""The command line's answers to mistakes and to Ctrl-C: one line naming the flag or word at
fault and exit status 2 for usage errors, 130 for an interrupt, and nothing half-done."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import free_port

import launch
import tiny
from lm_human_preferences import collect_labels
from lm_human_preferences.collect_labels import CollectLabelsHParams
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language.encodings import get_encoding
from tiny import make_model, small_encoding

ROOT = Path(__file__).resolve().parents[1]
MISSING = "no/such/model"  # flag checks come before the model is loaded, so it is never read


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model with a 16-token context and the small GPT-2 subset vocabulary."""
    return make_model(tmp_path_factory.mktemp("launch") / "model", n_ctx=16, encoding=small_encoding())


def sample(*args: str) -> int:
    return launch.main(["sample", "--temperature", "0", *args])


# --------------------------------------------------------------------------------------------
# sample: bad values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["--length", "0"], "--length must be >= 1 (got 0)"),
    (["--length", "-3"], "--length must be >= 1 (got -3)"),
    (["--num_samples", "0"], "--num_samples must be >= 1 (got 0)"),
    (["--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--temperature", "nan"], "--temperature must be a number >= 0"),
    (["--seed", str(2**64)], "--seed must be an integer in [0, 2**64)"),
    (["--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    (["--device", "mps"], "--device 'mps': expected auto, cpu, cuda or cuda:N"),
    (["--prompt", ""], "empty --prompt"),
])
def test_sample_rejects_bad_values_before_loading_the_model(args, expected, capsys):
    assert sample("--model", MISSING, "--prompt", "hi", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}")
    assert err.count("\n") == 1 and "Traceback" not in err and MISSING not in err


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_sample_cuda_without_cuda(device, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sample("--model", MISSING, "--prompt", "hi", "--device", device) == 2
    assert capsys.readouterr().err == (f"error: --device {device!r}: CUDA is not available on this machine; "
                                       "use cpu or auto\n")


def test_sample_prompt_longer_than_the_context(model, capsys):
    assert sample("--model", str(model), "--prompt", "the cat sat", "--length", "15") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("error: prompt 'the cat sat' (3 tokens) + --length 15 exceeds the model's context of 16 "
                   "tokens; use --length 14 or less\n")
    # the suggested length fits: the last sampled token is never fed back to the model
    assert sample("--model", str(model), "--prompt", "the cat sat", "--length", "14", "--device", "cpu") == 0
    assert capsys.readouterr().err == ""


def test_sample_prompt_alone_longer_than_the_context(model, capsys):
    prompt = " ".join(["the cat"] * 9)  # 18 tokens, 71 characters: the message shows the first 60
    assert sample("--model", str(model), "--prompt", "the zebra", "--prompt", prompt, "--length", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # the error alone: no warning about 'zebra' for a request that fails
    assert err.startswith(f"error: prompt {prompt[:60]!r}... (18 tokens) + --length 1 exceeds the model's context "
                          "of 16 tokens")
    assert err.endswith("use a shorter prompt\n")


def test_sample_shows_prompts_at_a_terminal_and_no_special_tokens(model, monkeypatch, capsys):
    import json

    from lm_human_preferences.language import sample as sampling

    enc = small_encoding()
    cat, eot = enc.encode(" cat")[0], enc.eot_token
    monkeypatch.setattr(sampling, "sample_sequence",
                        lambda gpt, context, **kw: torch.tensor([[cat, eot, cat]] * context.shape[0]))
    args = ["--model", str(model), "--prompt", "the dog", "--length", "3", "--device", "cpu"]
    assert sample(*args) == 0
    assert capsys.readouterr().out == " cat cat\n"  # piped: the continuation alone
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert sample(*args) == 0
    assert capsys.readouterr().out == "the dog cat cat\n"
    assert sample(*args, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"prompt": "the dog", "sample": 0, "continuation": " cat cat",
                                                   "continuation_tokens": [cat, eot, cat]}


def test_sample_warns_about_words_outside_the_vocabulary(model, capsys):
    assert sample("--model", str(model), "--prompt", "the zebra sat", "--prompt", "the cat", "--length", "2",
                  "--device", "cpu") == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2  # both prompts sampled
    assert err == ("warning: --prompt 'the zebra sat': the model's vocabulary cannot represent it exactly; "
                   "the model sees 'the\ufffd\ufffd sat'\n")  # ' ze' 'bra' are unknown; 'the cat' is exact


def test_sample_character_outside_the_test_encoding(tmp_path, capsys):
    path = make_model(tmp_path / "chars", n_embd=8, n_layer=1, n_ctx=8, encoding=get_encoding("test"))
    assert sample("--model", str(path), "--prompt", "Hi", "--length", "2") == 2
    assert capsys.readouterr().err == ("error: --prompt 'Hi': the 'test' encoding only has "
                                       "'abcdefghijklmnopqrstuvwxyz.'; got 'H'\n")


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def test_misspelled_command_names_it_and_the_closest(capsys):
    assert launch.main(["train_polcy", "offline_sentiment", "x"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    first, second = err.splitlines()
    assert first == "error: unknown command 'train_polcy'; did you mean 'train_policy'?"
    assert all(name in second for name in launch.COMMANDS)


def test_unknown_command_without_a_close_one(capsys):
    assert launch.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'frobnicate'\ncommands: pipeline,") and "did you mean" not in err


def test_a_query_dataset_error_is_a_user_error(monkeypatch, capsys):
    from lm_human_preferences.language.datasets import QueryDatasetError

    def no_queries(argv):
        raise QueryDatasetError("none of the 3 passages of the query dataset gives a query", option="start_text")

    monkeypatch.setitem(launch.COMMANDS, "sample", no_queries)
    assert launch.main(["sample"]) == 2
    assert capsys.readouterr().err == ("error: start_text: none of the 3 passages of the query dataset gives a "
                                       "query\n")


def test_no_command_is_a_usage_error(capsys):
    assert launch.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Command line for lm_human_preferences" in err and "subcommands:" in err


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_is_not_an_error(flag, capsys):
    assert launch.main([flag]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "Command line for lm_human_preferences" in out and "subcommands:" in out


# --------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------


def interrupted(argv):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command, message", [
    ("sample", "interrupted\n"),
    ("train_policy", "interrupted; rerun the same command to resume from the last checkpoint (without one, see "
                     "--run.save_interval, it starts over; the pipeline keeps its finished stages)\n"),
    ("pipeline", "interrupted; rerun the same command to resume from the last checkpoint (without one, see "
                     "--run.save_interval, it starts over; the pipeline keeps its finished stages)\n"),
    ("collect_labels", "interrupted; rerun the same command to collect the labels again\n"),
])
def test_ctrl_c_is_one_line_and_status_130(command, message, monkeypatch, capsys):
    monkeypatch.setitem(launch.COMMANDS, command, interrupted)
    assert launch.main([command, "offline_sentiment", "x"]) == 130
    assert capsys.readouterr() == ("", message)


def test_ctrl_c_under_torchrun_speaks_once(monkeypatch, capsys):
    """Every process of a torchrun job gets the signal; only the first says so."""
    monkeypatch.setitem(launch.COMMANDS, "train_reward", interrupted)
    monkeypatch.setenv("RANK", "1")
    assert launch.main(["train_reward", "offline_sentiment", "x"]) == 130
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    assert launch.main(["train_reward", "offline_sentiment", "x"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_ctrl_c_with_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setitem(launch.COMMANDS, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        launch.main(["sample", "--debug"])


@pytest.mark.parametrize("command", ["train_sft", "collect_labels", "train_reward", "train_policy"])
def test_subcommand_help_needs_no_task(command, capsys):
    assert launch.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "defaults:" in out and "offline_sentiment" in out and "  --run.seed=0" in out
    assert launch.main([command, "offline_sentiment", "--help"]) == 0
    assert "for offline_sentiment:" in capsys.readouterr().out


def test_subcommand_without_an_experiment_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        launch.main(["train_reward", "offline_sentiment"])
    assert exit_.value.code == 2
    assert "the following arguments are required: experiment" in capsys.readouterr().err


def test_converting_a_model_of_ours_keeps_its_encoding_and_sample_checks_it(model, tmp_path, capsys):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(launch.__file__).parent / "saved_models" / "prepare_pytorch_checkpoint.py"
    out = subprocess.run([sys.executable, str(script), "--source", str(model), "--out", str(tmp_path / "conv")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr
    assert sample("--model", str(tmp_path / "conv"), "--prompt", "the", "--length", "2") == 0
    capsys.readouterr()
    # A config.json naming an encoding of another size: an error, not an index error in the embedding.
    config = json.loads((tmp_path / "conv" / "config.json").read_text())
    (tmp_path / "conv" / "config.json").write_text(json.dumps({**config, "encoding": "gpt2"}))
    assert sample("--model", str(tmp_path / "conv"), "--prompt", "the", "--length", "2") == 2
    assert "does not match the 'gpt2' encoding (50257)" in capsys.readouterr().err


def test_rerunning_collect_labels_does_nothing_unless_its_settings_changed(model, tmp_path, capsys):
    def collect(**extra):
        hp = CollectLabelsHParams()
        hp.override_from_dict({**tiny.task_overrides(model, tiny.make_corpus(tmp_path / "corpus.txt")),
                               "num_labels": 8, "batch_size": 8, "run.save_dir": str(tmp_path / "labels"),
                               "run.wandb": "off", "run.device": "cpu", **extra})
        return collect_labels.train(hp, exp_name="labels")

    out = collect()
    written = out.stat().st_mtime_ns
    capsys.readouterr()
    assert collect() == out and out.stat().st_mtime_ns == written
    assert "holds this run, finished; nothing to do" in capsys.readouterr().out
    with pytest.raises(HParamsError, match=r"holds a finished run with other settings \(num_labels: 8 -> 16\)"):
        collect(num_labels=16)
    assert out.stat().st_mtime_ns == written


def test_sample_refuses_a_reward_model(model, tmp_path, capsys):
    from lm_human_preferences import lm_tasks, train_reward

    rm = train_reward.save_reward_model(tmp_path / "rm", train_reward.build_reward_model(
        lm_tasks.load_pretrained(str(model)), seed=0), encoding=small_encoding().to_meta())
    assert sample("--model", str(rm), "--prompt", "the") == 2
    assert "rm: is a reward model; start from a language model or a policy" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["pipeline", "train_sft", "collect_labels", "train_reward", "train_policy"])
def test_wandb_on_without_wandb_is_one_paragraph_and_writes_nothing(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    monkeypatch.chdir(tmp_path)
    assert launch.main([command, "offline_sentiment", "x", "--run.wandb=on"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid hyperparameter 'run.wandb': the wandb package is not installed: "
                          "`pip install wandb`, or pass --run.wandb=auto") and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def trainer_sections():
    """(dotted path, class) of every section of every trainer's hyperparameters, off ones included."""
    import importlib

    from lm_human_preferences.hparams import _field_types, _section_type

    def walk(cls, path):
        yield path, cls
        for name, tp in _field_types(cls).items():
            if sec := _section_type(tp):
                yield from walk(sec, f"{path}.{name}")

    for command, (module, cls) in launch.TRAINERS.items():
        yield from walk(getattr(importlib.import_module(module), cls), command)


def test_every_hyperparameter_of_every_trainer_has_a_description():
    from lm_human_preferences.hparams_help import field_docs

    missing = [f"{path}.{name} ({cls.__module__}.{cls.__name__})" for path, cls in trainer_sections()
               for name, doc in field_docs(cls).items() if not doc]
    assert not missing, "add a comment to the end of each field's line: " + ", ".join(missing)


def test_help_describes_every_key_grouped_by_section(capsys):
    assert launch.main(["train_policy", "offline_sentiment", "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    ppo = lines.index("ppo: PPO optimisation")
    episodes = launch.params.EXPERIMENTS["train_policy"]["offline_sentiment"]["ppo.total_episodes"]
    assert lines[ppo + 1] == f"  --ppo.total_episodes={episodes}"  # the task's preset
    assert lines[ppo + 2] == "      episodes (queries answered) over the whole run"
    assert "rewards.adaptive_kl: adapt β toward a target KL (off: β stays kl_coef)" in out
    described = [i for i, line in enumerate(lines) if line.startswith("  --")]
    assert all(lines[i + 1].startswith("      ") and lines[i + 1].strip() for i in described)


# --------------------------------------------------------------------------------------------
# Two ranks: an error is printed once, a peer's death is one line
# --------------------------------------------------------------------------------------------

TWO_RANK_CHILD = """
import os, sys, time
import launch
from lm_human_preferences import distributed
from lm_human_preferences.hparams import HParamsError
if os.environ["RANK"] == "1" and sys.argv[1] != "none":
    def stop(*args, **kwargs):  # where rank 1 would reduce its first training statistics
        if sys.argv[1] == "exit":
            os._exit(7)
        if sys.argv[1] == "hang":
            time.sleep(3600)
        raise HParamsError("only rank 1 sees this")
    distributed.all_reduce_stats = stop
sys.exit(launch.main(sys.argv[2:]))
"""
TINY_SFT = ["--steps=2", "--batch_size=4", "--seq_length=16", "--eval_interval=2", "--eval_batches=1",
            "--warmup_steps=1", "--vocab_passages=200", "--model.n_embd=16", "--model.n_head=2", "--model.n_layer=1",
            "--model.n_ctx=32", "--run.wandb=off"]


def test_a_flag_error_under_torchrun_is_printed_by_rank_0_alone(monkeypatch, capsys):
    """Every rank checks the same flags before the process group exists: rank 0 speaks for all."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("1", ""), ("0", "error: invalid hyperparameter 'run.log_interval': must be an integer >= 1 and <= 2**40 (got 0)\n")):
        monkeypatch.setenv("RANK", rank)
        assert launch.main(["train_sft", "offline_sentiment", "x", "--run.log_interval=0"]) == 2
        assert capsys.readouterr() == ("", printed)


def two_ranks(cwd, rank1: str, *args: str) -> list:
    """`launch.py train_sft` as ranks 0 and 1 of one job (as torchrun starts them, without its
    agent, which would stop the survivor of a failed rank itself); rank 1 exits, hangs or raises
    a user error of its own at its first training statistics (`rank1`), or runs as it is ("none")."""
    cwd.mkdir()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    return [subprocess.Popen([sys.executable, "-c", TWO_RANK_CHILD, rank1, "train_sft", "offline_sentiment", "x",
                              *TINY_SFT, f"--run.save_dir={cwd}/run", *args], cwd=cwd, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
            for rank in (0, 1)]


def outcome(proc) -> tuple[int, list[str]]:
    """Exit status, and what the process printed about errors (a traceback as `Traceback`)."""
    err = proc.communicate(timeout=100)[1]
    return proc.returncode, re.findall(r"error[^\n]*|Traceback", err)


def test_under_two_ranks_an_error_is_printed_once_and_a_dead_peer_is_one_line(tmp_path):
    """A user error or a non-finite stop both ranks meet once their process group exists is
    printed by rank 0 alone; a user error that only rank 1 meets, by rank 1, naming itself. When rank 1 dies or hangs, rank 0 says
    so in one line (no backend traceback) and exits with status 1, at once or after
    --run.timeout_s."""
    jobs = {
        "setting": two_ranks(tmp_path / "setting", "none", "--seq_length=64", "--run.timeout_s=120"),
        "non-finite": two_ranks(tmp_path / "non-finite", "none", "--lr=1e30", "--run.timeout_s=120"),
        "own": two_ranks(tmp_path / "own", "raise", "--run.timeout_s=120"),
        "exit": two_ranks(tmp_path / "exit", "exit", "--run.timeout_s=120"),
        "hang": two_ranks(tmp_path / "hang", "hang", "--run.timeout_s=5"),
    }
    try:  # each rank 0 is done well before its --run.timeout_s=120 (and the hung rank 1 is left to the end)
        said = {case: [outcome(p) for p in (procs[:1] if case == "hang" else procs)] for case, procs in jobs.items()}
    finally:
        for procs in jobs.values():
            for p in procs:
                p.kill()
                p.wait()
    too_long = "error: invalid hyperparameter 'seq_length': longer than the model's context (32)"
    assert said["setting"] == [(2, [too_long]), (2, [])]
    (status, lines), rank1 = said["non-finite"]
    assert status == 3 and len(lines) == 1 and lines[0].startswith("error: step 2: non-finite") and rank1 == (3, [])
    assert said["own"] == [(1, ["error: rank 1 exited; stopping"]), (2, ["error (rank 1): only rank 1 sees this"])]
    assert said["exit"] == [(1, ["error: rank 1 exited; stopping"]), (7, [])]
    assert said["hang"][0] == (1, ["error: rank 1 did not answer within 5 s (--run.timeout_s); stopping"])


def test_a_rank_whose_peer_never_comes_gives_up_after_the_timeout(tmp_path):
    """Every wait of the rendezvous is bounded by --run.timeout_s: rank 0 of 2 alone (hosting the
    store) and rank 1 of 2 alone (with no store to reach) each stop with one line and status 1."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "train_sft", "offline_sentiment", "x",
                               *TINY_SFT, f"--run.save_dir={tmp_path}/{rank}", "--run.timeout_s=2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_PORT": str(free_port())})
             for rank in (0, 1)]
    try:
        said = [outcome(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for rank, (status, lines) in enumerate(said):
        assert status == 1 and len(lines) == 1, said
        who = " (rank 1)" if rank else ""
        assert lines[0].startswith(f"error{who}: not all 2 ranks joined within 2 s (--run.timeout_s); stopping ("), said
