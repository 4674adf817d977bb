"""A labeler for `collect_labels` in place of the scripted ones:

    python launch.py collect_labels offline_sentiment my_labels --labeler=examples/labelers.py:positive_minus_negative

A labeler function gets the continuations of one query as text (cut after the task's
truncation token, padding removed; the query itself is not part of them) and returns one score
per continuation, higher is better. A best-of-n label picks the highest (the first one on
ties). The pipeline also logs the mean score of the policy's responses as `objective/gold`.
"""

import re

POSITIVE = frozenset("happy glad good great kind lovely warm nice sweet cheerful proud pleased smiled "
                     "laughed loved".split())
NEGATIVE = frozenset("sad angry bad awful terrible cruel lonely upset cried hated broken miserable".split())


def positive_minus_negative(texts: list[str]) -> list[float]:
    """Positive words minus negative words in each text."""
    scores = []
    for text in texts:
        found = re.findall(r"[a-z]+", text.lower())
        scores.append(float(sum(w in POSITIVE for w in found) - sum(w in NEGATIVE for w in found)))
    return scores
