"""Language-model training: pretraining on passages, or supervised fine-tuning on prompts and
responses, with the same DDP / bf16 / checkpoint / metrics machinery as the RLHF trainers.

    python launch.py train_sft offline_sentiment my_lm                     # from scratch
    python launch.py train_sft sentiment my_sft --data=pairs.jsonl --initial_model=gpt2

`data` is a dataset name or a local file. Plain passages (`.txt`, or `.jsonl` with `text`) are
packed into rows of `seq_length + 1` tokens separated by end-of-text, and every token is
trained on. A `.jsonl` whose rows have `prompt` and `response` is prompt/response data: one
row per example, the loss only on response tokens (and the end-of-text after them).
From scratch, `encoding=gpt2-subset` restricts GPT-2 BPE to the tokens the corpus uses
(see `SubsetEncoding`), which makes tiny models on CPU practical. `freeze_layers=0.8` trains
only the top 20% of the blocks (`freezing.py`; Kirk et al. 2023 fine-tune so); the result is a
language model like any other, the initial model of reward model training or PPO.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from lm_human_preferences import distributed, lm_tasks
from lm_human_preferences.freezing import freeze_layers, trainable
from lm_human_preferences.adapters import LoRAHParams, attach, save_model
from lm_human_preferences.hparams import HParams, HParamsError, check_count, check_number
from lm_human_preferences.language import memory
from lm_human_preferences.language.datasets import get_passages
from lm_human_preferences.language.encodings import Encoding, SubsetEncoding, get_encoding
from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.logs import progress
from lm_human_preferences.optim import TFAdam
from lm_human_preferences.runtime import Run, RunHParams
from lm_human_preferences.trainer import accumulate_and_step, run_training


@dataclass
class ModelShape(HParams):
    """The model trained from scratch when no `initial_model` is given."""

    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 64  # width of the residual stream
    n_ctx: int = 128  # context length in tokens

    def _validate(self):
        for key in ("n_layer", "n_head", "n_embd", "n_ctx"):
            check_count(self, key)
        if self.n_embd % self.n_head:
            raise HParamsError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}", key="n_head")


@dataclass
class TrainSFTHParams(HParams):
    run: RunHParams = field(default_factory=RunHParams)  # how it runs: device, precision, seed, outputs, checkpoints
    data: str = "offline_corpus"  # a dataset name or file: passages (.txt, .jsonl text) or prompt/response .jsonl
    initial_model: str = ""  # a model directory; empty: from scratch with `model` and `encoding`
    model: ModelShape = field(default_factory=ModelShape)  # the shape of a model trained from scratch
    encoding: Literal["gpt2", "gpt2-subset"] = "gpt2"  # from scratch; gpt2-subset: the GPT-2 tokens the data uses
    vocab_passages: int = 20000  # passages read to build a gpt2-subset vocabulary
    seq_length: int = 64  # tokens per training row
    batch_size: int = 32  # sequences per step, across all ranks
    micro_batch_size: Optional[int] = None  # per rank; gradient accumulation when smaller
    steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak learning rate: linear warmup, then cosine decay to 10%
    warmup_steps: int = 50  # steps of linear learning-rate warmup
    eval_interval: int = 100  # steps between held-out evaluations
    eval_batches: int = 4  # held-out batches per evaluation
    freeze_layers: float = 0.0  # fraction of the blocks, from the input, that do not train (with wpe); see freezing.py
    freeze_embeddings: bool = False  # also freeze the token embeddings, which are the tied LM head
    lora: Optional[LoRAHParams] = None  # train low-rank adapters only (adapters.py); off: every weight

    def _validate(self):
        for key in ("seq_length", "batch_size", "steps", "eval_interval", "eval_batches", "vocab_passages"):
            check_count(self, key)
        check_count(self, "warmup_steps", at_least=0)
        if self.micro_batch_size is not None:  # None: no gradient accumulation
            check_count(self, "micro_batch_size")
        check_number(self, "lr", above=0)
        check_number(self, "freeze_layers", at_least=0, at_most=1)


class PackedText:
    """Passages -> rows of `length + 1` tokens, end-of-text between passages; resumable."""

    def __init__(self, passages, *, encoding: Encoding, length: int, batch_size: int, rank: int, world_size: int):
        self.passages, self.encoding = passages, encoding
        self.length, self.batch_size, self.rank, self.world_size = length, batch_size, rank, world_size
        self.buffer: list[int] = []
        self.consumed = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        need = (self.length + 1) * self.batch_size * self.world_size
        sep = [] if self.encoding.eot_token is None else [self.encoding.eot_token]
        while len(self.buffer) < need:
            self.buffer += self.encoding.encode(next(self.passages)) + sep
            self.consumed += 1
        rows = torch.tensor(self.buffer[:need]).view(-1, self.length + 1)[self.rank::self.world_size]
        self.buffer = self.buffer[need:]
        return {"tokens": rows, "mask": torch.ones(rows.shape[0], self.length, dtype=torch.bool)}

    def state_dict(self) -> dict:
        state = {"consumed": self.consumed, "buffer": torch.tensor(self.buffer, dtype=torch.long)}
        if hasattr(self.passages, "state_dict"):
            state["passages"] = self.passages.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "passages" in state:
            self.passages.load_state_dict(state["passages"])
        else:
            for _ in range(state["consumed"]):
                next(self.passages)
        self.consumed, self.buffer = state["consumed"], state["buffer"].tolist()


class PromptResponses:
    """Rows of a prompt/response `.jsonl`, cycled in a seeded order; loss on response tokens."""

    def __init__(self, path: Path, *, encoding: Encoding, length: int, batch_size: int, rank: int,
                 world_size: int, seed: int):
        self.examples = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise HParamsError(f"{path}: line {i}: invalid JSON ({e})", key="data") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                    or not isinstance(row.get("response"), str):
                raise HParamsError(f"{path}: line {i}: expected string fields 'prompt' and 'response'", key="data")
            self.examples.append((encoding.encode(row["prompt"]),
                                  encoding.encode(row["response"]) + ([] if encoding.eot_token is None
                                                                      else [encoding.eot_token])))
        self.encoding, self.length, self.seed = encoding, length, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.position = 0

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        n = self.batch_size * self.world_size
        picks = [self._order(p // len(self.examples))[p % len(self.examples)] for p in range(self.position, self.position + n)]
        self.position += n
        pad = self.encoding.padding_token
        tokens = torch.full((n, self.length + 1), pad)
        mask = torch.zeros(n, self.length, dtype=torch.bool)
        for row, i in enumerate(picks):
            prompt, response = self.examples[int(i)]
            seq = (prompt + response)[:self.length + 1]
            tokens[row, :len(seq)] = torch.tensor(seq)
            mask[row, max(len(prompt) - 1, 0):len(seq) - 1] = True  # positions predicting response tokens
        return {"tokens": tokens[self.rank::self.world_size], "mask": mask[self.rank::self.world_size]}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def is_prompt_response_file(data: str) -> bool:
    path = Path(data)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open() as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        return {"prompt", "response"} <= set(json.loads(first))
    except (json.JSONDecodeError, TypeError):
        return False


def lm_loss(model, batch: dict[str, torch.Tensor], *, pad_token: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked positions. `model`: a GPT, or DDP around one
    (the blocks run through its forward; the LM head and the loss, in chunks, through
    `GPT.lm_loss`, which never holds every position's logits)."""
    tokens, mask = batch["tokens"], batch["mask"]
    hidden = model(tokens[:, :-1], pad_token=pad_token, logits=False).hidden  # (B, T, D)
    targets = tokens[:, 1:].masked_fill(~mask, -100)
    return getattr(model, "module", model).lm_loss(hidden, targets)


def read_passages(hp: TrainSFTHParams, *, split: str = "train"):
    try:
        return get_passages(hp.data, data_dir=hp.run.data_dir, split=split, seed=hp.run.seed)
    except ValueError as e:  # not a .txt/.jsonl file nor a registered dataset
        raise HParamsError(str(e), key="data") from None


def initial_model(hp: TrainSFTHParams, run: Run) -> tuple[GPT, Encoding]:
    """The model to train: `initial_model`, or a new one of shape `model` (refused before it is
    built when it cannot fit in memory with its gradients and optimizer state)."""
    if hp.initial_model:
        pre = lm_tasks.load_pretrained(hp.initial_model)
        return pre.gpt, pre.encoding
    if hp.encoding == "gpt2-subset":
        encoding = SubsetEncoding.from_texts(list(itertools.islice(read_passages(hp), hp.vocab_passages)))
    else:
        encoding = get_encoding(hp.encoding)
    m = hp.model
    config = GPTConfig(n_vocab=encoding.n_vocab, n_ctx=m.n_ctx, n_embd=m.n_embd, n_head=m.n_head, n_layer=m.n_layer)
    lm_tasks.check_memory(run.device, [("model", memory.training_parameters_bytes(config),
                                        f"training a model of {m.n_layer} layers of width {m.n_embd}")])
    torch.manual_seed(hp.run.seed)
    return GPT(config), encoding


def make_batches(hp: TrainSFTHParams, *, encoding: Encoding, run: Run, split: str, per_rank: int):
    if is_prompt_response_file(hp.data):
        return PromptResponses(Path(hp.data), encoding=encoding, length=hp.seq_length, batch_size=per_rank,
                               rank=run.rank, world_size=run.world_size,
                               seed=hp.run.seed + (0 if split == "train" else 1))
    return PackedText(read_passages(hp, split=split), encoding=encoding, length=hp.seq_length, batch_size=per_rank,
                      rank=run.rank, world_size=run.world_size)


def lr_at(hp: TrainSFTHParams, step: int) -> float:
    """Linear warmup, then cosine decay to 10% of `lr`."""
    if step < hp.warmup_steps:
        return hp.lr * (step + 1) / hp.warmup_steps
    progress_ = (step - hp.warmup_steps) / max(1, hp.steps - hp.warmup_steps)
    return hp.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0))))


class SFTTrainer:
    """Next-token training of `gpt` on this rank's `make_batches` rows, `micro` rows at a time."""

    checkpoints = True  # see trainer.run_training

    def __init__(self, *, run: Run, hp: TrainSFTHParams, gpt: GPT, encoding: Encoding, per_rank: int, micro: int):
        self.run, self.hp, self.encoding, self.per_rank, self.micro = run, hp, encoding, per_rank, micro
        freeze_layers(gpt, hp.freeze_layers, embeddings=hp.freeze_embeddings)
        self.model = run.place(gpt)
        self.ddp_model = run.ddp(self.model)
        self.train_data = make_batches(hp, encoding=encoding, run=run, split="train", per_rank=per_rank)
        self.optimizer = TFAdam(trainable(self.model), lr=hp.lr)
        self.step = 0

    @property
    def steps_done(self) -> int:
        return self.step

    def train_step(self, batch: dict[str, torch.Tensor], lr: float) -> dict[str, float] | None:
        """One optimizer step on this rank's `batch`, in micro-batches; None if it was skipped. The
        loss runs under autocast, its backward pass outside it."""
        def loss_of(m: int) -> dict[str, torch.Tensor]:
            sl = slice(m * self.micro, (m + 1) * self.micro)
            with self.run.autocast():
                return {"loss": lm_loss(self.ddp_model, {k: v[sl] for k, v in batch.items()},
                                        pad_token=self.encoding.padding_token)}

        return accumulate_and_step(self.run, model=self.ddp_model, optimizer=self.optimizer, lr=lr,
                                   n_micro=self.per_rank // self.micro, loss_of=loss_of, step=self.step + 1)

    def train(self, logger) -> dict[str, float]:
        hp, run = self.hp, self.run
        stats: dict[str, float] = {}
        with progress(total=hp.steps, desc="train_sft", enabled=run.is_main, unit="step") as bar:
            bar.update(self.step)
            while self.step < hp.steps:
                lr = lr_at(hp, self.step)
                batch = {k: v.to(run.device) for k, v in next(self.train_data).items()}
                out = self.train_step(batch, lr)
                self.step += 1
                stats = distributed.all_reduce_stats({"train/loss": out["loss"]} if out else {}, device=run.device)
                stats["train/lr"] = lr
                if run.hp.skip_nonfinite:
                    stats["run/skipped_batches"] = run.skipped_batches
                bar.set_postfix({"loss": f"{stats.get('train/loss', math.nan):.3f}"}, refresh=False)
                bar.update(1)
                if self.step % hp.eval_interval == 0 or self.step == hp.steps:
                    stats.update(evaluate(hp, self.model, encoding=self.encoding, run=run, per_rank=self.per_rank))
                if self.step % run.hp.log_interval == 0 or self.step == hp.steps or "eval/loss" in stats:
                    logger.log(self.step, stats)
                run.step_boundary(self.step, hp.steps, self.state_dict)
        return stats

    def state_dict(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "data": self.train_data.state_dict(), **self.run.guard_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_data.load_state_dict(state["data"])
        self.run.load_guard_state(state)
        self.step = state["step"]

    def save(self, save_dir: Path) -> None:
        save_model(save_dir, gpt=self.model, meta={"kind": "gpt", "encoding": self.encoding.to_meta()},
                   lora_hp=self.hp.lora, base=self.hp.initial_model)

    def saved(self, final: dict[str, float]) -> str:
        return f"language model saved to {self.run.save_dir}"


def build_trainer(hp: TrainSFTHParams, run: Run) -> SFTTrainer:
    """The model to train (see `initial_model`) and the batch layout, checked; the trainer."""
    gpt, encoding = initial_model(hp, run)
    attach(gpt, hp.lora, seed=hp.run.seed)
    if hp.seq_length > gpt.config.n_ctx:
        raise HParamsError(f"longer than the model's context ({gpt.config.n_ctx})", key="seq_length")
    per_rank = run.per_rank(hp.batch_size, "batch_size")
    micro = min(hp.micro_batch_size or per_rank, per_rank)
    if per_rank % micro:
        raise HParamsError(f"per-rank batch {per_rank} is not a multiple of {micro}", key="micro_batch_size")
    lm_tasks.check_memory(run.device, [(  # no logits: lm_loss holds one chunk of them at a time
        "micro_batch_size" if hp.micro_batch_size else "batch_size",
        memory.training_bytes(gpt.config, rows=micro, tokens=hp.seq_length, value_bytes=2 if run.bf16 else 4,
                              logits=False),
        f"a training micro-batch of {micro} sequences (--micro_batch_size accumulates smaller ones)")])
    return SFTTrainer(run=run, hp=hp, gpt=gpt, encoding=encoding, per_rank=per_rank, micro=micro)


def train(hp: TrainSFTHParams, *, exp_name: str) -> Path:
    return run_training(hp, exp_name=exp_name, build=lambda run: build_trainer(hp, run))


@torch.no_grad()
def evaluate(hp: TrainSFTHParams, model: GPT, *, encoding: Encoding, run: Run, per_rank: int) -> dict[str, float]:
    """Loss on the first `eval_batches` batches of the held-out split (the same batches each time)."""
    split = "train" if is_prompt_response_file(hp.data) else "valid"
    try:
        data = make_batches(hp, encoding=encoding, run=run, split=split, per_rank=per_rank)
    except FileNotFoundError:
        return {}
    total = 0.0
    for _ in range(hp.eval_batches):
        batch = {k: v.to(run.device) for k, v in next(data).items()}
        with run.autocast():
            total += float(lm_loss(model, batch, pad_token=encoding.padding_token))
    return distributed.all_reduce_stats({"eval/loss": total / hp.eval_batches}, device=run.device)
