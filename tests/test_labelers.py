import pytest

from lm_human_preferences.labelers import (
    DescriptivenessLabeler,
    Labeler,
    SentimentLabeler,
    get_labeler,
)

pytest.importorskip("vaderSentiment")


def test_sentiment_scores():
    lab = SentimentLabeler()
    pos, neg, neutral = lab.score(["this is wonderful and happy", "this is terrible and sad", "the box"])
    assert pos > neutral > neg
    assert -1 <= neg < 0 < pos <= 1 and neutral == 0
    assert lab.score([]) == []
    assert lab.name == "sentiment"


def test_best_of_picks_most_positive():
    lab = SentimentLabeler()
    texts = ["the dog was sad.", "the box was red.", "we laughed and the garden was lovely.", "he hated it."]
    assert lab.best_of(texts) == 2
    assert lab.best_of(texts[::-1]) == 1


class _Fixed(Labeler):
    name = "fixed"

    def __init__(self, scores):
        self.scores = scores

    def score(self, texts):
        return self.scores[: len(texts)]


def test_best_of_ties_go_to_first():
    assert _Fixed([1.0, 3.0, 3.0, 2.0]).best_of(["a", "b", "c", "d"]) == 1
    assert _Fixed([0.0, 0.0, 0.0, 0.0]).best_of(["a", "b", "c", "d"]) == 0
    assert SentimentLabeler().best_of(["the box", "the lamp", "the door"]) == 0
    with pytest.raises(ValueError):
        _Fixed([]).best_of([])


def test_labeler_is_abstract():
    with pytest.raises(TypeError):
        Labeler()


def test_descriptiveness_counts():
    lab = DescriptivenessLabeler()
    assert lab.name == "descriptiveness"
    scores = lab.score([
        "the man walked to the harbor.",                      # 0
        "the old man walked slowly to the quiet harbor.",     # old, slowly, quiet
        "The OLD man, the old man and the old man.",          # old x3: 1 - 0.5 * 2
        "a huge dog",                                         # built-in extra word
    ])
    assert scores == [0.0, 3.0, 0.0, 1.0]
    assert DescriptivenessLabeler(repeat_penalty=0.0).score(["old old old"]) == [1.0]
    assert DescriptivenessLabeler(words={"red"}).score(["the red old box"]) == [1.0]
    assert lab.best_of(["the box.", "the small red box.", "the red box."]) == 1


def test_get_labeler():
    assert isinstance(get_labeler("sentiment"), SentimentLabeler)
    assert isinstance(get_labeler("offline_sentiment"), SentimentLabeler)
    assert isinstance(get_labeler("descriptiveness"), DescriptivenessLabeler)
    assert isinstance(get_labeler("offline_descriptiveness"), DescriptivenessLabeler)
    with pytest.raises(ValueError, match="sentiment.*descriptiveness|descriptiveness.*sentiment"):
        get_labeler("bogus")


def test_missing_vader_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("vaderSentiment"):
            raise ImportError("no vader")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install vaderSentiment"):
        SentimentLabeler()
