"""Task-level token plumbing (docs/original.md §4): policy query formatting and response postprocessing.

    contexts = format_policy_queries(queries, prefix_tokens=enc.encode("Article:\\n\\n"),
                                     suffix_tokens=enc.encode("\\n\\nTL;DR:"))
    shown = truncate_responses(responses, truncate_token=13, truncate_after=16, pad_token=enc.padding_token)
    scores = apply_penalty(scores, responses, truncate_token=13, truncate_after=16, penalty_reward_value=-1)

The policy sees prefix ‖ padded query ‖ suffix; the reward model sees the raw padded query ‖
the truncated response. PPO trains on the raw (untruncated) responses.

As in OAI (`lm_tasks.py`: `postprocess_fn_from_hparams`, `filter_fn_from_hparams`; applied by
`train_policy.py`'s score function as `where(filter(responses), scores, penalty_reward_value)`),
truncation and the penalty only happen when `truncate_token` is set: with `truncate_token=None`
responses are left as they are and every response is valid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lm_human_preferences.hparams import HParams, HParamsError, check_count, check_number
from lm_human_preferences.language import memory
from lm_human_preferences.language.checkpoints import CheckpointError, build_gpt, load_weights
from lm_human_preferences.language.datasets import QueryDataset, QueryDatasetError, get_passages
from lm_human_preferences.language.encodings import Encoding, EncodingError, encoding_from_meta
from lm_human_preferences.language.gpt import GPT, HF_NAMES


@dataclass
class PolicyHParams(HParams):
    temperature: float = 1.0  # sampling temperature (also of the policy's logprobs)
    initial_model: str = ""  # a model directory, or a name under saved_models/ (e.g. gpt2)

    def _validate(self):
        check_number(self, "temperature", above=0)


@dataclass
class TaskHParams(HParams):
    """What the policy is asked and how its answers are cut (docs/original.md §4)."""

    query_length: int = 64  # tokens per query (padded to it)
    query_dataset: str = "books"  # a registered dataset name, or a local .txt/.jsonl file
    query_prefix: str = ""  # text before each query, seen by the policy only
    query_suffix: str = ""  # text after each query, seen by the policy only (e.g. "\n\nTL;DR:")
    start_text: Optional[str] = "."  # a query starts after this text's first occurrence (empty: at the passage start)
    end_text: Optional[str] = None  # a query ends after this text's last occurrence; passages without one are skipped
    response_length: int = 24  # tokens sampled per response
    truncate_token: Optional[int] = None  # token id ending a response (later ones become padding); None: no truncation
    truncate_after: int = 0  # truncate_token counts only from this response position on
    penalty_reward_value: float = -1.0  # the score of a response without truncate_token
    # PPO: a response ends at its first end-of-text token; later tokens are masked out (off: fixed length)
    stop_at_eos: bool = False
    # PPO: a response ends with the token completing this text's first occurrence, e.g. "\n\nHuman:" (empty: none)
    stop_text: str = ""
    policy: PolicyHParams = field(default_factory=PolicyHParams)  # the initial policy and how it samples

    def _validate(self):
        for key in ("query_length", "response_length"):
            check_count(self, key)
        if self.truncate_token is not None:
            check_count(self, "truncate_token", at_least=0)
        if not 0 <= self.truncate_after <= self.response_length:
            raise HParamsError(f"must be within [0, response_length={self.response_length}]", key="truncate_after")


@dataclass
class PretrainedModel:
    gpt: GPT
    encoding: Encoding
    path: Path


def resolve_model_dir(name_or_path: str, *, models_dir: str | os.PathLike = "saved_models") -> Path:
    """A model directory: the path itself, or `saved_models/<name>` for a name like gpt2."""
    if not name_or_path:
        raise HParamsError("no initial model given; pass --task.policy.initial_model=DIR",
                           key="task.policy.initial_model")
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = Path(models_dir) / name_or_path
    if candidate.exists():
        return candidate
    hint = (f"convert it first: python saved_models/prepare_pytorch_checkpoint.py --download {name_or_path} "
            f"--out {candidate}" if name_or_path in HF_NAMES else "pass a model directory")
    where = f"{path} and {candidate}" if candidate != path else f"{path}"
    raise CheckpointError(f"model {name_or_path!r} not found (looked at {where}); {hint}")


def load_pretrained(name_or_path: str, *, models_dir: str | os.PathLike = "saved_models") -> PretrainedModel:
    """The GPT trunk of any language model or policy `load_weights` reads, with the encoding it
    was trained with. A reward model is an error: its trunk was trained to score, not to write."""
    path = resolve_model_dir(name_or_path, models_dir=models_dir)
    weights = load_weights(path)
    if weights.meta.get("kind") == "reward":
        raise CheckpointError(f"{path}: is a reward model; start from a language model or a policy")
    try:
        encoding = encoding_from_meta(weights.meta.get("encoding"))
    except EncodingError as e:
        raise CheckpointError(f"{path}: cannot build the encoding its config.json names ({e})") from None
    if encoding.n_vocab != weights.config.n_vocab:
        raise CheckpointError(f"{path}: model vocab {weights.config.n_vocab} does not match the "
                              f"{encoding.name!r} encoding ({encoding.n_vocab})")
    return PretrainedModel(gpt=build_gpt(weights, path), encoding=encoding, path=path)


def check_task_fits(task: TaskHParams, model: PretrainedModel) -> None:
    """The policy's context (prefix ‖ query ‖ suffix) and the response must fit the model's n_ctx."""
    enc = model.encoding
    need = context_length(task, enc)
    if need > model.gpt.config.n_ctx:
        raise HParamsError(f"query, prefix, suffix and response take {need} tokens, more than the context of "
                           f"{model.path} ({model.gpt.config.n_ctx})", key="task.response_length")
    if task.truncate_token is not None and not 0 <= task.truncate_token < enc.n_vocab:
        raise HParamsError(f"{task.truncate_token} is not a token of {model.path}'s vocabulary (0 to "
                           f"{enc.n_vocab - 1}), so no response could ever be truncated", key="task.truncate_token")
    if task.stop_at_eos and enc.eot_token is None:
        raise HParamsError(f"the {enc.name!r} encoding of {model.path} has no end-of-text token to stop at",
                           key="task.stop_at_eos")


def check_memory(device: torch.device, needs: list[tuple[str, int, str]]) -> None:
    """`needs`: (option, bytes, what they hold) per `language.memory`'s lower bounds. An
    HParamsError names the first option whose batch cannot fit in `device`'s memory at all."""
    for key, nbytes, what in needs:
        if problem := memory.shortfall(nbytes, device, what):
            raise HParamsError(problem, key=key)


def context_length(task: TaskHParams, encoding: Encoding) -> int:
    """Tokens of prefix ‖ query ‖ suffix ‖ response: what the policy's passes see."""
    return (len(encoding.encode(task.query_prefix)) + task.query_length + len(encoding.encode(task.query_suffix))
            + task.response_length)


def query_dataset(task: TaskHParams, *, encoding: Encoding, data_dir: str, batch_size: int, rank: int,
                  world_size: int, seed: int) -> QueryDataset:
    """This rank's stream of (batch_size, query_length) query batches for the task."""
    try:
        passages = get_passages(task.query_dataset, data_dir=data_dir, seed=seed)
    except ValueError as e:  # not a .txt/.jsonl file nor a registered dataset
        raise HParamsError(str(e), key="task.query_dataset") from None
    return TaskQueries(passages, encoding=encoding, query_length=task.query_length,
                       start_text=task.start_text or None, end_text=task.end_text or None,
                       batch_size=batch_size, rank=rank, world_size=world_size)


# The task's setting behind each `QueryDataset` argument a `QueryDatasetError` names.
QUERY_OPTIONS = {"start_text": "task.start_text", "end_text": "task.end_text", "passages": "task.query_dataset"}


class TaskQueries(QueryDataset):
    """A `QueryDataset` whose errors name the task's settings: a `QueryDatasetError`, when it is
    built or when a batch is asked for, becomes an `HParamsError` keyed by `task.start_text`,
    `task.end_text` or `task.query_dataset`."""

    def __init__(self, passages, **kwargs):
        try:
            super().__init__(passages, **kwargs)
        except QueryDatasetError as e:
            raise HParamsError(e.problem, key=QUERY_OPTIONS[e.option]) from None

    def __next__(self) -> torch.Tensor:
        try:
            return super().__next__()
        except QueryDatasetError as e:
            raise HParamsError(e.problem, key=QUERY_OPTIONS[e.option]) from None


def policy_contexts(queries: torch.Tensor, *, task: TaskHParams, encoding: Encoding) -> torch.Tensor:
    """What the policy sees: prefix ‖ padded query ‖ suffix (B, Tc)."""
    return format_policy_queries(queries, prefix_tokens=encoding.encode(task.query_prefix),
                                 suffix_tokens=encoding.encode(task.query_suffix))


@torch.no_grad()
def sample_responses(policy, queries: torch.Tensor, *, task: TaskHParams, encoding: Encoding,
                     generator: torch.Generator | None = None, shard: tuple[int, int] | None = None) -> torch.Tensor:
    """Raw responses (B, response_length) of `policy` (a `Policy`) to `queries` (B, Lq).
    `shard=(rank, world_size)` with a generator shared by all ranks: a query's response does not
    depend on the number of ranks (see `language.sample.sample_from_logits`)."""
    contexts = policy_contexts(queries, task=task, encoding=encoding)
    return policy.respond(contexts, length=task.response_length, temperature=task.policy.temperature,
                          pad_token=encoding.padding_token, generator=generator, shard=shard)


def format_policy_queries(queries: torch.Tensor, *, prefix_tokens: list[int], suffix_tokens: list[int]) -> torch.Tensor:
    """(B, Lq) → (B, len(prefix) + Lq + len(suffix)): prefix ‖ queries ‖ suffix."""
    B = queries.shape[0]
    prefix = queries.new_tensor(prefix_tokens).reshape(1, -1).expand(B, -1)  # (B, Lp)
    suffix = queries.new_tensor(suffix_tokens).reshape(1, -1).expand(B, -1)  # (B, Ls)
    return torch.cat([prefix, queries, suffix], dim=1)


def truncation_mask(responses: torch.Tensor, *, truncate_token: int, truncate_after: int) -> torch.Tensor:
    """(B, Lr) bool, True strictly after the first `truncate_token` at index ≥ `truncate_after`."""
    hits = (responses == truncate_token).long()  # (B, Lr)
    hits[:, :truncate_after] = 0
    return (hits.cumsum(dim=1) - hits) > 0  # exclusive cumsum: a hit strictly before


def eos_mask(responses: torch.Tensor, *, eos_token: int) -> torch.Tensor:
    """(B, Lr) bool, True up to and including the first `eos_token` of each response (all True
    without one): what an EOS-aware response keeps. `truncate_responses(responses,
    truncate_token=eos_token, truncate_after=0, ...)` pads the rest; the default stays the
    original's fixed-length responses."""
    return ~truncation_mask(responses, truncate_token=eos_token, truncate_after=0)


def stop_text_mask(responses: torch.Tensor, *, text: str, decode) -> torch.Tensor:
    """(B, Lr) bool, True up to and including the token that completes the first occurrence of
    `text` in the decoded response (all True without one). Token level: a response keeps its
    shortest prefix of tokens whose decoded text (`decode(ids) -> str`) contains `text`, found by
    bisection (a prefix that contains it stays containing it as tokens are added)."""
    ends = []
    for row in responses.tolist():
        lo, hi = len(row), len(row)
        if text in decode(row):
            lo = 1
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if text in decode(row[:mid]) else (mid + 1, hi)
        ends.append(lo)
    positions = torch.arange(responses.shape[1], device=responses.device)  # (Lr,)
    return positions[None, :] < torch.tensor(ends, device=responses.device)[:, None]


def response_mask(responses: torch.Tensor, *, task: TaskHParams, encoding: Encoding) -> torch.Tensor | None:
    """(B, Lr) bool, True at the tokens a response keeps under `task.stop_at_eos` (`eos_mask`) and
    `task.stop_text` (`stop_text_mask`): the earlier stop wins. None when neither is set: the
    original's fixed-length responses."""
    if not task.stop_at_eos and not task.stop_text:
        return None
    mask = torch.ones_like(responses, dtype=torch.bool)  # (B, Lr)
    if task.stop_at_eos:
        mask &= eos_mask(responses, eos_token=encoding.eot_token)
    if task.stop_text:
        mask &= stop_text_mask(responses, text=task.stop_text, decode=encoding.decode)
    return mask


def truncate_responses(responses: torch.Tensor, *, truncate_token: int | None, truncate_after: int,
                       pad_token: int) -> torch.Tensor:
    """(B, Lr): every token after the first `truncate_token` at index ≥ `truncate_after` becomes
    `pad_token` (the truncate token stays). `truncate_token=None` returns `responses` unchanged."""
    if truncate_token is None:
        return responses
    mask = truncation_mask(responses, truncate_token=truncate_token, truncate_after=truncate_after)
    return responses.masked_fill(mask, pad_token)


def response_has_truncation(responses: torch.Tensor, *, truncate_token: int | None,
                            truncate_after: int) -> torch.Tensor:
    """(B,) bool: the response holds `truncate_token` at some index ≥ `truncate_after`
    (all True when `truncate_token` is None)."""
    if truncate_token is None:
        return torch.ones(responses.shape[0], dtype=torch.bool, device=responses.device)
    return (responses[:, truncate_after:] == truncate_token).any(dim=1)


def apply_penalty(scores: torch.Tensor, responses: torch.Tensor, *, truncate_token: int | None,
                  truncate_after: int, penalty_reward_value: float) -> torch.Tensor:
    """(B,) scores, replaced by `penalty_reward_value` where the response has no truncate token at
    index ≥ `truncate_after`. Pass the raw (untruncated) responses. No-op when `truncate_token` is None."""
    valid = response_has_truncation(responses, truncate_token=truncate_token, truncate_after=truncate_after)
    return torch.where(valid, scores, torch.full_like(scores, penalty_reward_value))
