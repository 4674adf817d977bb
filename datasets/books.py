"""Prepare the `books` query dataset: `python datasets/books.py` → `datasets/books/train.jsonl`.

OAI's own book passages (`book_passages/{train,test}.jsonl`) are no longer downloadable, so
BookCorpus from the Hugging Face hub (`bookcorpus/bookcorpus`, field `text`) stands in for
them (docs/original.md §4). Its rows are single lowercased sentences in tokenized form
("he said , `` hello . ''"), so each row is lightly detokenized ("He said, "hello."") and
consecutive sentences are joined into passages of about `PASSAGE_CHARS` characters. That
restores what the sentiment/descriptiveness tasks rely on: multi-sentence passages where "."
is GPT-2 token 13, so start_text="." / end_text="." cut whole sentences as in OAI.

Offline or from your own copy: `python datasets/books.py --source bookcorpus.parquet`.
"""

import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_human_preferences.language.prepare import prepare_main  # noqa: E402

PASSAGE_CHARS = 1000  # ~220 GPT-2 tokens: plenty for a 64-token query after dropping the first sentence

_DETOKENIZE = [
    (re.compile(r"``\s*|\s*''"), '"'),
    (re.compile(r" ([.,!?;:%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
    (re.compile(r"\bi\b"), "I"),
    (re.compile(r"^(\W*)(\w)"), lambda m: m.group(1) + m.group(2).upper()),
]


def detokenize(sentence: str) -> str:
    sentence = " ".join(sentence.split())
    for pattern, repl in _DETOKENIZE:
        sentence = pattern.sub(repl, sentence)
    return sentence


def book_passages(sentences: Iterable[str]) -> Iterator[str]:
    passage, size = [], 0
    for sentence in map(detokenize, sentences):
        if sentence:
            passage.append(sentence)
            size += len(sentence) + 1
        if size >= PASSAGE_CHARS:
            yield " ".join(passage)
            passage, size = [], 0
    if passage:
        yield " ".join(passage)


if __name__ == "__main__":
    prepare_main("books", default_out_dir=Path(__file__).resolve().parent, hub_id="bookcorpus/bookcorpus",
                 text_field="text", to_passages=book_passages, description=__doc__.splitlines()[0])
