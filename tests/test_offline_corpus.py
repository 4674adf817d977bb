import itertools
import re

import pytest

from lm_human_preferences.language import offline_corpus
from lm_human_preferences.language.offline_corpus import DESCRIPTIVE_WORDS, iter_passages


def _take(stream, n):
    return list(itertools.islice(stream, n))


def generate_passages(n, *, seed=0):
    """The first `n` passages of the training split."""
    return _take(iter_passages(seed=seed, split="train"), n)


def test_deterministic():
    assert generate_passages(50, seed=3) == generate_passages(50, seed=3)
    assert _take(iter_passages(seed=3, split="valid"), 20) == _take(iter_passages(seed=3, split="valid"), 20)
    assert generate_passages(20, seed=0) != generate_passages(20, seed=1)


def test_splits_differ():
    train = set(_take(iter_passages(seed=0, split="train"), 200))
    valid = set(_take(iter_passages(seed=0, split="valid"), 200))
    assert not train & valid
    with pytest.raises(ValueError, match="split"):
        next(iter_passages(seed=0, split="bogus"))


def test_passage_shape():
    for p in generate_passages(300, seed=0):
        assert p.endswith(".")
        assert ". " in p                                   # start_text/end_text "." work
        assert p == p.lower() and p == p.strip() and "  " not in p
        assert re.fullmatch(r"[a-z ,.]+", p)
        assert 4 <= p.count(".") <= 8
        for sentence in p.split(". "):
            assert sentence and sentence[0].isalpha()


def test_vocabulary_size():
    words = {w for p in generate_passages(2000, seed=0) for w in re.findall(r"[a-z]+", p)}
    assert 250 <= len(words) <= 600
    used = DESCRIPTIVE_WORDS & words
    assert len(used) > 0.9 * len(DESCRIPTIVE_WORDS)
    assert {"quiet", "slowly", "happy", "angry"} <= DESCRIPTIVE_WORDS
    assert isinstance(DESCRIPTIVE_WORDS, frozenset)


def test_descriptive_counts_vary():
    counts = {sum(w in DESCRIPTIVE_WORDS for w in s.split())
              for p in generate_passages(300, seed=0) for s in p.split(". ")}
    assert {0, 1, 2, 3, 4} <= counts


def test_gpt2_tokens():
    enc = pytest.importorskip("lm_human_preferences.language.encodings").get_encoding("gpt2")
    toks = [enc.encode(p) for p in generate_passages(500, seed=0)]
    assert all(15 <= len(t) <= 150 for t in toks)
    assert len({i for t in toks for i in t}) < 1000
    assert enc.decode(toks[0]) == generate_passages(1, seed=0)[0]


def test_module_is_compact():
    with open(offline_corpus.__file__) as f:
        assert len(f.readlines()) < 220
