"""Query datasets: passage sources → OAI query trimming and padding → rank-sharded batches.

    passages = get_passages("books", data_dir="datasets", seed=0)   # or "my_corpus.txt"
    queries = QueryDataset(passages, encoding=enc, query_length=64, start_text=".",
                           end_text=".", batch_size=8, rank=rank, world_size=world_size)
    batch = next(queries)                     # (8, 64) LongTensor, right-padded with enc.padding_token
    state = queries.state_dict()              # resume later with load_state_dict(state)

A passage source is any iterator of strings. Local `.txt`/`.jsonl` files and the prepared
datasets written by the prep scripts (`python datasets/books.py` → `datasets/books/train.jsonl`)
are read by `PassageFile`: a seeded, reshuffled-every-epoch, infinite and resumable cycle. All
ranks must read the same source with the same seed; `QueryDataset` then gives each rank its
share of the one global query stream.

The prep scripts' shared code is in `language/prepare.py`; they write with `write_passages_jsonl`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from lm_human_preferences.language.checkpoints import atomic_writer

BUILTIN_DATASETS = ("books", "cnndm", "tldr")
PASSAGE_FILE_SUFFIXES = (".txt", ".jsonl")


class PassageFile:
    """Passages of a `.txt` (one per non-blank line) or `.jsonl` (`{"text": ...}` per line) file.

    Iterates forever; epoch `e` visits every passage once in the order of
    `np.random.default_rng(seed + e).permutation(n)`. Only line offsets are kept in memory, so
    multi-GB files are fine. `state_dict()` = `{"epoch", "index"}` (index within the epoch).
    """

    def __init__(self, path: str | os.PathLike, *, seed: int):
        self.path = Path(path)
        if self.path.suffix not in PASSAGE_FILE_SUFFIXES:
            raise ValueError(f"{self.path}: passage files must end in {' or '.join(PASSAGE_FILE_SUFFIXES)}")
        self.seed = seed
        self.offsets = _nonblank_line_offsets(self.path)  # (N,) int64 byte offsets
        if len(self.offsets) == 0:
            raise ValueError(f"{self.path} holds no passages")
        self.epoch = 0
        self.index = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation)
        self._file = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __iter__(self) -> PassageFile:
        return self

    def __next__(self) -> str:
        if self.index == len(self.offsets):
            self.epoch, self.index = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng(self.seed + self.epoch).permutation(len(self.offsets)))
        offset = int(self.offsets[self._order[1][self.index]])
        self.index += 1
        return self._read(offset)

    def _read(self, offset: int) -> str:
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(offset)
        line = self._file.readline().decode("utf-8").rstrip("\r\n")
        if self.path.suffix == ".txt":
            return line
        try:
            text = json.loads(line).get("text")
        except (json.JSONDecodeError, AttributeError):
            text = None
        if not isinstance(text, str):
            lineno = self.path.read_bytes()[:offset].count(b"\n") + 1
            raise ValueError(f"{self.path}:{lineno}: expected a JSON object with a string 'text' field")
        return text

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["index"] <= len(self.offsets):
            raise ValueError(f"passage index {state['index']} out of range for {self.path} ({len(self)} passages)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def _nonblank_line_offsets(path: Path) -> np.ndarray:
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


def _prepared_passages(name: str, *, data_dir: str | os.PathLike, split: str, seed: int) -> PassageFile:
    path = Path(data_dir) / name / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"query dataset {name!r} is not prepared: {path} does not exist. Run "
            f"`python datasets/{name}.py --split {split} --out-dir {data_dir}` to download and prepare it, "
            "or pass a local .txt/.jsonl file as the query dataset.")
    return PassageFile(path, seed=seed)


def _offline_corpus(*, data_dir: str | os.PathLike, split: str, seed: int) -> Iterator[str]:
    """The offline tasks' corpus: generated on the fly, deterministic, nothing to download."""
    from lm_human_preferences.language.offline_corpus import iter_passages
    return iter_passages(seed=seed, split=split)


def _offline_dialogue(*, data_dir: str | os.PathLike, split: str, seed: int) -> Iterator[str]:
    """The offline dialogue task's corpus (`dialogues.iter_dialogues`): generated, deterministic."""
    from lm_human_preferences.language.dialogues import iter_dialogues
    return iter_dialogues(seed=seed, split=split)


def _offline_dialogue_prompts(*, data_dir: str | os.PathLike, split: str, seed: int) -> Iterator[str]:
    """The offline dialogue task's prompts (`dialogues.iter_prompts`), the PPO queries."""
    from lm_human_preferences.language.dialogues import iter_prompts
    return iter_prompts(seed=seed, split=split)


# name -> fn(*, data_dir, split, seed) -> Iterator[str]
_REGISTRY: dict[str, Callable[..., Iterator[str]]] = {
    **{name: functools.partial(_prepared_passages, name) for name in BUILTIN_DATASETS},
    "offline_corpus": _offline_corpus, "offline_dialogue": _offline_dialogue,
    "offline_dialogue_prompts": _offline_dialogue_prompts}


def register_dataset(name: str, fn: Callable[..., Iterator[str]]) -> None:
    """Make `get_passages(name, ...)` return `fn(data_dir=..., split=..., seed=...)`.

    `fn` returns an iterator of passages (strings), infinite for training. If it has
    `state_dict`/`load_state_dict`, `QueryDataset` resumes through them; otherwise it resumes
    by skipping the passages already consumed.
    """
    if name in _REGISTRY:
        raise ValueError(f"query dataset {name!r} is already registered")
    _REGISTRY[name] = fn


def registered_datasets() -> list[str]:
    return sorted(_REGISTRY)


def get_passages(name_or_path: str | os.PathLike, *, data_dir: str | os.PathLike, split: str = "train",
                 seed: int) -> Iterator[str]:
    """Passages of a local `.txt`/`.jsonl` file, or of a registered dataset (prepared under `data_dir`)."""
    name = str(name_or_path)
    if name.endswith(PASSAGE_FILE_SUFFIXES):
        if not Path(name).is_file():
            raise FileNotFoundError(f"query dataset file {name} does not exist")
        return PassageFile(name, seed=seed)
    if name in _REGISTRY:
        return _REGISTRY[name](data_dir=data_dir, split=split, seed=seed)
    if Path(name).is_file():
        raise ValueError(f"query dataset file {name} must end in {' or '.join(PASSAGE_FILE_SUFFIXES)}")
    raise ValueError(f"unknown query dataset {name!r}: expected a local .txt/.jsonl file or one of "
                     f"{registered_datasets()}")


def _find(tokens: list[int], seq: list[int]) -> int:
    """Index of the first occurrence of `seq` in `tokens`, or -1."""
    for i in range(len(tokens) - len(seq) + 1):
        if tokens[i:i + len(seq)] == seq:
            return i
    return -1


def _rfind(tokens: list[int], seq: list[int]) -> int:
    """Index of the last occurrence of `seq` in `tokens`, or -1."""
    for i in range(len(tokens) - len(seq), -1, -1):
        if tokens[i:i + len(seq)] == seq:
            return i
    return -1


def preprocess_query(tokens: Sequence[int], *, query_length: int, start_token: Sequence[int] | None = None,
                     end_token: Sequence[int] | None = None, pad_token: int) -> list[int] | None:
    """OAI's query preprocessing (docs/original.md §4); None means "skip this passage".

    1. `start_token` (a token sequence; None/empty = off): keep the tokens after its first
       occurrence; skip if absent. As in OAI, if the sequence ends the passage (nothing after it)
       the passage is kept whole rather than emptied.
    2. Truncate to `query_length`.
    3. `end_token` (None/empty = off): cut after its last occurrence in the truncated tokens,
       keeping the end token itself; skip if absent.
    4. Skip if nothing is left; else right-pad with `pad_token` to `query_length`.
    """
    tokens = list(tokens)
    if start_token:
        start = _find(tokens, list(start_token))
        if start < 0:
            return None
        after = start + len(start_token)
        if after < len(tokens):
            tokens = tokens[after:]
    tokens = tokens[:query_length]
    if end_token:
        end = _rfind(tokens, list(end_token))
        if end < 0:
            return None
        tokens = tokens[:end + len(end_token)]
    if not tokens:
        return None
    return tokens + [pad_token] * (query_length - len(tokens))


class QueryDatasetError(ValueError):
    """A query dataset that cannot give queries as configured: a start or end text the encoding
    cannot represent, or a passage source none of whose passages survives preprocessing.
    `option` names the `QueryDataset` argument at fault (`start_text`, `end_text` or
    `passages`) and `problem` says what is wrong, so that a caller can name its own setting."""

    def __init__(self, problem: str, *, option: str):
        self.problem, self.option = problem, option
        super().__init__(f"{option}: {problem}")


NO_QUERY_LIMIT = 100_000  # skipped passages in a row that end a source of unknown size as hopeless


class QueryDataset:
    """Iterator of this rank's query batches, (batch_size, query_length) LongTensors.

    The global stream of valid queries (passages that survive `preprocess_query`, in passage
    order) is cut into global batches of `world_size * batch_size`; query `i` of a global batch
    goes to rank `i % world_size` (OAI's shard). So rank `r`'s batch equals rows `r::world_size`
    of the batch a 1-process run with `batch_size * world_size` gets. Every rank reads (and
    tokenizes) the whole stream; all ranks must use the same passage source and seed.

    `skipped` counts passages dropped by preprocessing, `passages_consumed` all passages read.
    `state_dict()` is taken between batches; `load_state_dict()` on a fresh `QueryDataset` built
    the same way makes it yield the same following batches.

    A start or end text the encoding cannot represent is a `QueryDatasetError` at once; a source
    in which no passage gives a query is one when a batch is asked for (after every passage of a
    source of known size was skipped twice, or `NO_QUERY_LIMIT` in a row otherwise).
    """

    def __init__(self, passages: Iterator[str], *, encoding, query_length: int, start_text: str | None,
                 end_text: str | None, batch_size: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        # A source that says how many passages it cycles through (PassageFile) lets a stream in
        # which no passage survives preprocessing end in an error instead of reading forever.
        self.cycle = len(passages) if hasattr(passages, "__len__") else None
        self.passages = iter(passages)
        self.encoding = encoding
        self.start_text, self.end_text = start_text, end_text
        self.query_length = query_length
        self.start_token = encoding.encode(start_text) if start_text else None
        self.end_token = encoding.encode(end_text) if end_text else None
        for option, text, tokens in (("start_text", start_text, self.start_token),
                                     ("end_text", end_text, self.end_token)):
            if tokens and encoding.decode(tokens) != text:  # e.g. a word a gpt2-subset vocabulary lacks
                raise QueryDatasetError(f"{text!r} is not in the model's vocabulary (it encodes to {tokens}, which "
                                        f"reads {encoding.decode(tokens)!r}), so no passage would match it",
                                        option=option)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.passages_consumed = 0
        self.skipped = 0
        self.skipped_in_a_row = 0

    def __iter__(self) -> QueryDataset:
        return self

    def __next__(self) -> torch.Tensor:
        queries = []
        while len(queries) < self.batch_size * self.world_size:
            text = next(self.passages)
            self.passages_consumed += 1
            query = preprocess_query(self.encoding.encode(text), query_length=self.query_length,
                                     start_token=self.start_token, end_token=self.end_token,
                                     pad_token=self.encoding.padding_token)
            if query is None:
                self.skipped += 1
                self.skipped_in_a_row += 1
                if self.skipped_in_a_row >= (2 * self.cycle if self.cycle is not None else NO_QUERY_LIMIT):
                    self._no_queries()  # with a known cycle: a whole epoch in there
            else:
                queries.append(query)
                self.skipped_in_a_row = 0
        return torch.tensor(queries[self.rank::self.world_size], dtype=torch.long)  # (B, Lq)

    def _no_queries(self):
        rules = []
        if self.start_token:
            rules.append(f"start_text={self.start_text!r} (tokens {self.start_token}) must occur in the passage")
        if self.end_token:
            rules.append(f"end_text={self.end_text!r} (tokens {self.end_token}) must occur in its first "
                         f"{self.query_length} tokens" + (" after that" if self.start_token else ""))
        option = "start_text" if self.start_token else "end_text" if self.end_token else "passages"
        which = (f"none of the {self.cycle} passages" if self.cycle is not None else
                 f"none of {self.skipped_in_a_row} passages in a row")
        raise QueryDatasetError(f"{which} of the query dataset gives a query"
                                + (f": {'; '.join(rules)}" if rules else " (they are all empty)"), option=option)

    def state_dict(self) -> dict:
        state = {"passages_consumed": self.passages_consumed, "skipped": self.skipped}
        if hasattr(self.passages, "state_dict"):
            state["passages"] = self.passages.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "passages" in state and hasattr(self.passages, "load_state_dict"):
            self.passages.load_state_dict(state["passages"])
        else:
            if self.passages_consumed:
                raise RuntimeError("load_state_dict on a QueryDataset over a plain iterator needs a fresh one")
            for _ in range(state["passages_consumed"]):
                next(self.passages)
        self.passages_consumed = state["passages_consumed"]
        self.skipped = state["skipped"]


# ---- the prepared format PassageFile reads (written by the prep scripts, language/prepare.py) ----

def write_passages_jsonl(path: str | os.PathLike, passages: Iterable[str], *, total: int | None = None) -> int:
    """Write `{"text": passage}` lines atomically (temp file in the same folder, then rename).

    Returns the number of passages written.
    """
    from tqdm import tqdm

    path = Path(path)
    count = 0
    with atomic_writer(path, "w", encoding="utf-8") as f:
        for text in tqdm(passages, total=total, desc=path.name, unit=" passages"):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            count += 1
    return count
