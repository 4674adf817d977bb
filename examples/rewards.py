"""Reward functions for PPO in place of a trained reward model:

    python launch.py train_policy offline_sentiment my_ppo --rewards.function=examples/rewards.py:keyword_reward

A reward function gets one batch of this process's rollouts as text: `queries` (the prompts,
padding removed) and `responses` (the policy's continuations, cut after the task's truncation
token, padding removed), and returns one score per response: a list of numbers, or a 1-D
tensor or array. Higher is better. The task's penalty for responses without a truncation token
and the KL penalty are applied to these scores as they are to a reward model's.
"""

import re

import torch

POSITIVE = frozenset("happy glad good great kind lovely warm nice sweet cheerful proud pleased smiled "
                     "laughed loved".split())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def keyword_reward(queries: list[str], responses: list[str]) -> list[float]:
    """The number of positive words in each response (the prompt is not looked at)."""
    return [float(sum(w in POSITIVE for w in words(r))) for r in responses]


def novelty_reward(queries: list[str], responses: list[str]) -> torch.Tensor:
    """The fraction of a response's words that its prompt does not use (0 for an empty response):
    a reward that reads the prompt, returned as a tensor."""
    scores = []
    for q, r in zip(queries, responses):
        seen, said = set(words(q)), words(r)
        scores.append(sum(w not in seen for w in said) / len(said) if said else 0.0)
    return torch.tensor(scores)
