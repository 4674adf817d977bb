"""What the benchmark sections share: the clock (GPU-synchronised), alternating rounds, the
other processes' CPU use, our GPT and transformers' on identical weights, model FLOPs, precisions
and the tables."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

TEMPERATURE = 0.7


def precisions(dev: torch.device):
    return {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast(dev.type, dtype=torch.bfloat16)}


def describe(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


# ---- timing -------------------------------------------------------------------------------

def now(dev: torch.device) -> float:
    """time.perf_counter() once `dev` has finished the work queued so far: CUDA kernels run
    asynchronously, so without the synchronize a timed call would measure only their launch
    (and the next one would pay for it). Every timing in this file reads the clock through this."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def interleaved(fns: dict[str, Callable[[], object]], *, dev: torch.device, repeats: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, run alternately: a warm-up round, then `repeats` rounds
    whose order alternates (A B, B A, ...), so drift in machine load hits every function alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = now(dev)
            fns[name]()
            times[name].append(now(dev) - t0)
    return times


def fmt_cores(c: float | None) -> str:
    return "n/a" if c is None else f"{c:.2f} cores busy"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class OthersCpu:
    """CPU time spent by OTHER processes (and the hypervisor's steal) while a measurement runs, in
    cores: 0 on a quiet machine. From /proc/stat (all CPUs) minus this process' own CPU time. On a
    2-core machine, anything above ~0.2 means our threads were competing for a core."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        t = os.times()
        return time.monotonic(), busy, t.user + t.system

    def cores(self) -> float | None:
        end = self._read()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, others / (end[0] - self.start[0]))


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ---- models: ours and transformers' on identical weights ----------------------------------------

def model_config(spec):
    from lm_human_preferences.language.gpt import GPTConfig
    return GPTConfig.named(spec) if isinstance(spec, str) else GPTConfig(**spec)


def hf_config(cfg):
    """transformers' GPT2Config of our `cfg`: no dropout, SDPA attention."""
    from transformers import GPT2Config

    special = cfg.n_vocab - 1  # GPT-2's <|endoftext|> is its last token
    hcfg = GPT2Config(vocab_size=cfg.n_vocab, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, bos_token_id=special, eos_token_id=special, pad_token_id=special,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hcfg._attn_implementation = "sdpa"
    return hcfg


def build_pair(cfg, dev: torch.device, *, seed: int = 0):
    """(ours, hf) on `dev`: transformers' GPT2LMHeadModel with random weights, saved with
    `save_pretrained` and loaded into our GPT by `language.checkpoints.load_gpt` (the library's
    own HF loader)."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from lm_human_preferences.language.checkpoints import load_gpt

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(hf_config(cfg)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_gpt(d).eval()
    ours, hf = ours.to(dev), hf.to(dev)
    tokens = torch.randint(0, cfg.n_vocab - 1, (2, 16)).to(dev)
    with torch.no_grad():
        diff = (ours(tokens).logits - hf(tokens).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"our GPT and transformers' disagree on identical weights (max |logit diff| {diff})")
    return ours, hf


def n_matmul_params(cfg) -> int:
    """Weights of the per-token matmuls of the transformer blocks (12 d^2 per layer)."""
    return 12 * cfg.n_layer * cfg.n_embd ** 2


def forward_flops(cfg, *, batch: int, positions: list[int], head_positions: int) -> float:
    """Model FLOPs of a forward pass of `batch` sequences: a token at position p (0-based) costs
    2 * N_mm for the block matmuls and 4 * n_layer * d * (p + 1) for attention (q.k and a.v over
    the p + 1 keys it may see, i.e. causal pairs only); each position where logits are computed
    costs 2 * d * V for the LM head. Embedding lookups, layer norms, GELU and softmax are not counted."""
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.n_vocab
    per_seq = sum(2 * n_matmul_params(cfg) + 4 * L * d * (p + 1) for p in positions) + head_positions * 2 * d * V
    return float(batch * per_seq)


def sampling_flops(cfg, *, batch: int, query: int, response: int) -> float:
    """Prefill of the query (logits at its last position only), then response - 1 single-token
    steps at positions query .. query + response - 2; `response` LM-head evaluations in all."""
    return forward_flops(cfg, batch=batch, positions=list(range(query + response - 1)), head_positions=response)


def train_flops(cfg, *, batch: int, length: int, head_positions: int) -> float:
    """Forward + backward = 3 x forward (the backward costs two matmuls per forward matmul)."""
    return 3 * forward_flops(cfg, batch=batch, positions=list(range(length)), head_positions=head_positions)


def ppo_update_flops(cfg, *, batch: int, query: int, response: int, noptepochs: int) -> float:
    """One PPO update: sampling; forward passes of the policy and the reference (logits at the
    response positions) and of the reward model (no logits); `noptepochs` training passes."""
    T = query + response
    policy_fwd = forward_flops(cfg, batch=batch, positions=list(range(T)), head_positions=response)
    reward_fwd = forward_flops(cfg, batch=batch, positions=list(range(T)), head_positions=0)
    return (sampling_flops(cfg, batch=batch, query=query, response=response) + 2 * policy_fwd + reward_fwd
            + noptepochs * 3 * policy_fwd)


# ---- report -------------------------------------------------------------------------------

def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [f"\n{title}", fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [fmt(r) for r in cells[1:]])


def fmt_others(r: dict) -> str:
    c = r.get("others_cores")
    return "n/a" if c is None else f"{c:.2f}"


def peak_products(prec: str, dev: torch.device, n: int) -> dict:
    """Square (n, n) products at `prec`, one function per kernel: torch.mm and, on CPU, oneDNN
    with a packed weight (torch.mm's fp32 is MKL, which may not use the widest vector units of
    every CPU: the faster of the two is the machine's rate)."""
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(n, n, generator=g).to(dev, dtype) for _ in range(2))
    c = torch.empty(n, n, dtype=dtype, device=dev)
    fns = {"matmul torch.mm": lambda: torch.mm(a, b, out=c)}
    if dev.type == "cpu" and torch.backends.mkldnn.is_available():
        from lm_human_preferences.language.kernels import onednn_linear, onednn_pack

        packed = onednn_pack(b, n)
        fns["matmul oneDNN packed"] = lambda: onednn_linear(a, packed, None)
    return fns
