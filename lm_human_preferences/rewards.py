"""Reward model: GPT-2 trunk + scalar head at the last token, with trainable gain and bias.

    r(x, y) = gain * (w . h_last + b) + bias

`h_last` is the final hidden state (after ln_f) at the last position of query || response; as a
pad's output is that of the most recent real token, truncated responses are read at their
last real token. The head starts at w ~ N(0, 1/sqrt(d+1)), b = 0, gain 1, bias 0.
Normalization (docs/original.md §5) sets gain and bias from statistics of raw rewards, see
`normalization_constants`; the trainer computes those statistics.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from lm_human_preferences.language.checkpoints import CheckpointError, build_gpt, load_weights
from lm_human_preferences.language.gpt import GPT


class RewardModel(nn.Module):
    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        d = gpt.config.n_embd
        self.reward_head = nn.Linear(d, 1)
        nn.init.normal_(self.reward_head.weight, std=1 / math.sqrt(d + 1))
        nn.init.zeros_(self.reward_head.bias)
        self.reward_gain = nn.Parameter(torch.ones(()))
        self.reward_bias = nn.Parameter(torch.zeros(()))

    def raw_rewards(self, queries: torch.Tensor, responses: torch.Tensor, *, pad_token: int) -> torch.Tensor:
        """w . h_last + b for queries (B, Lq) and responses (B, Lr) -> (B,) fp32."""
        h = self.gpt.hidden_states(torch.cat([queries, responses], 1), pad_token=pad_token)  # (B, T, D)
        with torch.autocast(h.device.type, enabled=False):  # fp32 like the LM head, not autocast's bf16
            return self.reward_head(h[:, -1].float()).squeeze(-1)  # (B,)

    def forward(self, queries: torch.Tensor, responses: torch.Tensor, *, pad_token: int) -> torch.Tensor:
        """Normalized rewards (B,) fp32."""
        return self.reward_gain * self.raw_rewards(queries, responses, pad_token=pad_token) + self.reward_bias

    @torch.no_grad()
    def set_normalization(self, *, gain: float, bias: float) -> None:
        self.reward_gain.fill_(gain)
        self.reward_bias.fill_(bias)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {"reward.weight": self.reward_head.weight, "reward.bias": self.reward_head.bias,
                "reward.gain": self.reward_gain, "reward.gain_bias": self.reward_bias}

    def load_head_state(self, heads: dict[str, torch.Tensor], source) -> None:
        want = {"reward.weight": self.reward_head.weight, "reward.bias": self.reward_head.bias,
                "reward.gain": self.reward_gain, "reward.gain_bias": self.reward_bias}
        missing = [k for k in want if k not in heads]
        if missing:
            raise CheckpointError(f"{source}: not a reward model (missing heads {missing})")
        wrong = [f"{k}: {list(heads[k].shape)} vs {list(v.shape)}" for k, v in want.items()
                 if heads[k].numel() != v.numel()]
        if wrong:
            raise CheckpointError(f"{source}: reward heads do not fit the model ({', '.join(wrong)})")
        with torch.no_grad():
            self.reward_head.weight.copy_(heads["reward.weight"].reshape(self.reward_head.weight.shape))
            self.reward_head.bias.copy_(heads["reward.bias"].reshape(1))
            self.reward_gain.copy_(heads["reward.gain"].reshape(()))
            self.reward_bias.copy_(heads["reward.gain_bias"].reshape(()))


def normalization_constants(*, mean: float, std: float, target_mean: float, target_std: float) -> tuple[float, float]:
    """Gain and bias mapping raw rewards of the given mean/std to the target statistics."""
    gain = target_std / std
    return gain, target_mean - gain * mean


def load_reward_model(path: str | Path, *, encoding) -> RewardModel:
    """A reward model saved by `train_reward` (trunk, head, gain and bias) for a policy of `encoding`."""
    weights = load_weights(path)
    if weights.meta.get("kind") != "reward":
        raise CheckpointError(f"{path}: not a reward model (kind={weights.meta.get('kind')!r}); "
                              "train one with `launch.py train_reward`")
    if weights.meta.get("encoding", "gpt2") != encoding.to_meta():
        raise CheckpointError(f"{path}: the reward model and the policy use different encodings "
                              f"({str(weights.meta.get('encoding'))[:60]} vs {str(encoding.to_meta())[:60]})")
    model = RewardModel(build_gpt(weights, path))
    model.load_head_state(weights.heads, path)
    return model
