"""Personal preferences (Jang et al. 2023, "Personalized Soups"): preference-prompted data,
multi-objective rewards (P-MORL) and the multitask SFT baseline.

    prompt = preference_prompt("the old man walked", ["expert", "friendly"])
    # "the old man walked the serious teacher. friendly and kind."
    write_preference_queries("q.jsonl", passages, combos=[["friendly"], ["unfriendly"]], n=4096, words=8)
    score = pmorl_scorer({"friendly": rm_1, "expert": rm_2, ...}, encoding=enc, mode="response")
    python launch.py train_pmorl offline_personal pmorl --pmorl.reward_models=friendly=runs/rm_f,...

A preference is one option of a dimension (`labelers.PREFERENCE_DIMENSIONS`: expertise simple /
expert, verbosity concise / verbose, tone friendly / unfriendly); a prompt asks for it by
carrying the option's sentence after its text, in the table's dimension order. Scripted
`labelers.PreferenceLabeler`s stand in for the paper's GPT-4 raters (collect_labels
--labeler=friendly, evaluate --judge=friendly, or --judge=preferences for any combination).

P-MORL trains one policy on prompts that carry several preferences, rewarded by the mean of the
active preferences' rewards (`pmorl_scorer`; one reward model, or other scorer, per option):
- `mode="response"`: each active option's reward model scores the response to the prompt
  without its preference sentences, and the rewards are averaged;
- `mode="released"`: what the released code computes: each active option's reward is that of
  the prompt alone (the response is not shown to the reward model: here, all padding), and the
  sum is divided by the number of dimensions (3), so the reward does not depend on the response.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from lm_human_preferences import judges, labelers, lm_tasks, scoring, train_policy
from lm_human_preferences.hparams import HParams, HParamsError
from lm_human_preferences.language.checkpoints import atomic_writer
from lm_human_preferences.rewards import load_reward_model

MODES = ("response", "released")
LABELER = "labeler"  # in place of a reward model directory: the option's scripted labeler


def preference_prompt(text: str, options: Iterable[str]) -> str:
    """`text` with the sentences of `options` after it, in the dimension order of the table."""
    options = set(options)
    unknown = options - set(labelers.PREFERENCES)
    if unknown:
        raise ValueError(f"unknown preferences {sorted(unknown)}; expected some of {', '.join(labelers.PREFERENCES)}")
    return text.rstrip() + "".join(s for name, (_, s, _) in labelers.PREFERENCES.items() if name in options)


def strip_preferences(prompt: str) -> tuple[str, list[str]]:
    """(the prompt without its preference sentences, the preferences it carried)."""
    active = judges.active_preferences(prompt)
    for name in active:
        prompt = prompt.replace(labelers.PREFERENCES[name][1], "")
    return prompt, active


def combinations(dimensions: Iterable[str]) -> list[list[str]]:
    """Every choice of one option per dimension, e.g. ["expertise", "tone"] -> 4 combinations."""
    combos: list[list[str]] = [[]]
    for dim in dimensions:
        if dim not in labelers.PREFERENCE_DIMENSIONS:
            raise ValueError(f"unknown dimension {dim!r}; expected one of {', '.join(labelers.PREFERENCE_DIMENSIONS)}")
        combos = [c + [name] for c in combos for name, _, _ in labelers.PREFERENCE_DIMENSIONS[dim]]
    return combos


def first_sentence(passage: str, *, words: int) -> str:
    """The passage's first sentence (to its first "."), cut to `words` words, ending in "."."""
    sentence = passage.split(".")[0].split()[:words]
    return " ".join(sentence) + "."


def write_preference_queries(path, passages: Iterable[str], *, combos: list[list[str]], n: int, words: int,
                             seed: int = 0) -> Path:
    """`n` JSON lines {"text", "prompt", "preferences"}: a passage's `first_sentence` with
    the preferences of a combination drawn uniformly from `combos` (the same text under both
    fields, so the file is a query dataset for PPO and label collection, and a prompt file for
    generate)."""
    rng = random.Random(seed)
    passages = iter(passages)
    with atomic_writer(path, "w") as f:
        for _ in range(n):
            combo = rng.choice(combos)
            prompt = preference_prompt(first_sentence(next(passages), words=words), combo)
            f.write(json.dumps({"text": prompt, "prompt": prompt, "preferences": combo}) + "\n")
    return Path(path)


def multitask_sft_rows(rows: list[dict]) -> list[dict]:
    """The multitask SFT baseline's data: for each prompt of an output file (`generate` with
    several samples of preference-carrying prompts), the response the `preferences` judge scores
    highest (the first of equal ones), as {"prompt", "response"}."""
    score = judges.preference_scores()
    scores = score([r["prompt"] for r in rows], [r["response"] for r in rows])
    best: dict[str, tuple[float, str]] = {}
    for row, s in zip(rows, scores):
        if row["prompt"] not in best or s > best[row["prompt"]][0]:
            best[row["prompt"]] = (s, row["response"])
    return [{"prompt": p, "response": r} for p, (_, r) in best.items()]


# ------------------------------------------------------------------------------------------- P-MORL


def pmorl_scorer(scorers: dict[str, scoring.ScoreFn], *, encoding, mode: str = "response") -> scoring.ScoreFn:
    """A score function (queries (B, Lq), responses (B, Lr)) -> (B,) of prompts that carry
    preferences: the mean of the active options' `scorers` (see the module docstring for
    `mode`). Each option's scorer sees the queries without their preference sentences (right
    padded to Lq); a prompt without any preference, or with one no scorer is given for, is an
    HParamsError naming it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pad = encoding.padding_token

    def score(queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        texts = encoding.decode_batch(queries.tolist())
        stripped, active = zip(*(strip_preferences(t) for t in texts))
        for text, a in zip(texts, active):
            missing = [n for n in a if n not in scorers] or ([] if a else ["(none)"])
            if missing:
                raise HParamsError(f"the query {text!r} carries the preferences {a or 'none'}; no reward for "
                                   f"{', '.join(missing)}", key="pmorl.reward_models")
        rows = [encoding.encode(t)[:queries.shape[1]] for t in stripped]
        plain = torch.tensor([r + [pad] * (queries.shape[1] - len(r)) for r in rows], device=queries.device)
        shown = torch.full_like(responses, pad) if mode == "released" else responses
        total = torch.zeros(len(texts), device=responses.device)
        for name, scorer in scorers.items():
            rows_with = torch.tensor([name in a for a in active], device=responses.device)
            if rows_with.any():
                total += torch.where(rows_with, scorer(plain, shown).float(), 0.0)
        divisor = (torch.full_like(total, float(len(labelers.PREFERENCE_DIMENSIONS))) if mode == "released" else
                   torch.tensor([float(len(a)) for a in active], device=total.device))
        return total / divisor

    return score


@dataclass
class PMORLHParams(HParams):
    reward_models: str = ""  # comma-separated OPTION=DIR (a reward model) or OPTION=labeler (its scripted score)
    mode: str = "response"  # response: rewards of the response (mean); released: of the prompt alone, as released

    def model_dirs(self) -> dict[str, str]:
        pairs = [p.strip() for p in self.reward_models.split(",") if p.strip()]
        out = {}
        for pair in pairs:
            name, _, path = pair.partition("=")
            if name not in labelers.PREFERENCES or not path:
                raise HParamsError(f"expected OPTION=DIR with OPTION one of {', '.join(labelers.PREFERENCES)}, got "
                                   f"{pair!r}", key="reward_models")
            out[name] = path
        return out

    def _validate(self):
        dirs = self.model_dirs()
        if not dirs:
            raise HParamsError("give a reward model per preference as OPTION=DIR,OPTION=DIR", key="reward_models")
        for path in dirs.values():
            if path != LABELER and not Path(path).is_dir():
                raise HParamsError(f"{path}: no such directory", key="reward_models")
        if self.mode not in MODES:
            raise HParamsError(f"expected one of {', '.join(MODES)}, got {self.mode!r}", key="mode")


@dataclass
class TrainPMORLHParams(train_policy.TrainPolicyHParams):
    pmorl: PMORLHParams = field(default_factory=PMORLHParams)  # the per-preference reward models


def reward_model_scorers(dirs: dict[str, str], *, encoding) -> dict[str, scoring.ScoreFn]:
    """{option: its scorer} for `dirs` ({option: directory or "labeler"}): a reward model is loaded
    on the CPU and moved, once, to the device of the first batch it scores; it runs in fp32. A
    labeler scores the decoded responses (`scoring.labeler_scorer`)."""
    def scorer(name: str, path: str) -> scoring.ScoreFn:
        if path == LABELER:
            return scoring.labeler_scorer(labelers.PreferenceLabeler(name), encoding=encoding)
        model = load_reward_model(path, encoding=encoding).eval().requires_grad_(False)

        @torch.no_grad()
        def score(queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
            return model.to(responses.device)(queries, responses, pad_token=encoding.padding_token).float()
        return score

    return {name: scorer(name, path) for name, path in dirs.items()}


def train(hp: TrainPMORLHParams, *, exp_name: str) -> Path:
    """PPO (train_policy) rewarded by `pmorl_scorer` over `hp.pmorl`'s reward models."""
    hp.validate()
    encoding = lm_tasks.load_pretrained(hp.task.policy.initial_model).encoding
    scorers = reward_model_scorers(hp.pmorl.model_dirs(), encoding=encoding)
    return train_policy.train(hp, exp_name=exp_name,
                              score_fn=pmorl_scorer(scorers, encoding=encoding, mode=hp.pmorl.mode))
