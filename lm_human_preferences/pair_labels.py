"""Preference-pair files as label rows of the pairwise label types (`preference`, `soft_preference`).

    rows = read_label_rows(path, label_type=get_label_type("preference"), template="plain",
                           query_length=64, response_length=24, encoding=enc)

A file is a pair file when its name ends in `.jsonl` or `.csv`, or when it is a JSON list whose
first row has no `query` field and the fields of a `preferences.FORMATS` format; anything else
is read as OpenAI's token label format (`labels.read_labels`). Each pair becomes one row
{"query", "chosen", "rejected"[, "chosen_prob"]}: `templates.render(template, prompt, response,
meta)` gives (context, continuation) texts; the context's tokens are the query, the LAST
`query_length` of them kept (the end of a prompt is next to the response), right-padded with
the encoding's padding token; each continuation's tokens are a response, its FIRST
`response_length` kept, right-padded. The number of rows truncated is printed.
"""

from __future__ import annotations

import json
from pathlib import Path

from lm_human_preferences import labels, preferences, templates
from lm_human_preferences.label_types import LabelType, Pairwise, SoftPairwise
from lm_human_preferences.logs import print0
from lm_human_preferences.preferences import PreferenceFileError, PreferencePair

AUTO = "auto"  # the template name that means the pair file's format's own (preferences.FORMATS[...].template)


def is_pair_file(path) -> bool:
    """Whether `path` holds preference pairs rather than token labels in OpenAI's format."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".csv"):
        return True
    try:
        rows = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError, RecursionError):  # labels.read_labels names the problem
        return False
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict) or "query" in rows[0]:
        return False
    return any(set(f.fields) <= set(rows[0]) for f in preferences.FORMATS.values())


def pair_to_row(pair: PreferencePair, *, template: str, query_length: int, response_length: int, encoding,
                soft: bool) -> tuple[dict, bool]:
    """(label row, whether anything was truncated) of one pair; `soft` adds `chosen_prob`."""
    pad = encoding.padding_token
    context, chosen = templates.render(template, pair.prompt, pair.chosen, pair.meta)
    _, rejected = templates.render(template, pair.prompt, pair.rejected, pair.meta)
    query = encoding.encode(context)
    responses = [encoding.encode(text) for text in (chosen, rejected)]
    truncated = len(query) > query_length or any(len(r) > response_length for r in responses)
    query = query[len(query) - query_length:] if len(query) > query_length else query
    row = {"query": query + [pad] * (query_length - len(query))}
    for field, tokens in zip(("chosen", "rejected"), responses):
        tokens = tokens[:response_length]
        row[field] = tokens + [pad] * (response_length - len(tokens))
    if soft:
        row["chosen_prob"] = pair.chosen_prob
    return row, truncated


def pairs_to_rows(pairs: list[PreferencePair], *, where: str, label_type: LabelType, template: str,
                  query_length: int, response_length: int, encoding) -> list[dict]:
    """Label rows of `label_type` (preference or soft_preference) for `pairs`, read from `where`."""
    if not isinstance(label_type, Pairwise):
        raise PreferenceFileError(f"{where}: a preference-pair file trains --labels.type=preference or "
                                  f"soft_preference, not {label_type.name}")
    soft = isinstance(label_type, SoftPairwise)
    rows, truncated = [], 0
    for i, pair in enumerate(pairs, 1):
        if soft and pair.chosen_prob is None:
            raise PreferenceFileError(f"{where}: pair {i}, field 'chosen_prob': missing; soft_preference needs the "
                                      f"probability that chosen wins (pairs: chosen_prob; rlcd: win2_prob), or "
                                      f"train --labels.type=preference")
        row, cut = pair_to_row(pair, template=template, query_length=query_length,
                               response_length=response_length, encoding=encoding, soft=soft)
        rows.append(row)
        truncated += cut
    if truncated:
        print0(f"note: {where}: {truncated} of {len(rows)} pairs truncated to {query_length} query tokens (their "
               f"end kept) and {response_length} response tokens (their start kept)")
    return rows


def read_label_rows(path, *, label_type: LabelType, template: str, query_length: int, response_length: int,
                    encoding) -> list[dict]:
    """The label rows of a pair file (any `preferences.read_pairs` format, rendered with
    `template`, or with the format's own template for `AUTO`) or of a token label file in OpenAI's format (validated by `labels.read_labels`)."""
    if not is_pair_file(path):
        return labels.read_labels(path, label_type=label_type, query_length=query_length,
                                  response_length=response_length, vocab_size=encoding.n_vocab,
                                  pad_token=encoding.padding_token)
    pairs, fmt = preferences.read_pairs_and_format(path)
    template = fmt.template if template == AUTO else template
    return pairs_to_rows(pairs, where=str(path), label_type=label_type, template=template,
                         query_length=query_length, response_length=response_length, encoding=encoding)


def row_uids(path, n_rows: int) -> list[str]:
    """Each label row's name in logs: a pair file's pair's `meta["uid"]` when it has one, else its
    row index (0-based), as a string; a token label file's rows are their indices."""
    if not is_pair_file(path):
        return [str(i) for i in range(n_rows)]
    return [str(pair.meta.get("uid", i)) for i, pair in enumerate(preferences.read_pairs(path))]
