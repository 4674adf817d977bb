#!/usr/bin/env python3
"""Command line for lm_human_preferences.

    python launch.py train_reward <task> <experiment> [--key.sub=value ...]
    python launch.py train_policy <task> <experiment> --rewards.trained_model=DIR [--key=value ...]
    python launch.py sample --model DIR --prompt TEXT [--prompt TEXT ...] --length N

<task> names a preset in params.py (sentiment, descriptiveness, cnndm, tldr, offline_sentiment,
offline_descriptiveness); <experiment> names the run (output in runs/<experiment> unless
--run.save_dir is given). `python launch.py <subcommand> <task> x --help` lists every key with
its value. Several processes: `torchrun --nproc_per_node N launch.py ...`.
User errors (bad flags, labels, checkpoints) print one paragraph and exit with status 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

import params

def user_errors() -> tuple[type[BaseException], ...]:
    from lm_human_preferences.hparams import HParamsError
    from lm_human_preferences.labels import LabelFileError
    from lm_human_preferences.language.checkpoints import CheckpointError
    from lm_human_preferences.language.encodings import EncodingError
    from lm_human_preferences.runtime import CheckpointCorrupt
    return (HParamsError, LabelFileError, CheckpointError, EncodingError, CheckpointCorrupt, FileNotFoundError)


def trainer_hparams(subcommand: str, task: str, args: list[str]):
    """Defaults -> task preset -> experiment preset -> command line."""
    from lm_human_preferences.hparams import HParamsError

    if subcommand == "train_reward":
        from lm_human_preferences.train_reward import TrainRewardHParams as cls
    else:
        from lm_human_preferences.train_policy import TrainPolicyHParams as cls
    if task not in params.TASKS:
        raise HParamsError(f"unknown task {task!r}; expected one of {sorted(params.TASKS)}")
    hp = cls()
    hp.override_from_dict({f"task.{k}": v for k, v in params.TASKS[task].items()})
    hp.override_from_dict(params.EXPERIMENTS[subcommand].get(task, {}))
    if subcommand == "train_policy" and any(a.startswith("--rewards.train_new_model") and not a.endswith("=off")
                                            for a in args):
        # Training a new reward model uses the task's train_reward preset (the run and task are shared).
        hp.override_from_dict({f"rewards.train_new_model.{k}": v for k, v in params.TRAIN_REWARD.get(task, {}).items()
                               if not k.startswith("run.")})
    hp.override_from_args(args)
    return hp


def cmd_train(subcommand: str, argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog=f"launch.py {subcommand}", add_help=False,
                                description=f"{subcommand} <task> <experiment> [--key=value ...]")
    p.add_argument("task")
    p.add_argument("experiment")
    p.add_argument("-h", "--help", action="store_true")
    ns, rest = p.parse_known_args(argv)
    hp = trainer_hparams(subcommand, ns.task, rest)
    if ns.help:
        p.print_usage()
        print("hyperparameters (override with --key=value):")
        for k, v in hp.flat_items().items():
            print(f"  --{k}={json.dumps(v)}")
        return
    if subcommand == "train_reward":
        from lm_human_preferences import train_reward
        train_reward.train(hp, exp_name=ns.experiment)
    else:
        from lm_human_preferences import train_policy
        train_policy.train(hp, exp_name=ns.experiment)


def cmd_sample(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="launch.py sample",
                                description="Continuations of prompts from a saved, converted or trained model.")
    p.add_argument("--model", required=True, help="model directory (converted GPT-2, policy or SFT output)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--length", type=int, default=24, help="tokens to sample per continuation")
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1, help="continuations per prompt")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON lines {prompt, sample, continuation}")
    ns = p.parse_args(argv)
    from lm_human_preferences.language.sample import sample_prompts
    for row in sample_prompts(model=ns.model, prompts=ns.prompt, length=ns.length, temperature=ns.temperature,
                              seed=ns.seed, num_samples=ns.num_samples, device=ns.device):
        print(json.dumps(row) if ns.json else row["continuation"].replace("\n", "\\n"), flush=True)


COMMANDS = {
    "train_reward": lambda argv: cmd_train("train_reward", argv),
    "train_policy": lambda argv: cmd_train("train_policy", argv),
    "sample": cmd_sample,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print(f"\nsubcommands: {', '.join(COMMANDS)}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        COMMANDS[argv[0]](argv[1:])
    except user_errors() as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
