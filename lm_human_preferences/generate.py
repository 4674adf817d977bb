"""A model's outputs for a file of prompts, as JSON lines (`launch.py generate`).

    python launch.py generate offline_sentiment base --prompts=examples/prompts.jsonl --num_samples=4
    python launch.py generate offline_sentiment tuned --model=runs/demo/policy --prompts=examples/prompts.jsonl

The prompt file is a `.txt` file (one prompt per non-blank line) or a `.jsonl` file with one
object a line holding the prompt as `"prompt"` (or as `"text"`, the query datasets' field).
Each prompt is used whole, in file order (a query dataset's passages are trimmed and shuffled
instead; see `language.datasets`). The model sees `task.query_prefix` ‖ prompt ‖
`task.query_suffix` and samples `length` tokens (default `task.response_length`) at
`temperature` (default `task.policy.temperature`, the one its policy trained at) within the
top-p nucleus; each response is then cut after `task.truncate_token` as the task's reward model
and labelers see it (`scoring.postprocess`).

`<save_dir>/outputs.jsonl` has one row per (prompt, sample), prompt by prompt:

    {"prompt": ..., "response": ..., "sample": 0, "prompt_tokens": [...], "response_tokens": [...], "seed": 0}

`prompt` is the prompt as the file has it, `response` text without special tokens
(`<|endoftext|>`), `prompt_tokens` the ids the model saw for the prompt (without prefix and
suffix), `response_tokens` the response's (cut, no padding), `seed` the run's seed (`run.seed`).
Rows are sampled `batch_size` at a time, each batch from its own generator (seed, batch): the
same command gives the same file (on CPU, under the same number of threads; see the README's
Determinism). Under torchrun the ranks take turns at the batches (batch b on rank b mod N) and
rank 0 gathers the rows and writes the file: the same file for any N.

Best-of-N (`best_of=N` with `reward_model=DIR`): each row is the best of N responses sampled for
it (`best_of_n.keep_best`; the prompt's sample s is the best of its candidates s·N .. s·N + N − 1,
sampled as rows of `num_samples · N` samples a prompt would be). `reward_model` scores every
candidate as `evaluate` does (its encoding; the truncation penalty applies), and each row gets
`score`, `best_of` and `candidate` fields. The paper samples the candidates at temperature 1.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lm_human_preferences import best_of_n, distributed, evaluate, lm_tasks, scoring
from lm_human_preferences.hparams import HParams, HParamsError, check_count, check_number
from lm_human_preferences.language import memory
from lm_human_preferences.language.checkpoints import atomic_write_bytes
from lm_human_preferences.language.sample import sample_sequence
from lm_human_preferences.logs import print0, progress
from lm_human_preferences.runtime import Run, RunHParams
from lm_human_preferences.trainer import run_training

OUTPUTS_FILE = "outputs.jsonl"


@dataclass
class GenerateHParams(HParams):
    run: RunHParams = field(default_factory=RunHParams)  # how it runs: device, precision, seed, outputs
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)  # prompt prefix/suffix, truncation
    model: str = ""  # the model to sample: a directory or a name under saved_models/ (empty: task.policy.initial_model)
    prompts: str = ""  # the prompt file: .txt (a prompt a line) or .jsonl ({"prompt"} or {"text"} a line)
    num_samples: int = 1  # responses per prompt
    temperature: Optional[float] = None  # sampling temperature, 0 for greedy (unset: task.policy.temperature)
    top_p: float = 1.0  # sample from the most probable tokens that make up this much probability (1: all)
    length: int = 0  # tokens sampled per response (0: task.response_length)
    batch_size: int = 64  # (prompt, sample) rows sampled at once
    best_of: int = 1  # best-of-N: keep the best of this many responses per row by reward_model's score (1: off)
    reward_model: str = ""  # the reward model (train_reward's) that picks the best of best_of responses

    def _validate(self):
        if not self.model and not self.task.policy.initial_model:
            raise HParamsError("no model given; pass --model=DIR (or a name under saved_models/)", key="model")
        if not self.prompts:
            raise HParamsError("no prompt file given; pass --prompts=FILE (.txt or .jsonl)", key="prompts")
        path = Path(self.prompts)
        if path.suffix not in (".txt", ".jsonl"):
            raise HParamsError(f"{path}: expected a .txt file (a prompt a line) or a .jsonl file ({{\"prompt\": "
                               f"...}} a line)", key="prompts")
        if not path.is_file():
            raise HParamsError(f"{path}: no such file", key="prompts")
        for key in ("num_samples", "batch_size", "best_of"):
            check_count(self, key)
        if (self.best_of > 1) != bool(self.reward_model):
            raise HParamsError("best-of-N keeps the best of --best_of=N responses by a reward model's score; pass both "
                               "--best_of=N (N > 1) and --reward_model=DIR", key="reward_model" if self.best_of > 1
                               else "best_of")
        if self.reward_model and not Path(self.reward_model).is_dir():
            raise HParamsError(f"{self.reward_model}: no such directory", key="reward_model")
        check_count(self, "length", at_least=0)
        if self.temperature is not None:
            check_number(self, "temperature", at_least=0)
        check_number(self, "top_p", above=0, at_most=1)

    def response_length(self) -> int:
        return self.length or self.task.response_length

    def sampling_temperature(self) -> float:
        return self.task.policy.temperature if self.temperature is None else self.temperature


def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """(where, prompt) of every prompt of a `.txt` or `.jsonl` prompt file (see the module
    docstring), at least one; a problem is an HParamsError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise HParamsError(f"{path}: cannot read it as UTF-8 text ({e})", key="prompts") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        prompts.append((where, line if path.suffix == ".txt" else _jsonl_prompt(line, where)))
    if not prompts:
        raise HParamsError(f"{path}: holds no prompts", key="prompts")
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise HParamsError(f"{where}: invalid JSON ({e}); expected one object a line", key="prompts") from None
    fields = [f for f in ("prompt", "text") if isinstance(row, dict) and f in row]
    if not fields:
        raise HParamsError(f'{where}: expected an object with a "prompt" (or "text") field', key="prompts")
    prompt = row[fields[0]]
    if not isinstance(prompt, str) or not prompt:
        raise HParamsError(f"{where}: field {fields[0]!r}: expected a non-empty string, got {prompt!r:.60}",
                           key="prompts")
    return prompt


def affix_length(task: lm_tasks.TaskHParams, encoding) -> int:
    """Tokens of the query prefix and suffix the model sees around each prompt."""
    return len(encoding.encode(task.query_prefix)) + len(encoding.encode(task.query_suffix))


def encode_prompts(hp: GenerateHParams, prompts: list[tuple[str, str]], model: lm_tasks.PretrainedModel
                   ) -> list[list[int]]:
    """Each prompt's tokens, checked to fit the model's context with the prefix, the suffix and
    the response. A prompt the vocabulary can only approximate is sampled anyway, with one
    warning on stderr for the file."""
    enc, n_ctx = model.encoding, model.gpt.config.n_ctx
    around = affix_length(hp.task, enc)
    encoded, approximate = [], []
    for where, prompt in prompts:
        try:
            tokens = enc.encode(prompt)
        except ValueError as e:  # the 'test' encoding has no token for some characters
            raise HParamsError(f"{where}: {e}", key="prompts") from None
        if not tokens:
            raise HParamsError(f"{where}: the prompt encodes to no tokens; give some text", key="prompts")
        # The last sampled token is never fed back, so the model sees one token less.
        if around + len(tokens) + hp.response_length() - 1 > n_ctx:
            affixes = f", the query prefix and suffix ({around})" if around else ""
            raise HParamsError(f"{where}: the prompt ({len(tokens)} tokens){affixes} and {hp.response_length()} "
                               f"response tokens exceed the context of {model.path} ({n_ctx} tokens); shorten the "
                               f"prompt or pass a smaller --length", key="prompts")
        if enc.decode(tokens) != prompt:
            approximate.append(where)
        encoded.append(tokens)
    if approximate:
        print0(f"warning: {len(approximate)} prompt(s), the first at {approximate[0]}, hold text the vocabulary "
               f"of {model.path} cannot represent exactly; the model sees an approximation", file=sys.stderr)
    return encoded


@torch.no_grad()
def generate(hp: GenerateHParams, *, run: Run, model: lm_tasks.PretrainedModel, prompts: list[str],
             prompt_tokens: list[list[int]]) -> list[dict]:
    """The rows of outputs.jsonl (see the module docstring), on rank 0; [] on the other ranks,
    which sample their turns of the batches (batch b on rank b mod world_size)."""
    enc, task, n = model.encoding, hp.task, hp.num_samples * hp.best_of
    prefix, suffix = enc.encode(task.query_prefix), enc.encode(task.query_suffix)
    order = [(i, s) for i in range(len(prompts)) for s in range(n)]
    gpt = model.gpt.to(run.device).eval()
    mine: list[tuple[int, list[dict]]] = []  # (batch, its rows)
    bar = progress(total=len(order), desc="generate", unit="sample")
    with gpt.keep_decoding_weights():  # one packing of the weights for every batch (CPU)
        for batch, start in enumerate(range(0, len(order), hp.batch_size)):
            chunk = order[start:start + hp.batch_size]
            if batch % run.world_size != run.rank:
                bar.update(len(chunk))  # rank 0 counts the other ranks' batches as its own go
                continue
            contexts = [prefix + prompt_tokens[i] + suffix for i, _ in chunk]
            width = max(map(len, contexts))  # left-padded: the model masks pads, positions start after them
            context = torch.tensor([[enc.padding_token] * (width - len(c)) + c for c in contexts], device=run.device)
            with run.autocast():
                responses = sample_sequence(gpt, context, length=hp.response_length(),
                                            temperature=hp.sampling_temperature(), top_p=hp.top_p,
                                            pad_token=enc.padding_token,
                                            generator=run.generator("sample", batch, shared=True))  # (B, L)
            shown = scoring.postprocess(responses, task=task, pad_token=enc.padding_token).tolist()
            rows = []
            for (i, s), tokens in zip(chunk, shown):
                tokens = [t for t in tokens if t != enc.padding_token]
                rows.append({"prompt": prompts[i], "response": enc.decode(tokens, skip_special=True), "sample": s,
                             "prompt_tokens": prompt_tokens[i], "response_tokens": tokens, "seed": hp.run.seed})
            mine.append((batch, rows))
            bar.update(len(chunk))
    bar.close()
    return distributed.gather_batches(mine)


def keep_best_rows(hp: GenerateHParams, run: Run, candidates: list[dict], scorer) -> list[dict]:
    """The best of each `best_of` consecutive candidates by the reward model's score, scored as
    `evaluate` scores an output file."""
    reward_model, encoding = scorer
    as_eval = evaluate.EvaluateHParams(task=hp.task, outputs="the best-of-N candidates", reward_model=hp.reward_model,
                                       batch_size=hp.batch_size)
    encoded = evaluate.encode_rows(candidates, as_eval, encoding=encoding, n_ctx=reward_model.gpt.config.n_ctx)
    scores, _ = evaluate.reward_scores(as_eval, run=run, reward_model=run.place(reward_model).eval(),
                                       encoding=encoding, encoded=encoded)
    return best_of_n.keep_best(candidates, scores, n=hp.best_of)


class Generator:
    """`generate` as a trainer of `trainer.run_training`: no steps to checkpoint, no model to save."""

    checkpoints, steps_done, model = False, 0, None

    def __init__(self, *, run: Run, hp: GenerateHParams, model: lm_tasks.PretrainedModel,
                 prompts: list[tuple[str, str]], prompt_tokens: list[list[int]], scorer=None):
        self.run, self.hp, self.pretrained, self.prompts, self.prompt_tokens = run, hp, model, prompts, prompt_tokens
        self.scorer = scorer  # (reward model, its encoding) for best-of-N, or None
        self.rows: list[dict] = []

    def train(self, logger) -> dict[str, float]:
        started = time.perf_counter()
        self.rows = generate(self.hp, run=self.run, model=self.pretrained, prompts=[p for _, p in self.prompts],
                             prompt_tokens=self.prompt_tokens)
        if not self.run.is_main:
            return {}
        stats = {}
        if self.scorer is not None:
            self.rows = keep_best_rows(self.hp, self.run, self.rows, self.scorer)
            stats["generate/best_of_score"] = sum(r["score"] for r in self.rows) / len(self.rows)
        stats |= {"generate/rows": len(self.rows), "generate/prompts": len(self.prompts),
                 "generate/response_tokens": sum(len(r["response_tokens"]) for r in self.rows) / len(self.rows),
                 "elapsed/s": time.perf_counter() - started}
        logger.log(0, stats)
        return stats

    def save(self, save_dir: Path) -> None:
        atomic_write_bytes(save_dir / OUTPUTS_FILE, "".join(json.dumps(row) + "\n" for row in self.rows).encode())

    def saved(self, final: dict[str, float]) -> str:
        best = f", each the best of {self.hp.best_of}" if self.hp.best_of > 1 else ""
        return (f"wrote {len(self.rows)} outputs ({len(self.prompts)} prompts x {self.hp.num_samples}{best}) to "
                f"{self.run.save_dir / OUTPUTS_FILE}")


def build_generator(hp: GenerateHParams, run: Run) -> Generator:
    """Read and encode the prompts, load the model, check that a sampling batch fits; the generator."""
    prompts = read_prompts(hp.prompts)
    model = lm_tasks.load_pretrained(hp.model or hp.task.policy.initial_model)
    prompt_tokens = encode_prompts(hp, prompts, model)
    width = affix_length(hp.task, model.encoding) + max(map(len, prompt_tokens)) + hp.response_length()
    rows = min(hp.batch_size, len(prompts) * hp.num_samples * hp.best_of)
    lm_tasks.check_memory(run.device, [("batch_size", memory.kv_cache_bytes(
        model.gpt.config, rows=rows, tokens=width, value_bytes=2 if run.bf16 else 4),
        f"sampling {rows} responses at once")])
    scorer = evaluate.load_scorer(hp.reward_model) if hp.reward_model else None
    return Generator(run=run, hp=hp, model=model, prompts=prompts, prompt_tokens=prompt_tokens, scorer=scorer)


def train(hp: GenerateHParams, *, exp_name: str) -> Path:
    """`launch.py generate`: write `<save_dir>/outputs.jsonl`; returns its path. Rerunning a
    finished command does nothing."""
    return run_training(hp, exp_name=exp_name, build=lambda run: build_generator(hp, run),
                        outputs=(OUTPUTS_FILE,)) / OUTPUTS_FILE
