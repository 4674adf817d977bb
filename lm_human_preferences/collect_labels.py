"""Collect best-of-n labels from a scripted labeler, in the original's label-file format.

    python launch.py collect_labels offline_sentiment my_labels

For each query the initial policy samples n continuations (as the paper's labelers saw them:
truncated per the task), the labeler picks the best, and the rows are written as OpenAI's
JSON label files are (`query`, `sample0..`, `best`) — the files `train_reward` reads.
Under torchrun the ranks take turns: batch i of queries is sampled and labelled by rank
i mod world_size, with batch i's own generator, so any number of ranks writes the same labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm_human_preferences import distributed, labelers, lm_tasks, scoring
from lm_human_preferences.hparams import HParams, check_count, loaded
from lm_human_preferences.label_types import BestOfN
from lm_human_preferences.language import memory
from lm_human_preferences.labels import write_labels
from lm_human_preferences.logs import progress
from lm_human_preferences.policy import Policy
from lm_human_preferences.runtime import Run, RunHParams
from lm_human_preferences.trainer import run_training

LABELS = "labels.json"  # the output, in the run directory


@dataclass
class CollectLabelsHParams(HParams):
    run: RunHParams = field(default_factory=RunHParams)  # how it runs: device, precision, seed, outputs, checkpoints
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)  # queries, responses, initial policy
    labeler: str = "sentiment"  # sentiment, descriptiveness, a preference (e.g. friendly) or MODULE:FUNCTION
    num_labels: int = 1280  # labels to collect, one per query
    num_responses: int = 4  # best_of_<n>
    batch_size: int = 64  # queries per sampling batch

    def _validate(self):
        loaded(lambda: labelers.get_labeler(self.labeler), key="labeler")
        for key in ("num_labels", "batch_size"):
            check_count(self, key)
        check_count(self, "num_responses", at_least=2)


@torch.no_grad()
def collect(hp: CollectLabelsHParams, *, run: Run, policy: Policy, encoding, labeler) -> list[dict]:
    """The label rows, in query order, on rank 0 (every rank calls it; the others get []). Batch i
    of the query stream is this rank's when i mod world_size is its rank."""
    queries_it = lm_tasks.query_dataset(hp.task, encoding=encoding, data_dir=hp.run.data_dir,
                                        batch_size=hp.batch_size, rank=0, world_size=1, seed=hp.run.seed)
    mine: list[tuple[int, list[dict]]] = []  # (batch index, its rows)
    bar = progress(total=hp.num_labels, desc="collect_labels", unit="label")
    done, step = 0, 0
    with policy.gpt.keep_decoding_weights():  # one packing of the weights for every batch (CPU)
        while done < hp.num_labels:
            queries = next(queries_it)  # (B, Lq)
            want = min(len(queries), hp.num_labels - done)
            if step % run.world_size == run.rank:
                mine.append((step, label_batch(queries.to(run.device), hp, run=run, policy=policy, encoding=encoding,
                                               labeler=labeler, step=step, keep=want)))
            done, step = done + want, step + 1
            bar.update(want)  # rank 0 shows every rank's batches as its own go
    bar.close()
    return distributed.gather_batches(mine)


def label_batch(queries: torch.Tensor, hp: CollectLabelsHParams, *, run: Run, policy: Policy, encoding, labeler,
                step: int, keep: int) -> list[dict]:
    """The rows of the first `keep` queries of a batch (B, Lq): `num_responses` samples of each
    (the whole batch is sampled), truncated as the task shows them, and the labeler's pick. The
    generator is batch `step`'s, the same on every rank."""
    n, task = hp.num_responses, hp.task
    with run.autocast():
        responses = lm_tasks.sample_responses(policy, queries.repeat_interleave(n, 0), task=task, encoding=encoding,
                                              generator=run.generator("labels", step, shared=True))  # (B*n, Lr)
    postprocessed_responses = scoring.postprocess(responses, task=task, pad_token=encoding.padding_token)
    shown = postprocessed_responses.view(queries.shape[0], n, -1).cpu()  # (B, n, Lr)
    rows = []
    for query, samples in zip(queries[:keep].cpu().tolist(), shown):
        texts = [encoding.decode(s.tolist()) for s in samples]
        rows.append({"query": query, **{f"sample{i}": s.tolist() for i, s in enumerate(samples)},
                     "best": labeler.best_of(texts)})
    return rows


class LabelCollector:
    """`collect` as a trainer of `trainer.run_training`: no steps to checkpoint, no model to save."""

    checkpoints, steps_done, model = False, 0, None

    def __init__(self, *, run: Run, hp: CollectLabelsHParams, initial: lm_tasks.PretrainedModel, labeler):
        self.run, self.hp, self.initial, self.labeler = run, hp, initial, labeler
        self.rows: list[dict] = []

    def train(self, logger) -> dict[str, float]:
        policy = Policy(self.initial.gpt).to(self.run.device).eval()
        self.rows = collect(self.hp, run=self.run, policy=policy, encoding=self.initial.encoding, labeler=self.labeler)
        return {}

    def save(self, save_dir: Path) -> None:
        enc, task = self.initial.encoding, self.hp.task
        write_labels(save_dir / LABELS, self.rows, label_type=BestOfN(self.hp.num_responses),
                     query_length=task.query_length, response_length=task.response_length, vocab_size=enc.n_vocab,
                     pad_token=enc.padding_token)

    def saved(self, final: dict[str, float]) -> str:
        return f"wrote {len(self.rows)} labels to {self.run.save_dir / LABELS}"


def build_collector(hp: CollectLabelsHParams, run: Run) -> LabelCollector:
    """Load the initial policy and the labeler, check that a sampling batch fits; the collector."""
    initial = lm_tasks.load_pretrained(hp.task.policy.initial_model)
    lm_tasks.check_task_fits(hp.task, initial)
    rows = hp.batch_size * hp.num_responses
    lm_tasks.check_memory(run.device, [("batch_size", memory.kv_cache_bytes(
        initial.gpt.config, rows=rows, tokens=lm_tasks.context_length(hp.task, initial.encoding),
        value_bytes=2 if run.bf16 else 4), f"sampling {rows} responses at once ({hp.num_responses} a query)")])
    return LabelCollector(run=run, hp=hp, initial=initial, labeler=labelers.get_labeler(hp.labeler))


def train(hp: CollectLabelsHParams, *, exp_name: str) -> Path:
    """Write `<save_dir>/labels.json`; returns its path."""
    return run_training(hp, exp_name=exp_name, build=lambda run: build_collector(hp, run), outputs=(LABELS,)) / LABELS
