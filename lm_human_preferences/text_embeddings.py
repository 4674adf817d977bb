"""Sentence embeddings for the embedding diversity metric (`diversity.embedding_diversity`).

    embed = get_embedder("saved_models/offline-gpt")           # our GPT's mean hidden state
    embed = get_embedder("my_embeddings.py:embed")             # a function of yours
    embed(["a text", "another"])                                # (2, d) float array

A `MODULE:FUNCTION` (see `plugins`) is a function of yours, `fn(texts) -> (n, d)` array-like of
finite numbers: e.g. one that wraps a sentence-embedding model installed offline (the paper
uses Sentence-BERT). Anything else names a language model directory (`lm_tasks.load_pretrained`:
a converted GPT-2, an SFT model or a policy): a text's embedding is the mean over its tokens of
the model's final hidden states (after ln_f), a weaker stand-in that needs nothing installed.
Embeddings are cached per text, so a text in several sets is embedded once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lm_human_preferences import lm_tasks, plugins
from lm_human_preferences.hparams import HParamsError

Embedder = Callable[[list[str]], np.ndarray]


def cached(embed: Embedder, *, name: str) -> Embedder:
    """`embed` with a per-text cache, and its result checked to be (n, d) finite numbers."""
    cache: dict[str, np.ndarray] = {}

    def embed_cached(texts: list[str]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in cache))
        if new:
            values = np.asarray(embed(new), dtype=np.float64)
            if values.ndim != 2 or values.shape[0] != len(new) or not np.all(np.isfinite(values)):
                raise ValueError(f"embedding function {name}: expected a ({len(new)}, d) array of finite numbers, "
                                 f"got shape {values.shape}")
            cache.update(zip(new, values))
        return np.stack([cache[t] for t in texts])
    return embed_cached


def gpt_embedder(model: lm_tasks.PretrainedModel, *, batch_size: int = 32) -> Embedder:
    """The mean final hidden state of each text's tokens under `model` (an empty text: the
    end-of-text token's; a long one: its first n_ctx tokens)."""
    gpt, enc = model.gpt.eval(), model.encoding
    n_ctx, pad = gpt.config.n_ctx, enc.padding_token
    empty = [enc.eot_token if enc.eot_token is not None else 0]  # what an empty text is embedded as

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            rows = [(_tokens(enc, t) or empty)[:n_ctx] for t in texts[start:start + batch_size]]
            width = max(map(len, rows))
            tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (B, T) right-padded
            real = (tokens != pad).float()[..., None]  # (B, T, 1)
            h = gpt.hidden_states(tokens, pad_token=pad).float()  # (B, T, D)
            out.append(((h * real).sum(1) / real.sum(1)).numpy())
        return np.concatenate(out)
    return embed


def _tokens(enc, text: str) -> list[int]:
    try:
        return enc.encode(text)
    except ValueError:  # the 'test' encoding has no token for some characters: keep those it has
        return [t for c in text for t in _encodable(enc, c)]


def _encodable(enc, text: str) -> list[int]:
    try:
        return enc.encode(text)
    except ValueError:
        return []


def get_embedder(spec: str, *, key: str = "embedder") -> Embedder:
    """The cached embedding function `spec` names: MODULE:FUNCTION, or a language model directory."""
    if not spec:
        raise HParamsError("no embedding model given; pass a model directory or MODULE:FUNCTION", key=key)
    if ":" in spec and not Path(spec).is_dir():
        return cached(plugins.load_function(spec, key=key), name=spec)
    return cached(gpt_embedder(lm_tasks.load_pretrained(spec)), name=spec)
