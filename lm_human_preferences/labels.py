"""Label files in OpenAI's JSON format: read + validate, write atomically, download + cache.

A label file is a JSON list of objects, one per label, with exactly the fields of the label
type's schema (docs/original.md §8), e.g. best_of_4:
    {"query": [Lq token ids], "sample0".."sample3": [Lr token ids], "best": 0..3}
Token ids are GPT-2 BPE ids, padded with the pad token (50259, outside the vocab).

Every row is checked before anything is returned; an error names the file, the row, the field,
what was expected and what was found.
"""

import http.client
import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from lm_human_preferences.label_types import LabelType
from lm_human_preferences.language.checkpoints import atomic_write_bytes, atomic_writer

OAI_LABEL_URL_BASE = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels/"

FLOAT32_MAX = 3.4028234663852886e38


class LabelFileError(ValueError):
    """A label file is missing, unreadable, malformed or fails validation."""


class _JsonLiteral:
    """A NaN / Infinity / -Infinity literal in the JSON: kept so validation can name its row."""

    def __init__(self, literal: str):
        self.literal = literal


def _describe(value) -> str:
    if isinstance(value, _JsonLiteral):
        return f"the JSON literal {value.literal}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (list, dict)):
        count = len(value)
        noun = ("item" if isinstance(value, list) else "field") + ("" if count == 1 else "s")
        return f"{'a list' if isinstance(value, list) else 'an object'} of {count} {noun}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_int(value) -> bool:
    return type(value) is int  # excludes bool


def _is_finite_number(value) -> bool:
    """An int or float that a float32 tensor holds as a finite number."""
    try:
        return type(value) in (int, float) and abs(float(value)) <= FLOAT32_MAX
    except OverflowError:  # an int too large for a float
        return False


def _validate(rows, *, where: str, label_type: LabelType, query_length: int, response_length: int,
              vocab_size: int, pad_token: int) -> None:
    """Raise LabelFileError at the first problem; `where` is the file named in messages."""
    schema = label_type.label_schema(query_length=query_length, response_length=response_length)
    expected = ", ".join(schema)
    if not isinstance(rows, list):
        raise LabelFileError(f"{where}: expected a JSON list of label objects, got {_describe(rows)}")
    if not rows:
        raise LabelFileError(f"{where}: expected at least one label row, got an empty list")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LabelFileError(f"{where}: row {i}: expected an object with fields {expected}, got {_describe(row)}")
        for field in row:
            if field not in schema:
                raise LabelFileError(f"{where}: row {i}, field {field!r}: unexpected field (expected exactly {expected})")
        for field, (kind, shape) in schema.items():
            if field not in row:
                raise LabelFileError(f"{where}: row {i}, field {field!r}: missing (expected exactly {expected})")
            problem = _check_value(row[field], kind=kind, shape=shape, field=field, label_type=label_type,
                                   vocab_size=vocab_size, pad_token=pad_token)
            if problem:
                raise LabelFileError(f"{where}: row {i}, field {field!r}: {problem}")


def _check_value(value, *, kind, shape, field, label_type, vocab_size, pad_token) -> str | None:
    """None if `value` fits (kind, shape), else 'expected ..., got ...'."""
    if kind == "tokens":
        (length,) = shape
        if not isinstance(value, list):
            return f"expected a list of {length} token ids, got {_describe(value)}"
        if len(value) != length:
            return f"expected {length} token ids, got {len(value)}"
        for j, token in enumerate(value):
            if not _is_int(token):
                return f"token {j}: expected an integer token id, got {_describe(token)}"
            if not (0 <= token < vocab_size or token == pad_token):
                return f"token {j}: expected an id in [0, {vocab_size}) or the pad token {pad_token}, got {token}"
        return None
    if kind == "int":
        low, high = label_type.int_range(field)
        if not _is_int(value):
            return f"expected an integer in [{low}, {high}), got {_describe(value)}"
        if not low <= value < high:
            return f"expected an integer in [{low}, {high}), got {value}"
        return None
    if kind == "float":
        if not _is_finite_number(value):
            return f"expected a finite number (within float32 range), got {_describe(value)}"
        return None
    if kind == "probability":
        if not _is_finite_number(value) or not 0 <= value <= 1:
            return f"expected a probability, a number in [0, 1], got {_describe(value)}"
        return None
    raise ValueError(f"unknown schema kind {kind!r} for field {field!r}")


def read_labels(path, *, label_type: LabelType, query_length: int, response_length: int, vocab_size: int,
                pad_token: int) -> list[dict]:
    """Read and fully validate an OAI label file; returns its rows as plain Python objects."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LabelFileError(f"{path}: cannot read label file: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LabelFileError(
            f"{path}: expected UTF-8 JSON, got byte 0x{data[e.start]:02x} at offset {e.start} that is not valid UTF-8"
        ) from e
    try:
        rows = json.loads(text, parse_constant=_JsonLiteral)
    except json.JSONDecodeError as e:
        raise LabelFileError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg} (truncated or corrupt file?)"
        ) from e
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits, absurd nesting
        raise LabelFileError(f"{path}: unreadable JSON: {' '.join(str(e).split())[:200]}") from e
    _validate(rows, where=str(path), label_type=label_type, query_length=query_length,
              response_length=response_length, vocab_size=vocab_size, pad_token=pad_token)
    return rows


def _plain(value):
    """Tensors / numpy arrays / numpy scalars -> Python ints, floats and lists."""
    return value.tolist() if hasattr(value, "tolist") else value


def labels_to_tensors(rows: list[dict], *, label_type: LabelType) -> dict[str, torch.Tensor]:
    """Validated rows -> batched tensors: tokens (N, L) long, int (N,) long, float and probability
    (N,) float32."""
    if not rows:
        raise ValueError("labels_to_tensors needs at least one row")
    dtypes = {"tokens": torch.long, "int": torch.long, "float": torch.float32, "probability": torch.float32}
    return {
        field: torch.tensor([_plain(row[field]) for row in rows], dtype=dtypes[kind])
        for field, kind in label_type.field_kinds.items()
    }


def write_labels(path, rows, *, label_type: LabelType, query_length: int, response_length: int, vocab_size: int,
                 pad_token: int) -> None:
    """Validate `rows` (Python values, tensors or numpy arrays) and write them atomically, one row a line."""
    path = Path(path)
    kinds = label_type.field_kinds
    rows = [{field: _plain(value) for field, value in row.items()} if isinstance(row, dict) else row for row in rows]
    _validate(rows, where=str(path), label_type=label_type, query_length=query_length,
              response_length=response_length, vocab_size=vocab_size, pad_token=pad_token)
    lines = [json.dumps({field: row[field] for field in kinds}, allow_nan=False) for row in rows]
    atomic_write_bytes(path, ("[\n" + ",\n".join(lines) + "\n]\n").encode("utf-8"))


def cached_label_path(url: str, *, cache_dir) -> Path:
    """Where `url` is cached: cache_dir / <path below OAI_LABEL_URL_BASE, or the URL's last two path parts>."""
    if url.startswith(OAI_LABEL_URL_BASE):
        parts = url[len(OAI_LABEL_URL_BASE):].split("?")[0].split("/")
    else:
        parts = urllib.parse.urlparse(url).path.split("/")[-2:]
    parts = [urllib.parse.unquote(p) for p in parts if p]
    if not parts or any(p in (".", "..") or "/" in p or "\\" in p for p in parts):
        raise LabelFileError(f"cannot derive a cache file name from label URL {url!r}")
    return Path(cache_dir).joinpath(*parts)


def resolve_label_source(source, *, cache_dir, timeout: float = 60.0) -> Path:
    """A local label file path, or an http(s) URL downloaded once into `cache_dir` and reused."""
    source = str(source)
    if not source.startswith(("http://", "https://")):
        path = Path(source).expanduser()
        if not path.is_file():
            state = "is not a regular file" if path.exists() else "does not exist"
            raise LabelFileError(f"label file {path} {state}; pass --labels.source=PATH or an http(s) URL "
                                 f"(`launch.py collect_labels <task> <exp>` writes runs/<exp>/labels.json from a "
                                 f"scripted labeler)")
        return path
    path = cached_label_path(source, cache_dir=cache_dir)
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(source, timeout=timeout) as response, atomic_writer(path) as f:
            _download(response, f, desc=f"download {path.name}")
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, short reads, disk
        raise LabelFileError(
            f"could not download label file {source}: {e}. Without network access, download it elsewhere and "
            f"place it at {path}, or pass --labels.source=PATH to use a local copy."
        ) from e
    return path


def _download(response, f, *, desc: str) -> None:
    """Stream an HTTP response into the file `f` with a tqdm bar on stderr; check the length."""
    total = int(response.headers.get("Content-Length") or 0) or None
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr) as bar:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            bar.update(len(chunk))
    if total is not None and bar.n != total:
        raise ConnectionError(f"connection closed after {bar.n} of {total} bytes")
