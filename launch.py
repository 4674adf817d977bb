#!/usr/bin/env python3
"""Command line for lm_human_preferences.

    python launch.py pipeline <task> <experiment>      # the whole offline pipeline, with a report
    python launch.py train_sft <task> <experiment>     # pretrain / fine-tune a language model
    python launch.py collect_labels <task> <experiment>  # best-of-4 labels from a scripted labeler
    python launch.py train_reward <task> <experiment> [--key.sub=value ...]
    python launch.py train_policy <task> <experiment> --rewards.trained_model=DIR [--key=value ...]
    python launch.py generate <task> <experiment> --prompts=FILE [--model=DIR --num_samples=N --top_p=P ...]
    python launch.py evaluate <task> <experiment> --outputs=FILE [--reward_model=DIR] [--judge=NAME --baseline=FILE]
    python launch.py compare <task> <experiment> --outputs=NAME=FILE,NAME=FILE [--references=FILE --split=SPEC]
    python launch.py train_pmorl <task> <experiment> --pmorl.reward_models=OPTION=DIR,... [--key=value ...]
    python launch.py merge <task> <experiment> --models=DIR,DIR[,...] [--weights=W,W,...] [--adapters=product]
    python launch.py sample --model DIR --prompt TEXT [--prompt TEXT ...] --length N
    python launch.py simulate_pairs <task> <experiment> --prompts=FILE [--method=rlcd|rlaif|rlcd_rescore ...]
    python launch.py consolidate_pairs --method M --out FILE.csv DIR [DIR ...]  # simulated records -> RLCD CSV
    python launch.py dialogue_prompts --split S --num N --out FILE.jsonl   # the offline dialogue task's prompts
    python launch.py prep_pairs OUT --pairs=FILE [--balance_len] [--rand_ratio=R] [--keep_uids=FILE]
    python launch.py cartography PAIR_SCORES OUT_DIR [--max_confidence=X]
    python launch.py length_report OUT_DIR --before=SCORES --after=NAME=SCORES [...]

<task> names a preset in params.py (sentiment, descriptiveness, cnndm, tldr, offline_sentiment,
offline_descriptiveness); <experiment> names the run (output in runs/<experiment> unless
--run.save_dir is given). `python launch.py <subcommand> [task] --help` lists every key with
its value and description, by section. Several processes: `torchrun --nproc_per_node N launch.py ...`.
User errors (bad flags, labels, checkpoints, an unwritable run directory) print one paragraph
and exit with status 2; a non-finite loss or gradient (see --run.skip_nonfinite) exits with
status 3; Ctrl-C exits with status 130 and SIGTERM with 143 (a trainer first finishes its step
and saves a checkpoint; a rerun resumes from it); `--debug` shows the traceback. A run's
status.json records its exit status (torchrun itself reports 1 whatever its ranks returned).
Under torchrun an error is printed once (by rank 0, or by the one rank that met it), and a
rank whose peer exited or stopped answering says so in one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import signal
import sys

import params

def user_errors() -> tuple[type[BaseException], ...]:
    from lm_human_preferences import run_status  # which also records them as exit status 2 in status.json
    return run_status.user_errors()


# subcommand -> (module, hyperparameter class); each module has `train(hp, *, exp_name)`.
TRAINERS = {
    "train_sft": ("lm_human_preferences.train_sft", "TrainSFTHParams"),
    "collect_labels": ("lm_human_preferences.collect_labels", "CollectLabelsHParams"),
    "train_reward": ("lm_human_preferences.train_reward", "TrainRewardHParams"),
    "train_policy": ("lm_human_preferences.train_policy", "TrainPolicyHParams"),
    "generate": ("lm_human_preferences.generate", "GenerateHParams"),
    "evaluate": ("lm_human_preferences.evaluate", "EvaluateHParams"),
    "compare": ("lm_human_preferences.compare", "CompareHParams"),
    "train_pmorl": ("lm_human_preferences.personalization", "TrainPMORLHParams"),
    "merge": ("lm_human_preferences.soups", "MergeHParams"),
    "simulate_pairs": ("lm_human_preferences.simulate_pairs", "SimulatePairsHParams"),
}


def stage_presets(subcommand: str, task: str) -> dict:
    """The task preset (under `task.`, for trainers that have a task) and the experiment preset."""
    from lm_human_preferences.hparams import HParamsError

    if task not in params.TASKS:
        raise HParamsError(f"unknown task {task!r}; expected one of {sorted(params.TASKS)}")
    preset = {} if subcommand in ("train_sft", "merge") else {f"task.{k}": v for k, v in params.TASKS[task].items()}
    return {**preset, **params.EXPERIMENTS.get(subcommand, {}).get(task, {})}


def trainer_hparams(subcommand: str, task: str, args: list[str]):
    """Defaults -> task preset -> experiment preset -> command line."""
    module, cls = TRAINERS[subcommand]
    hp = getattr(importlib.import_module(module), cls)()
    hp.override_from_dict(stage_presets(subcommand, task))
    if subcommand == "train_policy" and any(a.startswith("--rewards.train_new_model") and not a.endswith("=off")
                                            for a in args):
        # Training a new reward model uses the task's train_reward preset (the run and task are shared).
        hp.override_from_dict({f"rewards.train_new_model.{k}": v for k, v in params.TRAIN_REWARD.get(task, {}).items()
                               if not k.startswith("run.")})
    hp.override_from_args(args)
    return hp


def cmd_train(subcommand: str, argv: list[str]) -> None:
    from lm_human_preferences.hparams_help import help_lines

    p = argparse.ArgumentParser(prog=f"launch.py {subcommand}", add_help=False,
                                description=f"{subcommand} <task> <experiment> [--key=value ...]")
    p.add_argument("task", nargs="?")
    p.add_argument("experiment", nargs="?")
    p.add_argument("-h", "--help", action="store_true")
    ns, rest = p.parse_known_args(argv)
    if ns.help:  # with a task: its values; without: the defaults
        hp = trainer_hparams(subcommand, ns.task, rest) if ns.task else getattr(
            importlib.import_module(TRAINERS[subcommand][0]), TRAINERS[subcommand][1])()
        p.print_usage()
        print(f"tasks: {', '.join(params.TASKS)}")
        print("hyperparameters (override with --key=value)" + (f" for {ns.task}:" if ns.task else ", defaults:"))
        print("\n".join(help_lines(hp)))
        return
    if ns.experiment is None:
        p.error("the following arguments are required: " + ("task, experiment" if ns.task is None else "experiment"))
    hp = trainer_hparams(subcommand, ns.task, rest)
    importlib.import_module(TRAINERS[subcommand][0]).train(hp, exp_name=ns.experiment)


def cmd_pipeline(argv: list[str]) -> None:
    from lm_human_preferences import pipeline

    p = argparse.ArgumentParser(prog="launch.py pipeline", description=pipeline.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task")
    p.add_argument("experiment")
    p.add_argument("--eval_queries", type=int, default=64, help="held-out queries in the report")
    ns, rest = p.parse_known_args(argv)
    presets = {stage: stage_presets(stage, ns.task) for stage in pipeline.STAGES}
    pipeline.run_pipeline(ns.task, ns.experiment, rest, presets=presets, eval_queries=ns.eval_queries)


def cmd_sample(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="launch.py sample",
                                description="Continuations of prompts from a saved, converted or trained model, one "
                                            "line each: at a terminal the prompt with its continuation, piped or "
                                            "redirected the continuation alone.")
    p.add_argument("--model", required=True, help="model directory (converted GPT-2, policy or SFT output)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--length", type=int, default=24, help="tokens to sample per continuation")
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1, help="continuations per prompt")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true",
                   help="print JSON lines {prompt, sample, continuation, continuation_tokens}")
    ns = p.parse_args(argv)
    from lm_human_preferences.prompts import sample_prompts  # checks the values, then loads
    with_prompt = sys.stdout.isatty()  # a person reads it; a pipe or file keeps continuations alone
    for row in sample_prompts(model=ns.model, prompts=ns.prompt, length=ns.length, temperature=ns.temperature,
                              seed=ns.seed, num_samples=ns.num_samples, device=ns.device):
        text = (row["prompt"] if with_prompt else "") + row["continuation"]
        print(json.dumps(row) if ns.json else text.replace("\n", "\\n"), flush=True)


def cmd_consolidate_pairs(argv: list[str]) -> None:
    from lm_human_preferences import judges, rlcd
    from lm_human_preferences.hparams import HParamsError
    from lm_human_preferences.preferences import write_pairs

    p = argparse.ArgumentParser(prog="launch.py consolidate_pairs",
                                description="Merge the simulated records of simulate_pairs runs (their simulated/ "
                                            "directories) into one RLCD CSV, and for rlcd the context distillation "
                                            "data.")
    p.add_argument("dirs", nargs="+", help="directories of <index>.json records")
    p.add_argument("--method", required=True, choices=rlcd.METHODS)
    p.add_argument("--out", required=True, help="the CSV to write")
    p.add_argument("--distillation", default="", help="also write prompt/response .jsonl SFT data (rlcd only)")
    p.add_argument("--seed", type=int, default=0, help="the order of rlcd pairs' outputs")
    p.add_argument("--judge", default="", help="also print how often this judge (judges.py) agrees with the labels")
    ns = p.parse_args(argv)
    try:  # a bad name fails before anything is written
        judge = judges.get_judge(ns.judge, seed=ns.seed) if ns.judge else None
    except ValueError as e:
        raise HParamsError(str(e), key="judge") from None
    records = rlcd.read_records(*ns.dirs, method=ns.method)
    pairs = rlcd.consolidate(records, method=ns.method, seed=ns.seed)
    write_pairs(ns.out, pairs, format="rlcd")
    if ns.distillation:
        rlcd.write_jsonl(ns.distillation, rlcd.distillation_rows(records))
    print(f"wrote {len(pairs)} pairs ({len(records) - len(pairs)} failed indices left out) to {ns.out}")
    if judge is not None and pairs:
        agree = judges.agreement(judge, pairs)
        print(f"agreement with judge {ns.judge}: {agree.rate:.3f} [{agree.low:.3f}, {agree.high:.3f}] over "
              f"{agree.n} pairs ({agree.ties} ties, counted half)")


def cmd_dialogue_prompts(argv: list[str]) -> None:
    from lm_human_preferences.language.dialogues import SPLITS, dialogue_prompts
    from lm_human_preferences.rlcd import write_jsonl

    p = argparse.ArgumentParser(prog="launch.py dialogue_prompts",
                                description="Write prompts of the offline dialogue task (dialogue prefixes ending "
                                            "in Assistant:) as {\"prompt\": ...} lines.")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    write_jsonl(ns.out, [{"prompt": text} for text in dialogue_prompts(ns.num, seed=ns.seed, split=ns.split)])
    print(f"wrote {ns.num} prompts to {ns.out}")


def cmd_module(module: str, function: str):
    """A subcommand whose argument parser lives in `lm_human_preferences.<module>`."""
    return lambda argv: getattr(importlib.import_module(f"lm_human_preferences.{module}"), function)(argv)


COMMANDS = {
    "pipeline": cmd_pipeline,
    **{name: (lambda argv, name=name: cmd_train(name, argv)) for name in TRAINERS},
    "sample": cmd_sample,
    "consolidate_pairs": cmd_consolidate_pairs,
    "dialogue_prompts": cmd_dialogue_prompts,
    "prep_pairs": cmd_module("prep_pairs", "cmd_prep_pairs"),
    "cartography": cmd_module("prep_pairs", "cmd_cartography"),
    "length_report": cmd_module("length_report", "cmd_length_report"),
}


def interrupted_message(command: str) -> str:
    """What Ctrl-C during `command` prints: trainers checkpoint and resume (`--run.resume=auto`),
    the pipeline reuses finished stages; the others just stop."""
    if command in ("pipeline", "train_sft", "train_reward", "train_policy"):
        return ("interrupted; rerun the same command to resume from the last checkpoint (without one, see "
                "--run.save_interval, it starts over; the pipeline keeps its finished stages)")
    if command == "collect_labels":
        return "interrupted; rerun the same command to collect the labels again"
    return "interrupted"


def unknown_command(command: str) -> str:
    close = difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"error: unknown command {command!r}{hint}\ncommands: {', '.join(COMMANDS)} (see launch.py --help)"


def print_error(message: str, *, alike: bool = False, own: bool = False) -> None:
    """`error: message` on stderr, once for the whole job (see distributed.speaks): from rank 0,
    or from the one rank that met it, which it names."""
    from lm_human_preferences import distributed

    if distributed.speaks(message, alike=alike, own=own):
        rank = distributed.launch_rank()
        print(f"error{f' (rank {rank})' if rank else ''}: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):  # a missing command is a usage error
        print(f"{__doc__.strip()}\n\nsubcommands: {', '.join(COMMANDS)}",
              file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    if argv[0] not in COMMANDS:
        print(unknown_command(argv[0]), file=sys.stderr)
        return 2
    first_process = True  # until the launcher's rank is known (Ctrl-C may come during the imports)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        from lm_human_preferences.distributed import launch_rank
        from lm_human_preferences.run_status import raise_interrupted
        from lm_human_preferences.runtime import keep_freed_memory

        signal.signal(signal.SIGTERM, raise_interrupted)  # SIGTERM stops like Ctrl-C, with status 143
        first_process = launch_rank() == 0
        keep_freed_memory()  # faster CPU training steps; see its docstring
        COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt as e:
        # Under torchrun every process gets the signal and unwinds (the process group is closed
        # on the way); one line from the first is enough, and the status is not 0, so the
        # launcher reports the job as stopped. A trainer's interrupt says what a rerun does.
        if debug:
            raise
        if first_process:
            print(str(e) or interrupted_message(argv[0]), file=sys.stderr, flush=True)
        return getattr(e, "exit_status", 130)
    except BrokenPipeError:  # the reader of our output went away (`... --help | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except user_errors() as e:
        if debug:
            raise
        print_error(str(e))
        return 2
    except FloatingPointError as e:  # a non-finite loss or gradient stopped training, on every rank alike
        if debug:
            raise
        print_error(str(e), alike=True)
        return 3
    except RuntimeError as e:  # another rank exited or hangs: one line, not the backend's traceback
        from lm_human_preferences.distributed import PeerLost, peer_failure

        lost = peer_failure(e)
        if debug or lost is None:
            raise
        print_error(lost, own=isinstance(e, PeerLost))
        return 1
    finally:
        signal.signal(signal.SIGTERM, sigterm if sigterm is not None else signal.SIG_DFL)
        from lm_human_preferences.distributed import cleanup

        cleanup()  # the command's one process group, if it made one
    return 0


if __name__ == "__main__":
    sys.exit(main())
