"""Preference pairs: one record for every comparison data set, and the files they come in.

    pairs = read_pairs("comparisons.jsonl")              # format detected from the fields
    pairs = read_pairs("simulated.csv", format="rlcd")   # or named
    write_pairs("pairs.jsonl", pairs, format="pairs")
    context, continuation = render(FORMATS["stack"].template, pair.prompt, pair.chosen, pair.meta)  # templates.py

A `PreferencePair` is (prompt, chosen, rejected, chosen_prob, meta): `chosen` is the preferred
response; `chosen_prob` an optional soft label, the probability that `chosen` wins (None: a hard
label); `meta` holds every other field of the source row, so a pair written back in its own
format gives the row it was read from.

| format | file | fields of a row |
|---|---|---|
| `pairs` | JSONL | prompt, chosen, rejected[, chosen_prob][, meta] (this library's own) |
| `stack` | JSONL | question, response_j (preferred), response_k (StackExchange paired) |
| `summarize` | JSONL | info {post or article, ...}, summaries [{text, ...}, {text, ...}], choice 0/1 (OpenAI summarize-from-feedback comparisons) |
| `soups` | JSONL | user_input, completion_a (preferred), completion_b (Personalized Soups) |
| `hh` | JSONL | chosen, rejected: whole dialogues ending in one assistant turn (Anthropic HH-RLHF) |
| `rlcd` | CSV | instruction, input, output_1, output_2, preference 1/2[, win2_prob] (RLCD, AlpacaFarm) |

`rlcd` orientation: `preference` names the preferred output (1 or 2), `win2_prob` is the
probability that output_2 wins; so chosen = output_<preference> and chosen_prob = win2_prob
when preference is 2, 1 - win2_prob (to 15 significant digits) when it is 1 (an empty win2_prob cell: a hard label). A JSONL file may also be one JSON list of
rows. Every row is checked; an error (PreferenceFileError, a LabelFileError) names the file,
the line or row, the field, what was expected and what was found.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Callable

from lm_human_preferences.labels import LabelFileError, _describe, _is_finite_number
from lm_human_preferences.language.checkpoints import atomic_write_bytes


class PreferenceFileError(LabelFileError):
    """A preference file (or hub data set) is unreadable, of an unknown format, or fails validation."""


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    chosen_prob: float | None = None  # probability that `chosen` wins; None = hard label
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def _text(row: dict, field: str, where: str, *, path: str | None = None) -> str:
    """row[field] as a string; `path` is the field's name in messages (e.g. "info.post")."""
    name = path or field
    if field not in row:
        raise PreferenceFileError(f"{where}, field {name!r}: missing")
    if not isinstance(row[field], str):
        raise PreferenceFileError(f"{where}, field {name!r}: expected a string, got {_describe(row[field])}")
    return row[field]


def _probability(value, where: str, field: str) -> float:
    if not _is_finite_number(value) or not 0.0 <= float(value) <= 1.0:
        raise PreferenceFileError(f"{where}, field {field!r}: expected a probability in [0, 1], got {_describe(value)}")
    return float(value)


def _rest(row: dict, used: tuple[str, ...]) -> dict:
    return {k: v for k, v in row.items() if k not in used}


# ------------------------------------------------------------------------ row <-> pair, per format


def _from_pairs(row, where):
    allowed = ("prompt", "chosen", "rejected", "chosen_prob", "meta")
    for field in row:
        if field not in allowed:
            raise PreferenceFileError(f"{where}, field {field!r}: unexpected field (expected {', '.join(allowed)})")
    prob = row.get("chosen_prob")
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise PreferenceFileError(f"{where}, field 'meta': expected an object, got {_describe(meta)}")
    return PreferencePair(_text(row, "prompt", where), _text(row, "chosen", where), _text(row, "rejected", where),
                          None if prob is None else _probability(prob, where, "chosen_prob"), meta)


def _to_pairs(pair, where):
    row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    if pair.chosen_prob is not None:
        row["chosen_prob"] = pair.chosen_prob
    if pair.meta:
        row["meta"] = pair.meta
    return row


def _from_stack(row, where):
    fields = ("question", "response_j", "response_k")
    return PreferencePair(*(_text(row, f, where) for f in fields), meta=_rest(row, fields))


def _to_stack(pair, where):
    return {"question": pair.prompt, "response_j": pair.chosen, "response_k": pair.rejected, **pair.meta}


def _from_soups(row, where):
    fields = ("user_input", "completion_a", "completion_b")
    return PreferencePair(*(_text(row, f, where) for f in fields), meta=_rest(row, fields))


def _to_soups(pair, where):
    return {"user_input": pair.prompt, "completion_a": pair.chosen, "completion_b": pair.rejected, **pair.meta}


def _from_summarize(row, where):
    info, summaries, choice = row.get("info"), row.get("summaries"), row.get("choice")
    if not isinstance(info, dict):
        raise PreferenceFileError(f"{where}, field 'info': expected an object with 'post' or 'article', "
                                  f"got {_describe(info)}")
    text_field = "post" if info.get("post") is not None else "article"
    prompt = _text(info, text_field, where, path=f"info.{text_field}")
    if not isinstance(summaries, list) or len(summaries) != 2 or not all(isinstance(s, dict) for s in summaries):
        raise PreferenceFileError(f"{where}, field 'summaries': expected a list of 2 objects with 'text', "
                                  f"got {_describe(summaries)}")
    texts = [_text(s, "text", where, path=f"summaries[{i}].text") for i, s in enumerate(summaries)]
    if type(choice) is not int or choice not in (0, 1):
        raise PreferenceFileError(f"{where}, field 'choice': expected 0 or 1 (the preferred summary), "
                                  f"got {_describe(choice)}")
    meta = {"info": _rest(info, (text_field,)), "text_field": text_field,
            "summaries": [_rest(s, ("text",)) for s in summaries], "choice": choice,
            **_rest(row, ("info", "summaries", "choice"))}
    return PreferencePair(prompt, texts[choice], texts[1 - choice], meta=meta)


def _to_summarize(pair, where):
    meta = dict(pair.meta)
    choice = meta.pop("choice", 0)
    info = {meta.pop("text_field", "post"): pair.prompt, **meta.pop("info", {})}
    extra = meta.pop("summaries", [{}, {}])
    texts = [pair.chosen, pair.rejected] if choice == 0 else [pair.rejected, pair.chosen]
    return {"info": info, "summaries": [{"text": t, **e} for t, e in zip(texts, extra)], "choice": choice, **meta}


ASSISTANT = "\n\nAssistant:"


def _from_hh(row, where):
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise PreferenceFileError(f"{where}, field 'chosen': expected a dialogue with a {ASSISTANT!r} turn")
    prompt = chosen[:cut + len(ASSISTANT)]
    if not rejected.startswith(prompt) or ASSISTANT in rejected[len(prompt):]:
        raise PreferenceFileError(f"{where}, field 'rejected': expected the dialogue of 'chosen' up to its last "
                                  f"{ASSISTANT!r}, then one response")
    return PreferencePair(prompt, chosen[len(prompt):], rejected[len(prompt):], meta=_rest(row, ("chosen", "rejected")))


def _to_hh(pair, where):
    if not pair.prompt.endswith(ASSISTANT) or ASSISTANT in pair.chosen or ASSISTANT in pair.rejected:
        raise PreferenceFileError(f"{where}: the hh format needs a prompt ending in {ASSISTANT!r} and responses "
                                  f"without one")
    return {"chosen": pair.prompt + pair.chosen, "rejected": pair.prompt + pair.rejected, **pair.meta}


def _complement(p: float) -> float:
    """1 - p to 15 significant digits, so that the complement of the complement is p again."""
    return float(format(1.0 - p, ".15g"))


RLCD_COLUMNS = ("instruction", "input", "output_1", "output_2", "preference")


def _from_rlcd(row, where):
    preference = row["preference"].strip()
    if preference not in ("1", "2"):
        raise PreferenceFileError(f"{where}, field 'preference': expected 1 or 2 (the preferred output), "
                                  f"got {row['preference']!r}")
    first, second = row["output_1"], row["output_2"]
    chosen, rejected = (first, second) if preference == "1" else (second, first)
    prob = None
    if row.get("win2_prob", "").strip():  # an empty cell: a hard label
        try:
            win2 = float(row["win2_prob"])
        except ValueError:
            win2 = row["win2_prob"]
        win2 = _probability(win2, where, "win2_prob")
        prob = win2 if preference == "2" else _complement(win2)
    meta = {"input": row["input"], "preference": int(preference),
            **_rest(row, RLCD_COLUMNS + ("win2_prob",))}
    return PreferencePair(row["instruction"], chosen, rejected, prob, meta)


def _to_rlcd(pair, where):
    meta = dict(pair.meta)
    preference = 2 if meta.pop("preference", 1) == 2 else 1
    outputs = (pair.chosen, pair.rejected) if preference == 1 else (pair.rejected, pair.chosen)
    row = {"instruction": pair.prompt, "input": meta.pop("input", ""), "output_1": outputs[0],
           "output_2": outputs[1], "preference": str(preference)}
    if pair.chosen_prob is not None:
        row["win2_prob"] = repr(pair.chosen_prob if preference == 2 else _complement(pair.chosen_prob))
    return {**row, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    fields: tuple[str, ...]  # fields (or CSV columns) every row has; detection looks for them
    read_row: Callable[[dict, str], PreferencePair]
    write_row: Callable[[PreferencePair, str], dict]
    template: str  # the name of the `templates.TEMPLATES` entry its data sets use
    csv: bool = False


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("pairs", ("prompt", "chosen", "rejected"), _from_pairs, _to_pairs, "plain"),
    Format("stack", ("question", "response_j", "response_k"), _from_stack, _to_stack, "stack"),
    Format("summarize", ("info", "summaries", "choice"), _from_summarize, _to_summarize, "summarize"),
    Format("soups", ("user_input", "completion_a", "completion_b"), _from_soups, _to_soups, "tulu"),
    Format("hh", ("chosen", "rejected"), _from_hh, _to_hh, "dialogue"),
    Format("rlcd", RLCD_COLUMNS, _from_rlcd, _to_rlcd, "dialogue", csv=True),
)}


def _get_format(name: str) -> Format:
    if name not in FORMATS:
        raise PreferenceFileError(f"unknown preference format {name!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(fields, *, where: str) -> Format:
    """The format whose fields a row (or CSV header) has; `pairs` wins over `hh` (a subset)."""
    for fmt in FORMATS.values():
        if set(fmt.fields) <= set(fields):
            return fmt
    expected = "; ".join(f"{f.name}: {', '.join(f.fields)}" for f in FORMATS.values())
    raise PreferenceFileError(f"{where}: unknown preference format with fields {', '.join(map(str, fields))} "
                              f"(expected the fields of one of {expected})")


# ------------------------------------------------------------------------------- files


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PreferenceFileError(f"{path}: cannot read preference file: {e.strerror or e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PreferenceFileError(f"{path}: expected UTF-8 text, got byte 0x{data[e.start]:02x} at offset "
                                  f"{e.start} that is not valid UTF-8") from e


def _json_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    """(where, row) for a JSON list of rows or for JSON lines (blank lines skipped)."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreferenceFileError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        return [(f"{path}: row {i}", row) for i, row in enumerate(rows)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}: line {n}", json.loads(line)))
            except (json.JSONDecodeError, RecursionError) as e:
                raise PreferenceFileError(f"{path}: line {n}: invalid JSON ({e}); expected one object a line") from e
    return out


def _csv_rows(path: Path, text: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in RLCD_COLUMNS if c not in header]
    if missing:
        raise PreferenceFileError(f"{path}: line 1: expected a CSV header with columns {', '.join(RLCD_COLUMNS)}"
                                  f"[, win2_prob], missing {', '.join(missing)}")
    out, line = [], reader.line_num + 1  # the line a row starts on (quoted fields may hold newlines)
    try:
        for i, row in enumerate(reader, 1):
            where, line = f"{path}: row {i} (line {line})", reader.line_num + 1
            extra, missing = row.pop(None, []), [c for c, v in row.items() if v is None]
            if extra or missing:
                found = len(header) + len(extra) - len(missing)
                raise PreferenceFileError(f"{where}: expected {len(header)} values (the header's columns), got {found}")
            out.append((where, row))
    except csv.Error as e:
        raise PreferenceFileError(f"{path}: line {reader.line_num}: malformed CSV: {e}") from e
    return out


def _objects(rows: list[tuple[str, Any]], path: Path) -> list[tuple[str, dict]]:
    if not rows:
        raise PreferenceFileError(f"{path}: expected at least one row, got none")
    for where, row in rows:
        if not isinstance(row, dict):
            raise PreferenceFileError(f"{where}: expected a JSON object, got {_describe(row)}")
    return rows


def read_json_rows(path) -> list[tuple[str, dict]]:
    """(where, row) for every object of a JSON-lines file (or a JSON list of objects), at least
    one; `where` is "<file>: line N" (or "row N") for error messages."""
    path = Path(path)
    return _objects(_json_rows(path, _decode(path)), path)


def read_pairs(path, *, format: str | None = None) -> list[PreferencePair]:
    """Every pair of a preference file, checked row by row. `format`: a name of FORMATS, or None
    to detect it (`.csv` files are `rlcd`; otherwise the fields of the first row decide)."""
    return read_pairs_and_format(path, format=format)[0]


def read_pairs_and_format(path, *, format: str | None = None) -> tuple[list[PreferencePair], Format]:
    """`read_pairs`, and the format the file was read as."""
    path = Path(path)
    fmt = _get_format(format) if format else None
    text = _decode(path)
    is_csv = fmt.csv if fmt else path.suffix.lower() == ".csv"
    rows = _objects(_csv_rows(path, text) if is_csv else _json_rows(path, text), path)
    if fmt is None:
        fmt = FORMATS["rlcd"] if is_csv else detect_format(rows[0][1], where=rows[0][0])
    return [fmt.read_row(row, where) for where, row in rows], fmt


def _check_pair(pair, where: str) -> None:
    if not isinstance(pair, PreferencePair):
        raise PreferenceFileError(f"{where}: expected a PreferencePair, got {type(pair).__name__}")
    for field in ("prompt", "chosen", "rejected"):
        value = getattr(pair, field)
        if not isinstance(value, str):
            raise PreferenceFileError(f"{where}, field {field!r}: expected a string, got {_describe(value)}")
    if pair.chosen_prob is not None:
        _probability(pair.chosen_prob, where, "chosen_prob")
    if not isinstance(pair.meta, dict):
        raise PreferenceFileError(f"{where}, field 'meta': expected a dict, got {_describe(pair.meta)}")


def format_pairs(pairs, *, format: str = "pairs", where: str = "pairs") -> str:
    """The text of a preference file in `format` holding `pairs` (checked first)."""
    fmt = _get_format(format)
    rows = []
    for i, pair in enumerate(pairs):
        _check_pair(pair, f"{where}: pair {i}")
        rows.append(fmt.write_row(pair, f"{where}: pair {i}"))
    if not fmt.csv:
        try:
            return "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
        except (TypeError, ValueError) as e:
            raise PreferenceFileError(f"{where}: a pair's meta does not convert to JSON: {e}") from e
    columns = list(dict.fromkeys(c for row in rows for c in row))
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_pairs(path, pairs, *, format: str = "pairs") -> None:
    """Write `pairs` to `path` in `format`, atomically; nothing is written if a pair is invalid."""
    path = Path(path)
    text = format_pairs(list(pairs), format=format, where=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------- the hub

HUB_DATASETS: dict[str, tuple[str, dict]] = {
    "lvwerra/stack-exchange-paired": ("stack", {"data_dir": "data/reward"}),
    "openai/summarize_from_feedback": ("summarize", {"name": "comparisons"}),
    "Anthropic/hh-rlhf": ("hh", {}),
}


def load_hub_pairs(name: str, *, split: str = "train", **load_kwargs) -> list[PreferencePair]:
    """The pairs of a data set of HUB_DATASETS from the Hugging Face hub, through the `datasets`
    package (downloads it; `load_kwargs` go to `datasets.load_dataset`, over HUB_DATASETS' own)."""
    if name not in HUB_DATASETS:
        raise PreferenceFileError(f"no reader for hub data set {name!r}; known: {', '.join(HUB_DATASETS)} "
                                  f"(or save the rows as a file and use read_pairs)")
    try:
        from datasets import load_dataset  # the repository's datasets/ folder is not a package: no load_dataset
    except ImportError as e:
        raise PreferenceFileError(f"loading {name} needs the `datasets` package: pip install datasets") from e
    format, defaults = HUB_DATASETS[name]
    rows = load_dataset(name, split=split, **{**defaults, **load_kwargs})
    return [FORMATS[format].read_row(dict(row), f"{name} ({split}): row {i}") for i, row in enumerate(rows)]
