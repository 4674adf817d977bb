"""Turn labels written as text into a label file `train_reward` reads (OpenAI's format).

    python examples/make_labels.py examples/labels_text.jsonl my_labels.json \
        --query_length 16 --response_length 12 [--model DIR]

Input: one JSON object a line, `{"query": TEXT, "samples": [TEXT, ...], "best": INDEX}`, with the
same number n >= 2 of samples on every line (the label type is best_of_<n>). Each text is
encoded with the model's encoding (GPT-2's without --model) and right-padded with its padding
token to the given length; a text longer than that is an error. The lengths must be the task's
`query_length` and `response_length` when training on the file.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, without installing

from lm_human_preferences.label_types import BestOfN  # noqa: E402
from lm_human_preferences.labels import LabelFileError, write_labels  # noqa: E402
from lm_human_preferences.language.encodings import encoding_from_meta  # noqa: E402


def padded(text: str, *, length: int, encoding, where: str) -> list[int]:
    tokens = encoding.encode(text)
    if len(tokens) > length:
        raise LabelFileError(f"{where}: {text!r} is {len(tokens)} tokens, more than {length}")
    return tokens + [encoding.padding_token] * (length - len(tokens))


def text_rows(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LabelFileError(f"{path}:{i}: invalid JSON: {e.msg}") from None
        if not (isinstance(row, dict) and isinstance(row.get("query"), str) and isinstance(row.get("samples"), list)
                and all(isinstance(s, str) for s in row["samples"]) and type(row.get("best")) is int):
            raise LabelFileError(f"{path}:{i}: expected {{\"query\": TEXT, \"samples\": [TEXT, ...], \"best\": INDEX}}")
        rows.append(dict(row, line=i))
    if not rows:
        raise LabelFileError(f"{path} holds no labels")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="text labels, one JSON object a line")
    p.add_argument("out", type=Path, help="the label file to write")
    p.add_argument("--query_length", type=int, required=True)
    p.add_argument("--response_length", type=int, required=True)
    p.add_argument("--model", help="a model directory whose encoding to use (default: GPT-2's)")
    args = p.parse_args(argv)
    try:
        meta = json.loads((Path(args.model) / "config.json").read_text()).get("encoding") if args.model else None
        encoding = encoding_from_meta(meta)
        rows = text_rows(args.source)
        n = len(rows[0]["samples"])
        labels = []
        for row in rows:
            where = f"{args.source}:{row['line']}"
            if len(row["samples"]) != n:
                raise LabelFileError(f"{where}: {len(row['samples'])} samples, but the first line has {n}")
            labels.append({"query": padded(row["query"], length=args.query_length, encoding=encoding, where=where),
                           **{f"sample{i}": padded(s, length=args.response_length, encoding=encoding, where=where)
                              for i, s in enumerate(row["samples"])},
                           "best": row["best"]})
        write_labels(args.out, labels, label_type=BestOfN(n), query_length=args.query_length,
                     response_length=args.response_length, vocab_size=encoding.n_vocab,
                     pad_token=encoding.padding_token)
    except (OSError, ValueError) as e:  # LabelFileError and JSON errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(labels)} best_of_{n} labels to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
