"""In-distribution and out-of-distribution prompts: which split a prompt belongs to, and prompt
files with references from the offline corpus.

    in_split = parse_split("length:12")            # prompts of more than 12 words are "ood"
    in_split = parse_split("words:king|queen")     # prompts with one of these words are "ood"
    in_split = parse_split("field", fields={...})  # the "split" field of the prompt file's rows
    in_split("the cat sat.")                       # "id"
    rows = corpus_prompts(48, sentences=3)         # [{"prompt", "reference"}, ...]

Specs (`parse_split`): `length:N` puts a prompt of more than N words (split at whitespace) out of
distribution; `words:W1|W2|...` puts out a prompt holding any of these words (lowercased, full
stops and commas removed), a held-out topic; `field` reads each prompt's "split" ("id" or
"ood") from a prompt file's rows (`read_references`). An empty spec puts every prompt in "all".

`corpus_prompts` makes prompts with references from held-out passages of the offline corpus
(`language.offline_corpus`, split "test" by default, never trained on): the first sentence of a
passage is skipped, as the offline tasks' start text does; the prompt is the next `sentences`
sentences and the reference the sentence after them (with its leading space, a continuation).
Training queries are at most 16 tokens, about one sentence: one-sentence prompts are in
distribution, three-sentence ones longer than any query the policy trained on.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Callable, Optional

from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language import offline_corpus

SPLITS = ("id", "ood")
_SENTENCE = re.compile(r"(?<=\.) ")


def _words(text: str) -> set[str]:
    return set(text.lower().replace(".", " ").replace(",", " ").split())


def parse_split(spec: str, *, fields: Optional[dict[str, str]] = None, key: str = "split") -> Callable[[str], str]:
    """The function of a prompt giving its split ("id"/"ood", or "all" for an empty spec); see
    the module docstring. `fields` is {prompt: split} for the `field` spec."""
    kind, _, arg = spec.partition(":")
    if not spec:
        return lambda prompt: "all"
    if kind == "length" and arg.isdigit():
        limit = int(arg)
        return lambda prompt: "ood" if len(prompt.split()) > limit else "id"
    if kind == "words" and arg.strip("|"):
        held_out = {w.lower() for w in arg.split("|") if w}
        return lambda prompt: "ood" if _words(prompt) & held_out else "id"
    if spec == "field":
        if fields is None:
            raise HParamsError("the 'field' split reads the \"split\" field of the prompt file's rows; pass "
                               "--references=FILE", key=key)
        return lambda prompt: fields[prompt]
    raise HParamsError(f"expected length:N, words:W1|W2|... or field, got {spec!r}", key=key)


def read_references(path: str | Path, *, key: str = "references") -> tuple[dict[str, str], dict[str, str]]:
    """({prompt: reference}, {prompt: split}) of a JSON-lines prompt file whose rows have string
    "prompt" and "reference" fields (and "split", "id" or "ood", where a row has it)."""
    path = Path(path)
    references, splits = {}, {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HParamsError(f"{path}: cannot read it as UTF-8 text ({e})", key=key) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise HParamsError(f"{path}: line {n}: invalid JSON ({e}); expected one object a line", key=key) from None
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in ("prompt", "reference")):
            raise HParamsError(f'{path}: line {n}: expected an object with string "prompt" and "reference" fields',
                               key=key)
        if "split" in row and row["split"] not in SPLITS:
            raise HParamsError(f"{path}: line {n}: field 'split': expected one of {SPLITS}, got {row['split']!r:.40}",
                               key=key)
        references[row["prompt"]] = row["reference"]
        if "split" in row:
            splits[row["prompt"]] = row["split"]
    if not references:
        raise HParamsError(f"{path}: holds no prompts", key=key)
    return references, splits


def corpus_prompts(n: int, *, sentences: int = 1, seed: int = 0, split: str = "test") -> list[dict]:
    """`n` {"prompt", "reference"} rows from offline-corpus passages of `split` that have
    enough sentences (see the module docstring), in stream order, without repeated prompts."""
    rows, seen = [], set()
    for passage in itertools.islice(offline_corpus.iter_passages(seed=seed, split=split), 100 * n):
        parts = _SENTENCE.split(passage)
        if len(parts) < sentences + 2:
            continue
        prompt = " ".join(parts[1:1 + sentences])
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "reference": " " + parts[1 + sentences]})
        if len(rows) == n:
            return rows
    raise ValueError(f"found only {len(rows)} passages with {sentences + 2} sentences or more")
