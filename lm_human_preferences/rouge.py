"""ROUGE-1, ROUGE-2 and ROUGE-L F-measures of a response against a reference (Lin 2004).

    rouge("the cat sat", "the cat sat down")   # {"rouge1": 0.857..., "rouge2": 0.8, "rougeL": 0.857...}

Texts are lowercased and split into runs of letters and digits (everything else separates
tokens), with no stemming and no stop words, as `rouge_score`'s default tokenizer does.
- ROUGE-N: the n-grams the two share, each counted as often as it occurs in both (the minimum
  of its counts); precision over the response's n-grams, recall over the reference's.
- ROUGE-L: the length of the longest common subsequence of the two token lists; precision over
  the response's length, recall over the reference's.
The F-measure is 2PR / (P + R), and 0 when either text has no n-gram (or token).
"""

from __future__ import annotations

import re
from collections import Counter

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _f_measure(matches: int, predicted: int, target: int) -> float:
    if not matches or not predicted or not target:
        return 0.0
    precision, recall = matches / predicted, matches / target
    return 2 * precision * recall / (precision + recall)


def rouge_n(response: str, reference: str, n: int) -> float:
    """The ROUGE-N F-measure."""
    def grams(text):
        t = tokens(text)
        return Counter(tuple(t[i:i + n]) for i in range(len(t) - n + 1))
    a, b = grams(response), grams(reference)
    return _f_measure(sum((a & b).values()), sum(a.values()), sum(b.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    """The length of the longest common subsequence of two token lists."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(response: str, reference: str) -> float:
    """The ROUGE-L F-measure (sentence level)."""
    a, b = tokens(response), tokens(reference)
    return _f_measure(lcs_length(a, b), len(a), len(b))


def rouge(response: str, reference: str) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL"} F-measures of `response` against `reference`."""
    return {"rouge1": rouge_n(response, reference, 1), "rouge2": rouge_n(response, reference, 2),
            "rougeL": rouge_l(response, reference)}
