"""Tiny components for fast end-to-end tests: a small GPT-2-shaped model with the real GPT-2
tokenizer, a small corpus, and labels decided by a simple rule.

With `encoding=small_encoding()` the model's vocabulary is only the GPT-2 tokens of the corpus
(64 instead of 50257; text is still split by GPT-2 BPE): sampling and training then run about
an order of magnitude faster, which tests that need many samples or steps use."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from lm_human_preferences.labels import write_labels
from lm_human_preferences.label_types import get_label_type
from lm_human_preferences.language.checkpoints import save_model
from lm_human_preferences.language.encodings import Encoding, SubsetEncoding, get_encoding
from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.train_sft import lm_loss

WORDS = ("the cat dog sat ran on a mat far away happy sad good bad big small red blue house tree "
         "walked jumped slept ate quickly slowly and then").split()


def small_encoding() -> SubsetEncoding:
    """GPT-2 BPE restricted to the tokens of `make_corpus` texts: each of `WORDS` with and without
    a leading space, and '.'."""
    return SubsetEncoding.from_texts([" " + " ".join(WORDS) + ".", *WORDS])


def make_model(path: Path, *, seed: int = 0, n_embd: int = 16, n_layer: int = 2, n_head: int = 2,
               n_ctx: int = 64, encoding: Encoding | None = None) -> Path:
    """A random GPT-2-shaped model; its vocabulary is that of `encoding` (default: GPT-2's)."""
    encoding = encoding or get_encoding("gpt2")
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_vocab=encoding.n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_head=n_head, n_layer=n_layer))
    return save_model(path, gpt=gpt, meta={"kind": "gpt", "encoding": encoding.to_meta()})


def make_corpus(path: Path, *, n: int = 200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(4)]
        lines.append(". ".join(sentences) + ".")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_best_of_4_labels(path: Path, *, n: int, query_length: int, response_length: int, target: str = " good",
                          seed: int = 0, unique_best: bool = False, encoding: Encoding | None = None) -> Path:
    """Best = the sample with the most `target` tokens (ties: the first). About 30% of rows are
    such ties, which no reward model can get right more than by chance; `unique_best` redraws
    them, so a reward model that learns the rule can reach 100% accuracy. Token ids are those of
    `encoding` (default: GPT-2's)."""
    enc = encoding or get_encoding("gpt2")
    tok = enc.encode(target)[0]
    vocab = [enc.encode(" " + w)[0] for w in WORDS]
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        query = [rng.choice(vocab) for _ in range(query_length)]
        samples = []
        for _ in range(4):
            p = rng.random() * 0.5
            samples.append([tok if rng.random() < p else rng.choice(vocab) for _ in range(response_length)])
        counts = [s.count(tok) for s in samples]
        if unique_best and counts.count(max(counts)) > 1:
            continue
        rows.append({"query": query, **{f"sample{i}": s for i, s in enumerate(samples)},
                     "best": counts.index(max(counts))})
    write_labels(path, rows, label_type=get_label_type("best_of_4"), query_length=query_length,
                 response_length=response_length, vocab_size=enc.n_vocab, pad_token=enc.padding_token)
    return path


def task_overrides(model: Path, corpus: Path, *, query_length: int = 8, response_length: int = 6) -> dict:
    return {"task.query_length": query_length, "task.response_length": response_length,
            "task.query_dataset": str(corpus), "task.start_text": ".", "task.end_text": None,
            "task.truncate_token": None, "task.policy.temperature": 0.7,
            "task.policy.initial_model": str(model)}


def bf16_lm_step(model: GPT, batch: dict, *, pad_token: int, backward_in_autocast: bool) -> list[torch.Tensor]:
    """One bf16-autocast next-token loss step of `model` on `batch`, the backward pass inside
    autocast (as reward training runs it) or after it (train_sft, PPO): the loss and every
    parameter's gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(model, batch, pad_token=pad_token)
        if backward_in_autocast:
            loss.backward()
    if not backward_in_autocast:
        loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]
