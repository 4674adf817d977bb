"""Policy = GPT-2 + LM head + value head, as in the original's `policy.py`.

    policy = Policy(gpt)
    responses = policy.respond(contexts, length=24, temperature=0.7, pad_token=pad)   # (B, L)
    out = policy(contexts, responses, temperature=0.7, pad_token=pad)
    out.logprobs, out.values, out.entropies                                           # (B, L) fp32

`respond` samples with the KV cache; logprobs and values for PPO always come from the full
forward pass of `forward` (`analyze_responses` in the original), both for the rollout and for
training, so the first PPO ratio is exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lm_human_preferences.language.gpt import GPT
from lm_human_preferences.language.sample import sample_sequence
from lm_human_preferences.ppo import logprobs_and_entropies


@dataclass
class Analysis:
    logprobs: torch.Tensor  # (B, L) fp32, under logits / temperature
    values: torch.Tensor  # (B, L) fp32, value before each response token
    entropies: torch.Tensor | None  # (B, L) fp32, without gradient (only logged); None when not asked for


class Policy(nn.Module):
    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.value_head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)  # the original zero-initialises the value head
        nn.init.zeros_(self.value_head.bias)

    @torch.no_grad()
    def respond(self, contexts: torch.Tensor, *, length: int, temperature: float, pad_token: int,
                generator: torch.Generator | None = None, shard: tuple[int, int] | None = None) -> torch.Tensor:
        """Exactly `length` sampled tokens after each (padded) context (B, Tc) -> (B, length);
        `shard=(rank, world_size)`: see `language.sample.sample_from_logits`."""
        return sample_sequence(self.gpt, contexts, length=length, temperature=temperature,
                               pad_token=pad_token, generator=generator, shard=shard)

    def forward(self, contexts: torch.Tensor, responses: torch.Tensor, *, temperature: float,
                pad_token: int, entropies: bool = True) -> Analysis:
        """Logprobs, values and (unless not asked for: a pass over the (B, L, V) logprobs)
        entropies of `responses` (B, L) after `contexts` (B, Tc)."""
        Tc = contexts.shape[1]
        h = self.gpt.hidden_states(torch.cat([contexts, responses], 1), pad_token=pad_token)  # (B, Tc+L, D)
        h = h[:, Tc - 1:-1]  # the states that predict each response token (B, L, D)
        logits = self.gpt.lm_logits(h) / temperature  # (B, L, V) fp32
        with torch.autocast(h.device.type, enabled=False):  # fp32 like the LM head, not autocast's bf16
            values = self.value_head(h.float()).squeeze(-1)  # (B, L)
        logprobs, ent = logprobs_and_entropies(logits, responses, entropies=entropies)
        return Analysis(logprobs=logprobs, values=values, entropies=ent)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {f"value.{k}": v for k, v in self.value_head.state_dict().items()}
