"""A small, deterministic English corpus of short story-like passages for the offline tasks.

    stream = iter_passages(seed=0, split="valid")               # infinite, deterministic
    "quiet" in DESCRIPTIVE_WORDS                                # True

Nothing is downloaded or copied: every passage comes from the probabilistic grammar below,
e.g. "the old fisherman walked slowly to the quiet harbor. my sister was angry about the broken
window. we laughed and the boy played in the warm garden." Everything is lowercase; every
sentence ends with "." and a passage is 4-8 sentences joined by " " (so the "." start/end text
of the offline tasks finds query boundaries).

Sentiment: every sentiment-bearing slot (adjectives, feelings, adverbs, verbs) draws from a
positive, a negative or a neutral word list. Each passage has a mood (positive, negative or
neutral, equally likely) that biases those draws, so passages differ in tone while the corpus
as a whole is balanced (VADER compound mean near 0). Descriptiveness: adjective and adverb
slots are optional, filled with a per-passage probability, so sentences carry 0-4 descriptive
words; `DESCRIPTIVE_WORDS` lists every adjective and adverb the grammar uses.
"""

from __future__ import annotations

import random
from typing import Iterator

SPLITS = ("train", "valid", "test")

# --- Vocabulary: (positive, negative, neutral) lists for each sentiment-bearing slot. --------
ADJ = ("warm beautiful lovely bright pleasant wonderful sweet clean peaceful pretty nice great "
       "safe calm perfect good charming fresh",                         # for things and places
       "broken dirty terrible ugly dangerous awful bitter dull gloomy horrible poor nasty bad "
       "scary rotten miserable",
       "old small tall quiet little big long narrow wide wooden red blue green white black dark "
       "round heavy distant tiny ancient yellow brown new short thin deep cold")
ADJ_P = ("kind gentle friendly cheerful brave proud happy good lovely sweet calm",  # for people
         "cruel angry sad lonely sick tired rude weak poor nasty miserable",
         "old young small tall quiet little busy thin short")
FEEL = ("happy glad proud excited grateful pleased delighted thankful hopeful amused calm",
        "angry sad upset worried nervous ashamed annoyed disappointed scared furious lonely",
        "silent busy awake surprised serious quiet")
ADV = ("happily gladly gently warmly kindly proudly cheerfully joyfully",
       "sadly angrily badly nervously bitterly painfully miserably anxiously",
       "slowly quickly quietly carefully suddenly softly finally again later early")
ACT = ("laughed smiled played celebrated cheered",                  # intransitive activities
       "cried screamed wept complained suffered fought",
       "slept waited worked sat stood talked read listened stayed rested sang danced")
TRANS = ("loved liked enjoyed admired won",                          # verb + thing
         "hated lost broke destroyed ruined burned",
         "opened carried saw found bought painted watched brought held closed fixed took moved")
TRANS_P = ("loved admired praised hugged thanked kissed helped",     # verb + person
           "hated hurt blamed attacked missed feared",
           "saw watched met called visited followed")
INTENS = "very so quite really rather too".split()  # degree adverbs before a feeling word

PEOPLE = ("fisherman farmer teacher doctor baker sailor soldier girl boy woman man sister "
          "brother mother father friend neighbor king queen stranger child captain driver "
          "painter singer nurse student grandmother grandfather uncle aunt cousin dog cat").split()
PLACES = ("harbor garden village river forest market station church school beach hill road "
          "field kitchen house library bridge lake city farm shop park castle valley mountain "
          "street room hospital office island").split()
THINGS = ("window letter map box door boat car cake song book dress lamp gift story picture "
          "clock key bottle hat coat ring bag chair table fence").split()
TIMES = "morning evening night afternoon summer winter spring autumn".split()
MOTION = "walked ran drove went hurried wandered came rode sailed returned climbed".split()
TO = "to into through across toward along past around".split()
AT = "in at near behind by outside".split()
DET = "the the the the my our his her their".split()
PRONOUNS = {"he": "was", "she": "was", "we": "were", "they": "were"}

ADJ, ADJ_P, FEEL, ADV, ACT, TRANS, TRANS_P = (
    tuple(s.split() for s in lists) for lists in (ADJ, ADJ_P, FEEL, ADV, ACT, TRANS, TRANS_P))
DESCRIPTIVE_WORDS: frozenset[str] = frozenset(w for lists in (ADJ, ADJ_P, FEEL, ADV) for ws in lists
                                              for w in ws) | frozenset(INTENS)


class _Passage:
    """The grammar, drawing words with one passage's mood and descriptiveness."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.mood = rng.randrange(3)            # index into the (positive, negative, neutral) lists
        self.p_desc = rng.uniform(0.1, 0.6)     # chance that an optional adjective/adverb appears

    def pick(self, lists: tuple[list[str], list[str], list[str]]) -> str:
        # 60% the passage's mood, else any of the three tones (so moods mix within a passage).
        tone = self.mood if self.rng.random() < 0.6 else self.rng.randrange(3)
        return self.rng.choice(lists[tone])

    def maybe(self, lists, suffix: str = " ") -> str:
        return self.pick(lists) + suffix if self.rng.random() < self.p_desc else ""

    def np(self, nouns: list[str], det: str | None = None) -> str:
        """Noun phrase: determiner, optional adjective, noun."""
        adj = self.maybe(ADJ_P if nouns is PEOPLE else ADJ)
        return f"{det or self.rng.choice(DET)} {adj}{self.rng.choice(nouns)}"

    def subject(self) -> tuple[str, str]:
        """(subject, was/were)."""
        if self.rng.random() < 0.3:
            pron = self.rng.choice(list(PRONOUNS))
            return pron, PRONOUNS[pron]
        return self.np(PEOPLE), "was"

    def clause(self) -> str:
        subj, _ = self.subject()
        r = self.rng.random()
        if r < 0.4:     # "the old fisherman walked slowly to the quiet harbor"
            verb, prep = self.rng.choice(MOTION), self.rng.choice(TO)
            return f"{subj} {verb} {self.maybe(ADV)}{prep} {self.np(PLACES, 'the')}"
        if r < 0.7:     # "the boy played happily in the warm garden"
            place = f" {self.rng.choice(AT)} {self.np(PLACES, 'the')}" if self.rng.random() < 0.6 else ""
            adv = f" {self.pick(ADV)}" if self.rng.random() < self.p_desc else ""
            return f"{subj} {self.pick(ACT)}{adv}{place}"
        # "my sister found the old map" / "he hugged the kind teacher"
        verbs, nouns = (TRANS, THINGS) if self.rng.random() < 0.6 else (TRANS_P, PEOPLE)
        adv = f" {self.pick(ADV)}" if self.rng.random() < self.p_desc / 2 else ""
        return f"{subj} {self.pick(verbs)} {self.np(nouns)}{adv}"

    def sentence(self) -> str:
        r = self.rng.random()
        if r < 0.45:
            s = self.clause()
        elif r < 0.65:  # "my sister was angry about the broken window"
            subj, be = self.subject()
            feeling = self.maybe([INTENS] * 3) + self.pick(FEEL)
            s = f"{subj} {be} {feeling} about {self.np(THINGS + PLACES, 'the')}"
        elif r < 0.8:   # "we laughed and the boy played in the warm garden"
            s = f"{self.clause()} and {self.clause()}"
        elif r < 0.9:   # "in the cold morning, the baker sang happily"
            s = f"in the {self.maybe(ADJ)}{self.rng.choice(TIMES)}, {self.clause()}"
        else:           # "the old harbor was quiet and beautiful"
            second = f" and {self.pick(ADJ)}" if self.rng.random() < self.p_desc else ""
            s = f"{self.np(PLACES + THINGS, 'the')} was {self.pick(ADJ)}{second}"
        return s + "."

    def passage(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(4, 8)))


def iter_passages(*, seed: int, split: str = "train") -> Iterator[str]:
    """Infinite deterministic stream of passages.

    The random generator is seeded with `3 * seed + SPLITS.index(split)`, so the splits of any
    seeds never share a generator ("train" and "valid" are disjoint streams).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(3 * seed + SPLITS.index(split))
    while True:
        yield _Passage(rng).passage()
