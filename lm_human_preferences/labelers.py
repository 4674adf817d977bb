"""Scripted labelers standing in for the paper's human labelers in the offline tasks.

    labeler = get_labeler("sentiment")            # or "descriptiveness", "friendly", "harmless", "module:function"
    labeler.score(["what a lovely day.", "the dog was sad."])   # gold scores, [0.58, -0.48]
    labeler.best_of(samples)                      # index of the best sample (first one on ties)

A labeler has a gold `score` for any text; `best_of` is the labeling decision (the "best of 4"
label type): the argmax of the scores. The same scores serve as the gold metric when
evaluating a policy, so the reward model's score can be compared with what it stands in for.
"""

from __future__ import annotations

import abc
import re
from typing import Iterable

from lm_human_preferences import plugins
from lm_human_preferences.language.dialogues import harmlessness
from lm_human_preferences.language.offline_corpus import DESCRIPTIVE_WORDS

_WORD = re.compile(r"[a-z]+")

# A few common adjectives/adverbs outside the offline grammar, so that descriptive words a
# pretrained (non-offline) model writes also count.
EXTRA_DESCRIPTIVE_WORDS: frozenset[str] = frozenset("""
    huge enormous large giant soft hard loud strange silver purple pink orange bare smooth rough
    shiny fragile sharp bitter sour tender cozy elegant vivid misty foggy sunny rainy windy snowy
    crisp fierce graceful slender massive ragged dusty muddy glossy faint pale rich sleepy wild
    lazily eagerly loudly brightly silently swiftly calmly deeply tightly barely nearly
""".split())


class Labeler(abc.ABC):
    """A deterministic scripted labeler.

    `score(texts)` is the gold score of each text (higher is better). `best_of(texts)` is the
    index of the highest-scoring text; ties go to the first maximum, so labels are fully
    deterministic.
    """

    name: str

    @abc.abstractmethod
    def score(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def best_of(self, texts: list[str]) -> int:
        if not texts:
            raise ValueError("best_of needs at least one text")
        scores = self.score(list(texts))
        return max(range(len(scores)), key=lambda i: (scores[i], -i))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SentimentLabeler(Labeler):
    """VADER sentiment: the `compound` polarity score of each text, in [-1, 1]."""

    name = "sentiment"

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise ImportError("the sentiment labeler needs VADER: pip install vaderSentiment") from e
        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, texts: list[str]) -> list[float]:
        return [float(self.analyzer.polarity_scores(t)["compound"]) for t in texts]


class DescriptivenessLabeler(Labeler):
    """Counts descriptive words, penalising repeats.

    Rule: lowercase the text and split it into words (runs of a-z). Of the words that are in
    `offline_corpus.DESCRIPTIVE_WORDS` or `EXTRA_DESCRIPTIVE_WORDS` (adjectives and adverbs),
    let `distinct` be the number of different ones and `total` the number of occurrences.
    score = distinct - repeat_penalty * (total - distinct), with repeat_penalty = 0.5.

    E.g. "the old man walked slowly" → 2.0; "the old old old man" → 1 - 0.5 * 2 = 0.0, so a
    policy cannot gain by repeating one adjective.
    """

    name = "descriptiveness"

    def __init__(self, *, repeat_penalty: float = 0.5,
                 words: Iterable[str] = DESCRIPTIVE_WORDS | EXTRA_DESCRIPTIVE_WORDS):
        self.repeat_penalty = repeat_penalty
        self.words = frozenset(words)

    def score(self, texts: list[str]) -> list[float]:
        scores = []
        for text in texts:
            found = [w for w in _WORD.findall(text.lower()) if w in self.words]
            distinct = len(set(found))
            scores.append(float(distinct - self.repeat_penalty * (len(found) - distinct)))
        return scores


class HarmlessnessLabeler(Labeler):
    """The offline dialogue task's oracle: a reply's harmless marker words minus its harmful ones
    (`dialogues.harmlessness`; e.g. "please ask a doctor to help you. just break the lamp." → 1.0)."""

    name = "harmless"

    def score(self, texts: list[str]) -> list[float]:
        return [harmlessness(t) for t in texts]


class FunctionLabeler(Labeler):
    """A function of your own, `fn(texts: list[str]) -> scores` (one number per text, higher is
    better), named as "module:function" or "path/to/file.py:function" (see `plugins.py`). A
    result that is not one finite number per text is an HParamsError naming `key` and `spec`."""

    def __init__(self, spec: str, *, key: str = "labeler"):
        self.name, self.key = spec, key
        self.fn = plugins.load_function(spec, key=key)

    def score(self, texts: list[str]) -> list[float]:
        return plugins.check_scores(self.fn(list(texts)), n=len(texts), spec=self.name, key=self.key,
                                    what="text").tolist()

    def __repr__(self) -> str:
        return f"FunctionLabeler({self.name!r})"


# Personal preferences (Personalized Soups' P1-P3, offline): dimension -> its two opposite options,
# each (name, the sentence a prompt carries to ask for it, its rule's sign). Sentences use words
# of the offline corpus, so the offline models' vocabulary can encode them.
PREFERENCE_DIMENSIONS: dict[str, tuple[tuple[str, str, float], tuple[str, str, float]]] = {
    "expertise": (("simple", " the young child.", -1.0), ("expert", " the serious teacher.", 1.0)),
    "verbosity": (("concise", " very short.", -1.0), ("verbose", " very long.", 1.0)),
    "tone": (("friendly", " friendly and kind.", 1.0), ("unfriendly", " rude and cruel.", -1.0)),
}
PREFERENCES: dict[str, tuple[str, str, float]] = {  # option -> (dimension, sentence, sign)
    name: (dim, sentence, sign) for dim, options in PREFERENCE_DIMENSIONS.items() for name, sentence, sign in options}


def sentence_lengths(text: str) -> float:
    """The mean number of words (runs of a-z) of the text's sentences (split at "."), 0 without words."""
    counts = [len(_WORD.findall(part.lower())) for part in text.split(".")]
    counts = [c for c in counts if c]
    return sum(counts) / len(counts) if counts else 0.0


class PreferenceLabeler(Labeler):
    """One option of a personal preference (`PREFERENCES`), scored on the text alone, about in [-1, 1]:
    - expertise: descriptive words (`DescriptivenessLabeler`'s score) / 3; "expert" +, "simple" -;
    - verbosity: the mean words per sentence / 10; "verbose" +, "concise" -;
    - tone: VADER's compound score; "friendly" +, "unfriendly" -.
    `sentence` is what a prompt carries to ask for this option (see `personalization.py`)."""

    def __init__(self, name: str):
        if name not in PREFERENCES:
            raise ValueError(f"unknown preference {name!r}; expected one of {', '.join(PREFERENCES)}")
        self.name = name
        self.dimension, self.sentence, self.sign = PREFERENCES[name]
        self.base = {"expertise": DescriptivenessLabeler, "tone": SentimentLabeler}.get(self.dimension, lambda: None)()

    def score(self, texts: list[str]) -> list[float]:
        texts = list(texts)
        if self.dimension == "verbosity":
            raw = [sentence_lengths(t) / 10 for t in texts]
        else:
            raw = [s / 3 if self.dimension == "expertise" else s for s in self.base.score(texts)]
        return [self.sign * s + 0.0 for s in raw]  # + 0.0: no -0.0

    def __repr__(self) -> str:
        return f"PreferenceLabeler({self.name!r})"


LABELERS: dict[str, type[Labeler]] = {"sentiment": SentimentLabeler,
                                      "descriptiveness": DescriptivenessLabeler,
                                      "harmless": HarmlessnessLabeler}


def get_labeler(name: str, *, key: str = "labeler") -> Labeler:
    """A new labeler: "sentiment", "descriptiveness" or "harmless" (an "offline_" prefix is accepted), a
    personal preference's option (`PREFERENCES`: simple, expert, concise, verbose, friendly,
    unfriendly), or a function of your own as "module:function" (`FunctionLabeler`; its errors
    name `key`)."""
    if ":" in name:
        return FunctionLabeler(name, key=key)
    if name in PREFERENCES:
        return PreferenceLabeler(name)
    key = name[len("offline_"):] if name.startswith("offline_") else name
    if key not in LABELERS:
        names = sorted(LABELERS) + [f"offline_{n}" for n in sorted(LABELERS)]
        raise ValueError(f"unknown labeler {name!r}; expected one of {', '.join(names)}, or a function of "
                         f"your own as {plugins.SPEC_FORM}; or a personal preference: {', '.join(PREFERENCES)}")
    return LABELERS[key]()
