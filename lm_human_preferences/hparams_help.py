"""`--help` text for hyperparameters: each field's description is the comment on its declaration
(at the end of its line, or the comment lines right above it), so the declaration is the one
place that says what a field means."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import textwrap
import tokenize

from lm_human_preferences.hparams import (HParams, HParamsError, _default_section, _field_types, _section_type,
                                          _split_optional)


def _own_comments(cls: type) -> dict[str, str]:
    """{field: comment} for the fields `cls` itself declares: the comment ending the field's line,
    else the comment-only lines right above it. {} when the source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whole line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.lstrip().startswith("#"))
    [node] = ast.parse(source).body
    docs = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        text, whole_line = comments.get(stmt.end_lineno, ("", True))
        if whole_line:  # no comment after the code: take the comment lines above
            above, line = [], stmt.lineno - 1
            while line in comments and comments[line][1]:
                above.insert(0, comments[line][0])
                line -= 1
            text = " ".join(above)
        docs[stmt.target.id] = text
    return docs


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field: one-line description} for every field of the dataclass `cls`, inherited ones
    included ("" for a field without a comment)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_comments(klass))
    return {name: docs.get(name, "") for name in _field_types(cls)}


def _help_groups(hp: HParams, prefix: str, title: str, out: list) -> None:
    """Append (title, [(key, value as typed, description)]) for `hp`'s leaves and on/off
    switches, then the same for each of its sections; an off section lists its defaults."""
    rows, sections = [], []
    docs = field_docs(type(hp))
    for name, tp in _field_types(type(hp)).items():
        key, value, sec = prefix + name, getattr(hp, name), _section_type(tp)
        if sec is None:
            rows.append((key, json.dumps(value), docs[name]))
            continue
        if _split_optional(tp)[1]:  # an on/off section: its switch is a key too
            rows.append((key, "off" if value is None else "on", docs[name]))
        state = f"(off: --{key}=on or setting any of its keys turns it on)" if value is None else ""
        sections.append((value, sec, key, " ".join(part for part in (f"{key}:", docs[name], state) if part)))
    out.append((title, rows))
    for value, sec, key, header in sections:
        try:
            _help_groups(value if value is not None else _default_section(sec, key), key + ".", header, out)
        except HParamsError:  # an off section without defaults: its switch is all there is to show
            pass


def help_lines(hp: HParams) -> list[str]:
    """`--help` text, grouped by section: each key with its value on a line of its own (the keys
    of off sections with their defaults), its description indented on the next."""
    groups: list = []
    _help_groups(hp, "", "", groups)
    lines = []
    for title, rows in groups:
        if rows and title:
            lines += ["", title]
        for key, value, doc in rows:
            lines += [f"  --{key}={value}"] + ([f"      {doc}"] if doc else [])
    return lines
