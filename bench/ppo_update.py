"""The PPO update sections of `bench/run.py`: `ppo` (seconds per phase of `PPOTrainer.step` on the
offline task) and `ppo_scale` (the update at the sentiment task's scale), and their table."""

from __future__ import annotations

import copy
import gc
import itertools
import tempfile
from pathlib import Path
from typing import Callable

import torch

from bench.common import (OthersCpu, describe, fmt_cores, fmt_others, load_average, model_config, now,
                          ppo_update_flops, table)

ROOT = Path(__file__).resolve().parents[1]


# ---- PPO update breakdown ------------------------------------------------------------------

PPO_PHASES = ["queries", "sample", "analyze_policy", "analyze_ref", "score", "train"]


class _TimedQueries:
    """Wraps the trainer's query iterator to time `next()` (query loading and tokenisation)."""

    def __init__(self, inner, clock: dict, dev: torch.device):
        self.inner, self.clock, self.dev = inner, clock, dev

    def __iter__(self):
        return self

    def __next__(self):
        t0 = now(self.dev)
        try:
            return next(self.inner)
        finally:
            self.clock["queries"] = self.clock.get("queries", 0.0) + now(self.dev) - t0

    def state_dict(self):
        return self.inner.state_dict()


def _timed(fn, clock: dict, name: str, dev: torch.device):
    def wrapper(*args, **kwargs):
        t0 = now(dev)
        try:
            return fn(*args, **kwargs)
        finally:
            clock[name] = clock.get(name, 0.0) + now(dev) - t0
    return wrapper


def _instrument(trainer, clock: dict, dev: torch.device) -> None:
    """Make `trainer.step` add the seconds of each phase (PPO_PHASES) to `clock`: wraps
    `policy.respond`, `analyze` (per model), the score function, `train_minibatch` and the
    query iterator. Each phase starts and ends with a device sync, so GPU work is charged to the
    phase that queued it."""
    trainer.queries = _TimedQueries(trainer.queries, clock, dev)
    trainer.score_fn = _timed(trainer.score_fn, clock, "score", dev)
    trainer.policy.respond = _timed(trainer.policy.respond, clock, "sample", dev)
    analyze = trainer.analyze

    def timed_analyze(policy, *args, **kwargs):
        name = "analyze_policy" if policy is trainer.policy else "analyze_ref"
        return _timed(analyze, clock, name, dev)(policy, *args, **kwargs)

    trainer.analyze = timed_analyze
    trainer.train_minibatch = _timed(trainer.train_minibatch, clock, "train", dev)


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _measure_ppo(hp, *, gpt, encoding, make_queries: Callable, updates: int, dev: torch.device, label: str) -> dict:
    """The phases of the median one of `updates` PPO updates (by total time; the later of the two
    middle ones for an even count), after one warm-up update: one update's phases, which add up
    to no more than its total, as per-phase medians need not. For `train_policy.PPOTrainer`
    built as `train_policy.train` builds it: a policy and a frozen reference from `gpt`, a reward
    model on a copy of the same trunk, queries from `make_queries(hp)`. On cuda, also the peak
    memory allocated."""
    from lm_human_preferences import train_policy
    from lm_human_preferences.policy import Policy
    from lm_human_preferences import scoring
    from lm_human_preferences.rewards import RewardModel
    from lm_human_preferences.runtime import Run

    with tempfile.TemporaryDirectory() as tmp:
        hp.run.save_dir = tmp
        hp.validate()
        run = Run(hp.run, exp_name="bench_ppo", config=hp)
        try:
            reward_model = run.place(RewardModel(copy.deepcopy(gpt))).eval().requires_grad_(False)
            scorer = scoring.reward_model_scorer(reward_model, pad_token=encoding.padding_token, autocast=run.autocast)
            score_fn = scoring.make_score_fn(task=hp.task, pad_token=encoding.padding_token, scorer=scorer)
            trainer = train_policy.PPOTrainer(run=run, hp=hp, policy=Policy(copy.deepcopy(gpt)),
                                              ref_policy=Policy(copy.deepcopy(gpt)), score_fn=score_fn,
                                              encoding=encoding, queries=make_queries(hp))
            clock: dict[str, float] = {}
            _instrument(trainer, clock, dev)
            if dev.type == "cuda":
                gc.collect()  # an earlier measurement's trainer (reference cycles) still holds GPU memory
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            steps = []
            watch = OthersCpu()
            for i in range(updates + 1):  # the first update is a warm-up
                clock.clear()
                graphs = compiled_graphs()
                t0 = now(dev)
                trainer.step()
                total = now(dev) - t0
                if i > 0:  # with --compile, a graph first needed now (e.g. a new mask kind) compiles in here
                    steps.append({**clock, "total": total, "compiled_graphs": compiled_graphs() - graphs})
            others = watch.cores()
            peak_memory = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        finally:
            run.close()
    mid = sorted(steps, key=lambda s: s["total"])[len(steps) // 2]
    med = {k: mid.get(k, 0.0) for k in PPO_PHASES + ["total"]}
    med["other"] = max(0.0, med["total"] - sum(med[k] for k in PPO_PHASES))
    compiling = sum(s["compiled_graphs"] > 0 for s in steps)
    row = dict(batch_size=hp.ppo.batch_size, nminibatches=hp.ppo.nminibatches, noptepochs=hp.ppo.noptepochs,
               query_length=hp.task.query_length, response_length=hp.task.response_length, dtype=hp.run.dtype,
               seconds=med, share={k: med[k] / med["total"] for k in PPO_PHASES + ["other"]},
               episodes_per_s=hp.ppo.batch_size / med["total"], steps=steps, load=load_average(), others_cores=others,
               timed_updates_that_compiled=compiling)
    if peak_memory is not None:
        row["max_memory_allocated"] = peak_memory
    print(f"  {label}: {med['total']:.3f} s/update ({row['episodes_per_s']:.1f} episodes/s)  " +
          "  ".join(f"{k} {med[k] / med['total']:.0%}" for k in PPO_PHASES + ["other"]) +
          (f"  peak memory {peak_memory / 2 ** 30:.2f} GiB" if peak_memory is not None else "") +
          (f"  ({compiling} timed updates compiled graphs)" if compiling else "") +
          f"  (other processes {fmt_cores(others)})", flush=True)
    return row


def _offline_setup(quick: bool):
    """(gpt, encoding, source) for the offline task: the cached base model when it exists, else a
    random GPT of the same shape with the offline corpus' gpt2-subset vocabulary."""
    from lm_human_preferences import lm_tasks
    from lm_human_preferences.language.encodings import SubsetEncoding
    from lm_human_preferences.language.gpt import GPT, GPTConfig
    from lm_human_preferences.language.offline_corpus import iter_passages

    path = ROOT / "saved_models" / "offline-gpt"
    if (path / "config.json").is_file():
        pre = lm_tasks.load_pretrained(str(path))
        return pre.gpt, pre.encoding, str(path.relative_to(ROOT))
    encoding = SubsetEncoding.from_texts(list(itertools.islice(iter_passages(seed=1), 500 if quick else 5000)))
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_vocab=encoding.n_vocab, n_ctx=64, n_embd=64, n_head=4, n_layer=2))
    return gpt, encoding, "random GPT (n_layer=2, n_embd=64, n_head=4, n_ctx=64), gpt2-subset vocabulary"


def _policy_hparams(task: str, overrides: dict):
    """TrainPolicyHParams as `launch.py train_policy <task>` resolves them, then `overrides`."""
    import params
    from lm_human_preferences import train_policy

    hp = train_policy.TrainPolicyHParams()
    hp.override_from_dict({f"task.{k}": v for k, v in params.TASKS[task].items()})
    hp.override_from_dict(params.TRAIN_POLICY[task])
    hp.override_from_dict({"task.policy.initial_model": "unused", "run.wandb": "off", "run.resume": "never",
                           **overrides})
    return hp


def bench_ppo(sz: dict, dev: torch.device) -> dict:
    from lm_human_preferences import lm_tasks

    gpt, encoding, source = _offline_setup(sz["ppo_batch"] is not None)
    results = {"model": source, "config": gpt.config.to_dict(), "precisions": {}}
    for prec in ("fp32", "bf16"):
        hp = _policy_hparams("offline_sentiment",
                             {"run.device": str(dev), "run.dtype": prec, "run.compile": sz["compile"]})
        if sz["ppo_batch"] is not None:
            hp.override_from_dict({"ppo.batch_size": sz["ppo_batch"], "ppo.nminibatches": sz["ppo_nminibatches"],
                                   "ppo.noptepochs": sz["ppo_noptepochs"]})
        hp.override_from_dict({"ppo.total_episodes": hp.ppo.batch_size * (sz["ppo_updates"] + 1)})

        def make_queries(hp):
            return lm_tasks.query_dataset(hp.task, encoding=encoding, data_dir=str(ROOT / "datasets"),
                                          batch_size=hp.ppo.batch_size, rank=0, world_size=1, seed=hp.run.seed)

        results["precisions"][prec] = _measure_ppo(hp, gpt=gpt, encoding=encoding, make_queries=make_queries,
                                                   updates=sz["ppo_updates"], dev=dev, label=f"ppo {prec}")
    return results


# ---- PPO update at the sentiment task's scale -------------------------------------------------

class _TokenIds:
    """The encoding of synthetic queries: token ids with the library's padding token (n_vocab + 2,
    outside the vocabulary) and no text (the sentiment task has no query prefix or suffix)."""

    def __init__(self, n_vocab: int):
        self.n_vocab, self.padding_token = n_vocab, n_vocab + 2

    def encode(self, text: str) -> list[int]:
        if text:
            raise ValueError(f"synthetic token-id queries cannot encode text ({text!r})")
        return []

    def decode(self, tokens) -> str:
        return " ".join(str(int(t)) for t in tokens)


class _RandomQueries:
    """An endless stream of (batch, length) random token-id query batches, in place of a dataset
    (books is a download; throughput does not depend on what the tokens say)."""

    def __init__(self, *, batch: int, length: int, n_vocab: int, seed: int = 0):
        self.shape, self.n_vocab = (batch, length), n_vocab
        self.gen = torch.Generator().manual_seed(seed)  # on the CPU, as a dataset's batches: the trainer moves them
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        self.batches += 1
        return torch.randint(0, self.n_vocab, self.shape, generator=self.gen)

    def state_dict(self) -> dict:
        return {"batches": self.batches}


def bench_ppo_scale(sz: dict, dev: torch.device) -> dict:
    """The PPO update of `launch.py train_policy sentiment` on one device (params.py's presets: batch
    512, 1 minibatch x 4 epochs, query 64, response 24, temperature 0.7), bf16 on cuda, fp32 on cpu;
    random weights and random-token queries."""
    from lm_human_preferences.language.gpt import GPT

    s = sz["scale"]
    cfg = model_config(s["model"])
    prec = "bf16" if dev.type == "cuda" else "fp32"
    hp = _policy_hparams("sentiment", {"run.device": str(dev), "run.dtype": prec, "run.compile": sz["compile"],
                                       "ppo.batch_size": s["batch"], "task.query_length": s["query"],
                                       "task.response_length": s["response"]})
    hp.task.truncate_after = min(hp.task.truncate_after, hp.task.response_length)  # 16 > the --quick response
    torch.manual_seed(0)
    gpt = GPT(cfg)
    encoding = _TokenIds(cfg.n_vocab)

    def make_queries(hp):
        return _RandomQueries(batch=hp.ppo.batch_size, length=hp.task.query_length, n_vocab=cfg.n_vocab)

    row = _measure_ppo(hp, gpt=gpt, encoding=encoding, make_queries=make_queries, updates=sz["ppo_updates"], dev=dev,
                       label=f"ppo_scale {prec}")
    flops = ppo_update_flops(cfg, batch=hp.ppo.batch_size, query=hp.task.query_length,
                             response=hp.task.response_length, noptepochs=hp.ppo.noptepochs)
    row.update(model_flops=flops, ours_flops_per_s=flops / row["seconds"]["total"])
    name = s["model"] if isinstance(s["model"], str) else ", ".join(f"{k} {v}" for k, v in s["model"].items())
    return {"model": f"random GPT-2 {name}", "config": cfg.to_dict(), "device": dev.type, "device_name": describe(dev),
            "queries": "random token ids", "precisions": {prec: row}}


def ppo_table(title: str, s: dict) -> str:
    """Seconds and share of each phase of a PPO update (`_measure_ppo` rows), per precision."""
    rows = []
    for p, r in s["precisions"].items():
        rows += [[p, k, f"{r['seconds'][k]:.3f}", f"{r['share'][k]:.1%}" if k != "total" else "100%"]
                 for k in PPO_PHASES + ["other", "total"]]
    for p, r in s["precisions"].items():
        rows.append([p, "(episodes/s)", f"{r['episodes_per_s']:.1f}", ""])
        if "ours_flops_per_s" in r:
            rows.append([p, "(model GFLOP/s, see ppo_update_flops)", f"{r['ours_flops_per_s'] / 1e9:.1f}", ""])
        if "max_memory_allocated" in r:
            rows.append([p, "(peak GPU memory allocated)", f"{r['max_memory_allocated'] / 2 ** 30:.2f} GiB", ""])
        rows.append([p, "(other processes' CPU)", fmt_others(r), ""])
    first = next(iter(s["precisions"].values()))
    return table(f"{title} ({s['model']}; batch {first['batch_size']}, {first['nminibatches']} minibatches x "
                 f"{first['noptepochs']} epochs, query {first['query_length']}, response {first['response_length']})",
                 ["precision", "phase", "seconds", "share"], rows)
