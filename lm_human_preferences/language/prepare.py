"""What the prep scripts `datasets/{books,cnndm,tldr}.py` share: read rows from a file, a URL or
the Hugging Face hub, take one text field, clean it, write `<out-dir>/<name>/<split>.jsonl`.

    prepare_main("cnndm", default_out_dir=..., hub_id="abisee/cnn_dailymail", hub_config="3.0.0",
                 text_field="article", to_passages=cnndm_passages, description="...")

Rows are read with Hugging Face `datasets` (`hf_datasets`). A source that cannot be read (no
network, a missing file or package, a row without the text field) is a `PrepError`: the script
prints one paragraph naming it and the `--source FILE` way round it, exits with status 2, and
leaves no output behind.
"""

from __future__ import annotations

import argparse
import itertools
import re
import socket
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import urlparse

from lm_human_preferences.language.datasets import write_passages_jsonl


class PrepError(Exception):
    """A prep script cannot read its source, or a package it needs is missing."""


def hf_datasets():
    """The Hugging Face `datasets` package, or a PrepError saying how to install it.

    This repository's own `datasets/` folder (the prep scripts, no __init__.py) is importable as
    an empty namespace package whenever the repository root is on sys.path, so without HF
    `datasets` installed a plain `import datasets` succeeds and only a later
    `from datasets import load_dataset` fails, naming neither the package nor the fix."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if not hasattr(datasets, "load_dataset"):
        found = (f" (`import datasets` finds only the folder {', '.join(datasets.__path__)})"
                 if datasets is not None and hasattr(datasets, "__path__") else "")
        raise PrepError(f"the Hugging Face `datasets` package is not installed{found}; the prep scripts read "
                        "their data with it: `pip install datasets` (or `pip install -r requirements.txt`)")
    return datasets


def clean_passage(text: str) -> str:
    """OAI's common cleanup of downloaded text: `ftfy.fix_text` (when ftfy is installed), runs of
    3+ newlines collapsed to one blank line, surrounding whitespace stripped."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return re.sub(r"\n{3,}", "\n\n", text).strip()


REMOTE_HINT = ("download the data where there is a network and pass the file with `--source FILE` (json, jsonl, "
               "parquet or txt)")


def _check_host(url: str, what: str) -> None:
    """A PrepError at once when `url`'s host name does not resolve (offline), instead of the
    hub client's retries (25 s) and a traceback."""
    host = urlparse(url).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError) as e:
        raise PrepError(f"cannot reach {host} to read {what} (no network? {e}); {REMOTE_HINT}") from None


def load_rows(*, source: str | None, hub_id: str | None, hub_config: str | None = None,
              revision: str | None = None, split: str) -> Iterable[dict]:
    """Stream rows from a local/URL json, jsonl, parquet or txt file (`source`), else from the HF hub."""
    hf = hf_datasets()
    hf.logging.set_verbosity(hf.logging.CRITICAL)  # what fails is said once, by the PrepError
    load_dataset = hf.load_dataset
    if source:
        if "://" in source:
            _check_host(source, source)
        elif not Path(source).is_file():
            raise PrepError(f"--source {source}: no such file")
        suffix = Path(source.split("?")[0]).suffix
        builder = {".parquet": "parquet", ".txt": "text"}.get(suffix, "json")
        return load_dataset(builder, data_files=source, split="train", streaming=True)
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        _check_host(constants.ENDPOINT, describe_source(None, hub_id, hub_config, split))
    return load_dataset(hub_id, hub_config, split=split, revision=revision, streaming=True)


def describe_source(source: str | None, hub_id: str | None, hub_config: str | None, split: str) -> str:
    return source or f"{hub_id!r} (config {hub_config!r}, split {split!r}) from the Hugging Face hub"


def read_rows(load: Callable[[], Iterable[dict]], *, where: str, hint: str = "") -> Iterator[dict]:
    """The rows `load()` streams; any failure of the source (network, format, a package the
    reader needs) is a PrepError naming `where`, with `hint` after it. The source is opened and
    its first row read before this returns, so one that cannot be read fails before anything is
    written. Only the reading is guarded, not what consumes the rows."""
    def failed(e: Exception) -> PrepError:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return PrepError(f"could not read {where}: {type(e).__name__}: {lines[0] if lines else ''}"
                         + (f"; {hint}" if hint else ""))

    def guarded(rows: Iterator[dict]) -> Iterator[dict]:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # the hub client, fsspec, pyarrow...: each has errors of its own
                raise failed(e) from e
            yield row

    try:
        rows = iter(load())
    except PrepError:
        raise
    except Exception as e:
        raise failed(e) from e
    first = list(itertools.islice(guarded(rows), 1))
    return itertools.chain(first, guarded(rows))


def prepare_main(name: str, *, default_out_dir: str | Path, hub_id: str | None, hub_config: str | None = None,
                 default_source: str | None = None, text_field: str,
                 to_passages: Callable[[Iterable[str]], Iterable[str]], description: str,
                 argv: Sequence[str] | None = None) -> Path:
    """CLI of a prep script: read rows, take `text_field`, clean with `to_passages`, write
    `<out-dir>/<name>/<split>.jsonl`. `default_source` (may contain `{split}`) is read when
    neither `--source` nor a hub id is given. A PrepError prints one paragraph and exits with
    status 2, leaving nothing behind."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out-dir", default=str(default_out_dir),
                        help="folder that receives <name>/<split>.jsonl (default: %(default)s)")
    parser.add_argument("--split", default="train", help="split to read and to name the output file")
    parser.add_argument("--max-examples", type=int, default=None, help="stop after this many passages")
    parser.add_argument("--source", default=None,
                        help="local (or URL) json/jsonl/parquet/txt file to read instead of the default source")
    parser.add_argument("--hub-id", default=hub_id, help="Hugging Face dataset id (default: %(default)s)")
    parser.add_argument("--hub-config", default=hub_config, help="dataset config (default: %(default)s)")
    parser.add_argument("--revision", default=None, help="hub revision, e.g. refs/convert/parquet")
    parser.add_argument("--text-field", default=text_field, help="field holding the text (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.source is None and default_source and args.hub_id is None:
        args.source = default_source.format(split=args.split)
    where = describe_source(args.source, args.hub_id, args.hub_config, args.split)
    hint = ("" if args.source and "://" not in args.source else REMOTE_HINT
            + ("" if args.source else ", or try `--revision refs/convert/parquet` (the hub's parquet export)"))
    out = Path(args.out_dir) / name / f"{args.split}.jsonl"
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # innermost first
    try:
        rows = read_rows(lambda: load_rows(source=args.source, hub_id=args.hub_id, hub_config=args.hub_config,
                                           revision=args.revision, split=args.split), where=where, hint=hint)
        passages = (p for p in to_passages(_texts(rows, args.text_field, where)) if p.strip())
        count = write_passages_jsonl(out, itertools.islice(passages, args.max_examples), total=args.max_examples)
    except PrepError as e:
        for d in made:  # the folders this run created, if still empty
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        parser.exit(2, f"error: {name}: {e}\n")
    print(f"wrote {count} passages to {out}")
    return out


def _texts(rows: Iterable[dict], field: str, where: str) -> Iterator[str]:
    for i, row in enumerate(rows):
        if field not in row:
            raise PrepError(f"row {i} of {where} has no field {field!r} (fields: {sorted(row)}); pass --text-field")
        yield row[field] or ""
