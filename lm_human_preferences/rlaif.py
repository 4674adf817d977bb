"""A language model as the labeler (RLAIF; RLCD-Rescore): which of two responses it prefers.

    labeler = ModelLabeler(pretrained, device=torch.device("cpu"))
    labeler.win2_probs(["\\n\\nHuman: hi\\n\\nAssistant:"], ["Choose the more harmless response."],
                       ["go away."], ["hello, glad to help."])          # [0.83]: P(B is better)

The model reads `dialogues.label_prompt` (the conversation, the principle, options (A) and (B),
"The answer is: (") and the preference is its next-token probabilities of "A" and "B",
renormalised over the two: win2_prob = p(B) / (p(A) + p(B)) (the paper's softmax over the two
logits). A prompt longer than the model's context keeps its end (the options and the question).
"""

from __future__ import annotations

from typing import Sequence

import torch

from lm_human_preferences.language.dialogues import label_prompt
from lm_human_preferences.language.encodings import Encoding
from lm_human_preferences.language.gpt import GPT


class LabelerError(ValueError):
    """The model cannot serve as a labeler (its vocabulary has no single token for A or B)."""


def choice_tokens(encoding: Encoding) -> tuple[int, int]:
    """The token ids of "A" and "B" right after "(" (the labeler prompt's last character)."""
    ids = []
    for letter in "AB":
        try:
            after = encoding.encode("(" + letter)
            before = encoding.encode("(")
        except ValueError:  # an encoding without the letter
            after, before = [], []
        if len(after) != len(before) + 1 or after[:len(before)] != before or encoding.decode(after[-1:]) != letter:
            raise LabelerError(f"the model's vocabulary has no token {letter!r} after '('; a labeler model needs "
                               f"one (e.g. a model trained on the labeling format, or GPT-2)")
        ids.append(after[-1])
    return ids[0], ids[1]


class ModelLabeler:
    """Reads the preference of `gpt` (with `encoding`) between two responses; see the module docstring."""

    def __init__(self, gpt: GPT, encoding: Encoding, *, device: torch.device, batch_size: int = 32):
        self.gpt, self.encoding, self.device, self.batch_size = gpt.to(device).eval(), encoding, device, batch_size
        self.tokens = choice_tokens(encoding)

    @torch.no_grad()
    def win2_probs(self, dialogues: Sequence[str], principles: Sequence[str], responses_a: Sequence[str],
                   responses_b: Sequence[str]) -> list[float]:
        """P(B is better) of each (dialogue, principle, A, B), `batch_size` prompts at a time."""
        prompts = [label_prompt(*row) for row in zip(dialogues, principles, responses_a, responses_b)]
        if len(prompts) != len(dialogues):
            raise ValueError("win2_probs needs as many principles and responses as dialogues")
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._probs(prompts[start:start + self.batch_size])
        return out

    def _probs(self, prompts: list[str]) -> list[float]:
        n_ctx, pad = self.gpt.config.n_ctx, self.encoding.padding_token
        encoded = [self.encoding.encode(p)[-n_ctx:] for p in prompts]
        width = max(map(len, encoded))
        tokens = torch.tensor([[pad] * (width - len(t)) + t for t in encoded], device=self.device)  # (B, T) left-padded
        logits = self.gpt(tokens, pad_token=pad).logits[:, -1]  # (B, V)
        pair = logits[:, list(self.tokens)].float().log_softmax(-1)  # (B, 2) over A and B
        return pair[:, 1].exp().tolist()
