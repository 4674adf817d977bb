"""The `ops` (hot spots beside their alternatives) and `peak` (matmul peak, memory bandwidth)
sections of `bench/run.py`."""

from __future__ import annotations

import torch

from bench.common import (TEMPERATURE, OthersCpu, describe, fmt_cores, interleaved, median, model_config, now,
                          peak_products)


# ---- hot spots: micro-benchmarks of the operations the profiles point at ---------------------------

def bench_ops(sz: dict, dev: torch.device) -> dict:
    """Alternatives for the costliest small pieces of sampling and training, timed side by side."""
    cfg = model_config(sz["model"])
    B, L, D, V = sz["batch"], sz["response"], cfg.n_embd, cfg.n_vocab
    torch.manual_seed(3)
    W = torch.randn(V, D, device=dev) * 0.02
    h = torch.randn(B, D, device=dev)
    logits = torch.randn(B, V, device=dev) * 3
    gen = torch.Generator(device=dev).manual_seed(0)
    out: dict = {"batch": B, "n_embd": D, "n_vocab": V, "device": dev.type}

    watch = OthersCpu()

    def section(name, fns):
        times = interleaved(fns, dev=dev, repeats=max(5, sz["repeats"]))
        out[name] = {k: median(v) for k, v in times.items()}
        print(f"  {name}: " + "  ".join(f"{k} {v * 1e3:.2f} ms" for k, v in out[name].items()), flush=True)

    section("lm_head_step", _lm_head_ops(h, W, dev=dev))
    section("draw_token", _draw_token_ops(logits, gen, dev=dev))
    # A fresh tensor of the tied embedding's size (as the embedding gradient and the grad
    # accumulation allocate every step) vs filling one that exists: the difference is page faults.
    grad_buf = torch.zeros(V, D, device=dev)
    section("embedding_sized_buffer", {
        "torch.zeros (fresh)": lambda: torch.zeros(V, D, device=dev),
        "fill_ (reused)": lambda: grad_buf.fill_(0),
    })
    train_logits = (torch.randn(B, L, V, device=dev) * 3).requires_grad_()
    tokens = torch.randint(0, V, (B, L), device=dev)
    section("logprobs_and_entropy", _logprobs_ops(train_logits, tokens))
    out["others_cores"] = watch.cores()
    return out


def _lm_head_ops(h: torch.Tensor, W: torch.Tensor, *, dev: torch.device) -> dict:
    """One decode step's LM head (B, D) x (V, D)^T in fp32: F.linear (MKL) is what transformers
    runs; W @ h^T is the same product in the layout MKL handles better; on CPU ours decodes with
    oneDNN-packed weights (GPT.pack_for_decoding)."""
    import torch.nn.functional as F

    W_bf16 = W.bfloat16()
    head = {
        "F.linear(h, W) fp32": lambda: F.linear(h, W),
        "(W @ h.T).T fp32": lambda: (W @ h.t()).t(),
        "F.linear bf16 weight": lambda: F.linear(h.bfloat16(), W_bf16),
    }
    if dev.type == "cpu" and torch.backends.mkldnn.is_available():  # what our decoding steps use on CPU
        from lm_human_preferences.language.kernels import onednn_linear, onednn_pack

        W_packed = onednn_pack(W, h.shape[0])
        head["oneDNN-packed W fp32 (ours, decoding)"] = lambda: onednn_linear(h, W_packed, None)
    return head


def _draw_token_ops(logits: torch.Tensor, gen: torch.Generator, *, dev: torch.device) -> dict:
    """Drawing one token per row (softmax included): ours is inverse-CDF sampling with float64
    sums (one uniform per row); the exponential race draws V exponentials per row; transformers
    uses torch.multinomial."""
    from lm_human_preferences.language.sample import sample_from_logits

    B, V = logits.shape

    def inverse_cdf_fp32(p):
        cdf = p.cumsum(-1)  # (B, V)
        u = torch.rand(B, 1, device=dev, generator=gen) * cdf[:, -1:]  # scaled by the total: fp32 cumsum rounding
        return torch.searchsorted(cdf, u, right=True).clamp_(max=V - 1)

    return {
        "sample_from_logits (ours: inverse CDF, float64)": lambda: sample_from_logits(
            logits, temperature=TEMPERATURE, generator=gen),
        "inverse CDF, float32": lambda: inverse_cdf_fp32(torch.softmax(logits / TEMPERATURE, -1)),
        "exponential race": lambda: (torch.softmax(logits / TEMPERATURE, -1)
                                     / torch.empty_like(logits).exponential_(1, generator=gen)).argmax(-1),
        "torch.multinomial (transformers)": lambda: torch.multinomial(
            torch.softmax(logits / TEMPERATURE, -1), 1, generator=gen),
    }


def _logprobs_ops(train_logits: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Logprobs and the logged entropy of the training step's (B, L, V) logits: both from one
    log-softmax, the entropy without a graph (Policy.forward), vs the entropy from the logits in
    the autograd graph (the first edition), vs no entropy at all (rollout analysis)."""
    from lm_human_preferences.ppo import entropy_from_logits, logprobs_and_entropies, logprobs_from_logits

    return {
        "logprobs + entropy_from_logits in the graph (before)":
            lambda: (logprobs_from_logits(train_logits, tokens), entropy_from_logits(train_logits)),
        "logprobs only": lambda: logprobs_from_logits(train_logits, tokens),
        "logprobs_and_entropies (ours)": lambda: logprobs_and_entropies(train_logits, tokens),
    }


# ---- limits: matmul peak and memory bandwidth ---------------------------------------------------

def bench_peak(sz: dict, dev: torch.device) -> dict:
    out = {"sizes": sz["peak_sizes"], "threads": torch.get_num_threads(), "device": describe(dev)}
    if dev.type == "cuda":
        # What "fp32" means for every cuda section: torch's default is full fp32 matmuls (no TF32).
        out.update(float32_matmul_precision=torch.get_float32_matmul_precision(),
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    # On a GPU one kernel is short against a synchronize: time several back to back.
    calls = 10 if dev.type == "cuda" else 1
    watch = OthersCpu()
    # The peak is the best of torch.mm and, on CPU, a oneDNN-packed product (`peak_products`).
    for prec in ("fp32", "bf16"):
        per_kernel: dict[str, dict[int, float]] = {}
        for n in sz["peak_sizes"]:
            for name, fn in peak_products(prec, dev, n).items():
                kernel = name.removeprefix("matmul ")
                for _ in range(2):
                    fn()
                best = float("inf")
                for _ in range(sz["peak_repeats"]):
                    t0 = now(dev)
                    for _ in range(calls):
                        fn()
                    best = min(best, (now(dev) - t0) / calls)
                per_kernel.setdefault(kernel, {})[n] = 2 * n ** 3 / best
        out[f"{prec}_by_size"] = per_kernel["torch.mm"]
        out[f"{prec}_by_kernel"] = per_kernel
        kernel, by_size = max(per_kernel.items(), key=lambda kv: max(kv[1].values()))
        out[f"{prec}_flops_per_s"], out[f"{prec}_kernel"] = max(by_size.values()), kernel
        print(f"  peak {prec}: {max(by_size.values()) / 1e9:.1f} GFLOP/s ({kernel}; square matmuls, best of "
              f"{sz['peak_repeats']} at each size: " +
              "; ".join(f"{k} " + ", ".join(f"{n}: {f / 1e9:.0f}" for n, f in v.items())
                        for k, v in per_kernel.items()) + ")", flush=True)
    # Streaming read bandwidth: what bounds single-token decoding, which reads every weight per step.
    x = torch.ones(sz["bandwidth_mb"] * 2 ** 20 // 4, device=dev)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = now(dev)
        for _ in range(calls):
            x.sum()
        best = min(best, (now(dev) - t0) / calls)
    out["read_bytes_per_s"] = x.numel() * 4 / best
    out["others_cores"] = watch.cores()
    print(f"  memory read bandwidth: {x.numel() * 4 / best / 1e9:.1f} GB/s (sum over {sz['bandwidth_mb']} MiB); "
          f"other processes {fmt_cores(out['others_cores'])}", flush=True)
    return out
