"""Simulated preference data (`launch.py simulate_pairs`): RLCD, RLAIF or RLCD-Rescore pairs
from a language model and a file of dialogue prompts.

    python launch.py simulate_pairs offline_dialogue sim --prompts=runs/dialogue_prompts/train.jsonl
    python launch.py simulate_pairs offline_dialogue sim_1 --prompts=... --indices_mod=2 --indices_remainder=1
    python launch.py consolidate_pairs --method=rlcd --out=pairs.csv runs/sim_0/simulated runs/sim_1/simulated

The prompt file is `.jsonl`, one object a line with the dialogue prefix as `"prompt"` (or
`"text"`), or HH-RLHF's `"chosen"` dialogue, cut after its last "Assistant:"; every prompt must
end with "\\n\\nAssistant:". `indices` ("17-29,35-40", 0-based lines of the file),
`indices_mod` and `indices_remainder` pick the prompts this process simulates, so several
processes (different experiment names) can split a file and `consolidate_pairs` merges them.

For each prompt index (its own `random.Random(run.seed * 1000003 + index)` draws the affix
pair, the principle and the rescore order; see `rlcd.py` for the methods), the model samples
`length` tokens at `temperature` for each of the two prompts; `rlcd.clean_response` keeps the
reply, and a continuation it rejects (no end of turn, or empty) is sampled again, at most
`max_retries` times in all, after which the index is recorded as failed (`"status": false`).
Under torchrun the ranks take turns at each round's sampling batches (batch b on rank b mod N,
its generator the same on every rank) and share the outputs: the same records for any N.
RLAIF and RLCD-Rescore then ask `labeler_model` (default: the same model) for `win2_prob`
(`rlaif.ModelLabeler`). Writes `<save_dir>/simulated/<index>.json` once its indices are sampled
and labeled (a rerun skips the indices already there; split a large file with `indices` to keep
runs short), and at the end `<save_dir>/pairs.csv` (the RLCD CSV of
every record in `simulated/`, `rlcd.consolidate` seeded with `run.seed`) and, for `rlcd`,
`<save_dir>/distillation.jsonl` (context distillation SFT data for `train_sft --data=`).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lm_human_preferences import distributed, lm_tasks, rlcd
from lm_human_preferences.hparams import HParams, HParamsError, check_count, check_number
from lm_human_preferences.language.dialogues import ASSISTANT
from lm_human_preferences.language.sample import sample_sequence
from lm_human_preferences.logs import progress
from lm_human_preferences.preferences import write_pairs
from lm_human_preferences.rlaif import LabelerError, ModelLabeler
from lm_human_preferences.runtime import Run, RunHParams
from lm_human_preferences.trainer import run_training

PAIRS_FILE, DISTILLATION_FILE, RECORDS_DIR = "pairs.csv", "distillation.jsonl", "simulated"


@dataclass
class SimulatePairsHParams(HParams):
    run: RunHParams = field(default_factory=RunHParams)  # how it runs: device, precision, seed, outputs
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)  # the model (task.policy.initial_model)
    model: str = ""  # the model that writes the outputs (empty: task.policy.initial_model)
    labeler_model: str = ""  # the model that labels rlaif/rlcd_rescore pairs (empty: the same model)
    prompts: str = ""  # .jsonl of dialogue prefixes ending in "\n\nAssistant:" ("prompt", "text" or HH "chosen")
    method: Literal["rlcd", "rlaif", "rlcd_rescore"] = "rlcd"  # how pairs are made and labeled (see rlcd.py)
    affixes: Literal["harmless", "helpful", "offline_dialogue"] = "harmless"  # the affix pairs and principles
    indices: str = ""  # prompt indices to simulate, e.g. 17-29,35-40 (empty: all)
    indices_mod: int = 1  # simulate only the chosen indices that are indices_remainder modulo this
    indices_remainder: int = 0  # see indices_mod
    length: int = 0  # tokens sampled per output (0: task.response_length)
    temperature: float = 1.0  # sampling temperature of the outputs
    max_retries: int = 3  # samples of one output before its index is recorded as failed
    batch_size: int = 64  # outputs sampled (and label prompts read) at once

    def _validate(self):
        if not self.model and not self.task.policy.initial_model:
            raise HParamsError("no model given; pass --model=DIR (or a name under saved_models/)", key="model")
        if not self.prompts:
            raise HParamsError("no prompt file given; pass --prompts=FILE (.jsonl)", key="prompts")
        if not Path(self.prompts).is_file():
            raise HParamsError(f"{self.prompts}: no such file", key="prompts")
        for key in ("indices_mod", "max_retries", "batch_size"):
            check_count(self, key)
        check_count(self, "length", at_least=0)
        check_count(self, "indices_remainder", at_least=0, at_most=self.indices_mod - 1)
        check_number(self, "temperature", at_least=0)
        if self.indices:
            try:
                rlcd.parse_indices(self.indices)
            except ValueError as e:
                raise HParamsError(str(e), key="indices") from None

    def output_length(self) -> int:
        return self.length or self.task.response_length


def read_dialogue_prompts(path) -> list[str]:
    """The prompts of a `.jsonl` prompt file (see the module docstring); an HParamsError names
    the line of a problem."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HParamsError(f"{path}: cannot read it as UTF-8 text ({e})", key="prompts") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise HParamsError(f"{where}: invalid JSON ({e}); expected one object a line", key="prompts") from None
        field_ = next((f for f in ("prompt", "text", "chosen") if isinstance(row, dict) and f in row), None)
        if field_ is None or not isinstance(row[field_], str):
            raise HParamsError(f'{where}: expected an object with a string "prompt", "text" or "chosen"', key="prompts")
        try:
            prompt = rlcd.dialogue_prefix(row[field_]) if field_ == "chosen" else row[field_]
        except ValueError as e:
            raise HParamsError(f"{where}: {e}", key="prompts") from None
        if not prompt.endswith(ASSISTANT):
            raise HParamsError(f"{where}: the prompt must end with {ASSISTANT!r}, got ...{prompt[-30:]!r}",
                               key="prompts")
        prompts.append(prompt)
    if not prompts:
        raise HParamsError(f"{path}: holds no prompts", key="prompts")
    return prompts


def plan(hp: SimulatePairsHParams, index: int, prompt: str) -> dict:
    """The record skeleton of one index and the prompts of its two outputs (`_jobs`)."""
    rng = random.Random(hp.run.seed * 1_000_003 + index)
    pairs, principles = rlcd.AFFIXES[hp.affixes], rlcd.PRINCIPLES[hp.affixes]
    which = rng.randrange(len(pairs))
    positive, negative = rlcd.contrast_prompts(prompt, *pairs[which])
    record = {"index": index, "method": hp.method, "prompt": prompt, "status": True}
    if hp.method == "rlcd":
        record["_jobs"] = {"chosen": positive, "rejected": negative}
    elif hp.method == "rlaif":
        record.update(principle=rng.choice(principles), _jobs={"result_a": prompt, "result_b": prompt})
    else:
        flip = rng.random() < 0.5
        record.update(principle=principles[which % len(principles)], positive="b" if flip else "a",
                      _jobs={"result_a": negative if flip else positive, "result_b": positive if flip else negative})
    record["actual_prompts"] = list(record["_jobs"].values())
    return record


class Simulator:
    """The simulation as a trainer of `trainer.run_training` (no steps to checkpoint)."""

    checkpoints, steps_done, model = False, 0, None

    def __init__(self, *, run: Run, hp: SimulatePairsHParams, writer: lm_tasks.PretrainedModel,
                 labeler: ModelLabeler | None, prompts: list[str], indices: list[int]):
        self.run, self.hp, self.writer, self.labeler = run, hp, writer, labeler
        self.prompts, self.indices = prompts, indices
        self.records_dir = run.save_dir / RECORDS_DIR
        self.pairs = 0

    def sample(self, prompts: list[str], round_: int) -> list[str]:
        """One raw continuation (end-of-text kept as text) per prompt, `batch_size` at a time, each
        batch from its own generator; under torchrun batch b on rank b mod N, and every rank gets
        every text (the same texts for any N)."""
        enc, gpt, mine = self.writer.encoding, self.writer.gpt, []
        for batch, start in enumerate(range(0, len(prompts), self.hp.batch_size)):
            if batch % self.run.world_size != self.run.rank:
                continue
            contexts = [enc.encode(p) for p in prompts[start:start + self.hp.batch_size]]
            width = max(map(len, contexts))
            context = torch.tensor([[enc.padding_token] * (width - len(c)) + c for c in contexts], device=self.run.device)
            with self.run.autocast():
                out = sample_sequence(gpt, context, length=self.hp.output_length(), temperature=self.hp.temperature,
                                      pad_token=enc.padding_token,
                                      generator=self.run.generator("sample", round_ * 100_000 + batch, shared=True))
            mine.append((batch, [enc.decode(row) for row in out.tolist()]))
        return distributed.gather_batches(mine, everywhere=True)

    def generate(self, records: list[dict], bar) -> None:
        """Fill each record's outputs, sampling rejected ones again (see the module docstring)."""
        jobs = [(r, key, 0) for r in records for key in r["_jobs"]]
        round_ = 0
        while jobs:
            texts = self.sample([r["_jobs"][key] for r, key, _ in jobs], round_)
            again = []
            for (record, key, tries), text in zip(jobs, texts):
                reply = rlcd.clean_response(text)
                if reply is not None:
                    record[key] = reply
                    bar.update(1)
                elif tries + 1 >= self.hp.max_retries:
                    record["status"] = False
                    bar.update(1)
                elif record["status"]:
                    again.append((record, key, tries + 1))
            jobs = [job for job in again if job[0]["status"]]
            round_ += 1

    def train(self, logger) -> dict[str, float]:
        started = time.perf_counter()
        done = {int(p.stem) for p in self.records_dir.glob("*.json")} if self.records_dir.is_dir() else set()
        records = [plan(self.hp, i, self.prompts[i]) for i in self.indices if i not in done]
        bar = progress(total=2 * len(records), desc="simulate", unit="output")
        with self.writer.gpt.keep_decoding_weights():
            self.generate(records, bar)  # every rank samples its turns; every rank gets every output
        bar.close()
        if not self.run.is_main:  # labeling and the records: rank 0
            return {}
        labeled = [r for r in records if r["status"] and self.labeler is not None]
        if labeled:
            probs = self.labeler.win2_probs([r["prompt"] for r in labeled], [r["principle"] for r in labeled],
                                            [r["result_a"] for r in labeled], [r["result_b"] for r in labeled])
            for record, p in zip(labeled, probs):
                record["win2_prob"] = p
        for record in records:
            del record["_jobs"]
            rlcd.write_record(self.records_dir, record)
        stats = {"simulate/indices": len(records), "simulate/failed": sum(not r["status"] for r in records),
                 "simulate/skipped_done": len(done & set(self.indices)), "elapsed/s": time.perf_counter() - started}
        logger.log(0, stats)
        return stats

    def save(self, save_dir: Path) -> None:
        records = rlcd.read_records(save_dir / RECORDS_DIR, method=self.hp.method)
        pairs = rlcd.consolidate(records, method=self.hp.method, seed=self.hp.run.seed)
        self.pairs = len(pairs)
        write_pairs(save_dir / PAIRS_FILE, pairs, format="rlcd")
        if self.hp.method == "rlcd":
            rlcd.write_jsonl(save_dir / DISTILLATION_FILE, rlcd.distillation_rows(records))

    def saved(self, final: dict[str, float]) -> str:
        return f"wrote {self.pairs} pairs to {self.run.save_dir / PAIRS_FILE}"


def build_simulator(hp: SimulatePairsHParams, run: Run) -> Simulator:
    """Read the prompts, pick the indices, load the models, check that prompts and outputs fit."""
    prompts = read_dialogue_prompts(hp.prompts)
    try:
        indices = rlcd.select_indices(len(prompts), indices=hp.indices, mod=hp.indices_mod,
                                      remainder=hp.indices_remainder)
    except ValueError as e:
        raise HParamsError(f"{hp.prompts}: {e}", key="indices") from None
    writer = lm_tasks.load_pretrained(hp.model or hp.task.policy.initial_model)
    writer.gpt.to(run.device).eval()
    n_ctx = writer.gpt.config.n_ctx
    for i in indices:
        longest = max(len(writer.encoding.encode(p)) for p in plan(hp, i, prompts[i])["_jobs"].values())
        if longest + hp.output_length() - 1 > n_ctx:
            raise HParamsError(f"{hp.prompts}: prompt {i} with its affixes ({longest} tokens) and {hp.output_length()} "
                               f"output tokens exceed the context of {writer.path} ({n_ctx} tokens); pass a smaller "
                               f"--length", key="prompts")
    labeler = None
    if hp.method != "rlcd":
        judge = lm_tasks.load_pretrained(hp.labeler_model) if hp.labeler_model else writer
        try:
            labeler = ModelLabeler(judge.gpt, judge.encoding, device=run.device, batch_size=hp.batch_size)
        except LabelerError as e:
            raise HParamsError(f"{judge.path}: {e}", key="labeler_model") from None
    return Simulator(run=run, hp=hp, writer=writer, labeler=labeler, prompts=prompts, indices=indices)


def train(hp: SimulatePairsHParams, *, exp_name: str) -> Path:
    """`launch.py simulate_pairs`: write `<save_dir>/pairs.csv`; returns its path."""
    return run_training(hp, exp_name=exp_name, build=lambda run: build_simulator(hp, run),
                        outputs=(PAIRS_FILE,)) / PAIRS_FILE
