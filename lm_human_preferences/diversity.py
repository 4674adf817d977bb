"""Diversity of sets of outputs (Kirk et al. 2023, "Understanding the Effects of RLHF on LLM
Generalisation and Diversity", §4; the metrics of Tevet & Berant 2021 and Liu et al. 2022).

    sets = group_by_prompt(rows)                    # {prompt: [response, ...]} in file order
    metric = METRICS["ead"]                         # a function of a list of texts -> float
    per_input(metric, sets), across_input(metric, sets), overall(metric, sets)

Every metric is a function of a set of texts (higher is more diverse). Texts are split into
words at whitespace after removing full stops, as the paper's code does.
- `distinct`: distinct-n, the number of distinct n-grams of the set over its number of n-grams
  (0 without any), averaged over n = 1..5.
- `ead`: expectation-adjusted distinct n-grams (Liu et al. 2022): with N distinct n-grams out of
  C, over a vocabulary of V, N / (V · (1 − ((V − 1) / V)^C)), the distinct count over its
  expectation for C uniform draws; 0 for C = 0; averaged over n = 1..5 (V = 50257, GPT-2's).
- `ngram_cosine`: 1 − the mean cosine similarity of the n-gram count vectors of every pair of
  texts, averaged over n = 1..5 (a pair without a common n-gram has similarity 0).
- `embedding`: 1 − the mean cosine similarity of the texts' embeddings over every pair
  (`embedding_diversity` with an embedding function; see `text_embeddings`).
- `nli`: the mean over every ordered pair (premise, hypothesis) of an NLI model's
  P(contradiction) − P(entailment), a function of yours (`nli_diversity`; `MODULE:FUNCTION`).
Pairwise metrics of a set of fewer than two texts are undefined (None).

Aggregations over the outputs of several prompts, each prompt's responses in file order:
- per-input: the metric of each prompt's set of responses, averaged over the prompts that have
  at least two (the diversity of the outputs for one input);
- across-input: for each sample index s, the metric of the set of the s-th responses of all
  prompts, averaged over s (the diversity of one output per input, across inputs);
- overall: the metric of all responses together (pairwise metrics: of at most `max_texts` of
  them, drawn with a seeded generator).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Callable, Optional, Sequence

import numpy as np

from lm_human_preferences import plugins

Metric = Callable[[Sequence[str]], Optional[float]]
GPT2_VOCAB = 50257
N_RANGE = range(1, 6)  # n-gram sizes averaged by the n-gram metrics


def words(text: str) -> list[str]:
    """The text's words: split at whitespace after removing full stops."""
    return text.replace(".", "").split()


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The word n-grams of `text`, in order (none when it has fewer than n words)."""
    w = words(text)
    return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams of the set over all its n-grams (0 when it has none)."""
    grams = [g for t in texts for g in ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def ead_n(texts: Sequence[str], n: int, *, vocab_size: int = GPT2_VOCAB) -> float:
    """Expectation-adjusted distinct n-grams: N / (V (1 - ((V - 1) / V)^C)) for N distinct of
    C n-grams over a vocabulary of V (0 when C = 0)."""
    grams = [g for t in texts for g in ngrams(t, n)]
    if not grams:
        return 0.0
    v = float(vocab_size)
    expected = v * -math.expm1(len(grams) * math.log1p(-1.0 / v))  # V (1 - ((V - 1) / V)^C), without cancellation
    return len(set(grams)) / expected


def ngram_cosine_similarity(a: str, b: str, n: int) -> float:
    """The cosine similarity of the n-gram count vectors of two texts (0 without a common n-gram)."""
    return _count_cosine(Counter(ngrams(a, n)), Counter(ngrams(b, n)))


def _count_cosine(ca: Counter, cb: Counter) -> float:
    if len(cb) < len(ca):
        ca, cb = cb, ca
    dot = sum(c * cb[g] for g, c in ca.items() if g in cb)
    if not dot:
        return 0.0
    return dot / math.sqrt(sum(c * c for c in ca.values()) * sum(c * c for c in cb.values()))


def pairs(texts: Sequence) -> list[tuple[int, int]]:
    """Every unordered pair (i, j), i > j, of the indices of `texts`."""
    return [(i, j) for i in range(len(texts)) for j in range(i)]


def ngram_cosine_diversity(texts: Sequence[str], n: int) -> Optional[float]:
    """1 - the mean n-gram cosine similarity over every pair of texts (None for fewer than 2)."""
    if len(texts) < 2:
        return None
    counts = [Counter(ngrams(t, n)) for t in texts]
    sims = [_count_cosine(counts[i], counts[j]) for i, j in pairs(texts)]
    return 1.0 - sum(sims) / len(sims)


def averaged_over_n(metric: Callable[[Sequence[str], int], Optional[float]]) -> Metric:
    """The mean of `metric(texts, n)` over n = 1..5 (None when it is None)."""
    def averaged(texts: Sequence[str]) -> Optional[float]:
        values = [metric(texts, n) for n in N_RANGE]
        return None if values[0] is None else sum(values) / len(values)
    return averaged


def embedding_diversity(embed: Callable[[list[str]], np.ndarray]) -> Metric:
    """1 - the mean cosine similarity of the embeddings (`embed(texts) -> (n, d)`) over every pair."""
    def metric(texts: Sequence[str]) -> Optional[float]:
        if len(texts) < 2:
            return None
        e = np.asarray(embed(list(texts)), dtype=np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sims = e @ e.T
        i, j = np.tril_indices(len(texts), k=-1)
        return float(1.0 - sims[i, j].mean())
    return metric


def nli_diversity(nli: Callable[[list[str], list[str]], Sequence[float]], *, name: str = "nli") -> Metric:
    """The mean of `nli(premises, hypotheses)` (one P(contradiction) - P(entailment) in [-1, 1] a
    pair) over every ordered pair of distinct texts, both directions in one call."""
    def metric(texts: Sequence[str]) -> Optional[float]:
        if len(texts) < 2:
            return None
        ordered = [(i, j) for i, j in pairs(texts)] + [(j, i) for i, j in pairs(texts)]
        premises, hypotheses = [texts[i] for i, _ in ordered], [texts[j] for _, j in ordered]
        scores = np.asarray(nli(premises, hypotheses), dtype=np.float64)
        if scores.shape != (len(ordered),) or not np.all(np.isfinite(scores)) or np.any(np.abs(scores) > 1):
            raise ValueError(f"NLI function {name}: expected {len(ordered)} finite numbers in [-1, 1], got "
                             f"{scores.ravel()[:8].tolist()} (shape {scores.shape})")
        return float(scores.mean())
    return metric


def load_nli(spec: str, *, key: str = "nli") -> Metric:
    """`nli_diversity` of the function `spec` names (MODULE:FUNCTION, see `plugins`)."""
    return nli_diversity(plugins.load_function(spec, key=key), name=spec)


def ead(texts: Sequence[str], *, vocab_size: int = GPT2_VOCAB) -> float:
    """`ead_n` averaged over n = 1..5."""
    return sum(ead_n(texts, n, vocab_size=vocab_size) for n in N_RANGE) / len(N_RANGE)


METRICS: dict[str, Metric] = {
    "distinct": averaged_over_n(distinct_n),
    "ead": ead,
    "ngram_cosine": averaged_over_n(ngram_cosine_diversity),
}
PAIRWISE = {"ngram_cosine", "embedding", "nli"}  # quadratic in the set size; undefined below 2 texts


# ------------------------------------------------------------------------------- aggregations


def group_by_prompt(rows: Sequence[dict]) -> dict[str, list[str]]:
    """{prompt: its responses in file order}, prompts in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row["prompt"], []).append(row["response"])
    return groups


def _mean(values: list[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def per_input(metric: Metric, groups: dict[str, list[str]]) -> Optional[float]:
    """The mean over prompts with at least two responses of the metric of their responses."""
    return _mean([metric(texts) for texts in groups.values() if len(texts) >= 2])


def per_input_values(metric: Metric, groups: dict[str, list[str]]) -> dict[str, Optional[float]]:
    """{prompt: the metric of its responses} (None for a prompt with one response)."""
    return {prompt: metric(texts) if len(texts) >= 2 else None for prompt, texts in groups.items()}


def across_input(metric: Metric, groups: dict[str, list[str]]) -> Optional[float]:
    """The mean over sample indices s of the metric of the s-th responses of all prompts (s
    below the fewest responses of a prompt); None for fewer than two prompts."""
    if len(groups) < 2:
        return None
    k = min(len(texts) for texts in groups.values())
    return _mean([metric([texts[s] for texts in groups.values()]) for s in range(k)])


def overall(metric: Metric, groups: dict[str, list[str]], *, max_texts: Optional[int] = None,
            seed: int = 0) -> Optional[float]:
    """The metric of all responses together; of `max_texts` of them drawn without replacement
    (random.Random(seed)) when there are more."""
    texts = [t for group in groups.values() for t in group]
    if max_texts is not None and len(texts) > max_texts:
        texts = random.Random(seed).sample(texts, max_texts)
    return metric(texts)


def diversity_report(metrics: dict[str, Metric], groups: dict[str, list[str]], *,
                     max_texts: int = 256, seed: int = 0) -> dict[str, Optional[float]]:
    """{"<metric>/per_input", "<metric>/across_input", "<metric>/overall"} of every metric
    (pairwise ones over at most `max_texts` texts overall)."""
    out = {}
    for name, metric in metrics.items():
        out[f"{name}/per_input"] = per_input(metric, groups)
        out[f"{name}/across_input"] = across_input(metric, groups)
        out[f"{name}/overall"] = overall(metric, groups, max_texts=max_texts if name in PAIRWISE else None,
                                         seed=seed)
    return out
