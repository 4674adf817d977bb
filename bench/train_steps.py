"""The training-step section of `bench/run.py` (`--only train`): forward + backward of each kind of
step the trainers take, ours against transformers doing the same work on identical weights, in
fp32 and under bf16 autocast. Every ratio compares the same work:

  ppo     the PPO minibatch step: `Policy.forward` (logits at the response positions only,
          logprobs of the responses under temperature, values), loss logprobs.sum() + values.sum();
          transformers: `logits_to_keep` for the response positions, log-softmax under
          temperature, gather of the responses.
  lm      the next-token loss at every position, what pretraining and SFT train on:
          `train_sft.lm_loss` on batch x (length + 1) tokens (`length` targets a row);
          transformers: `GPT2LMHeadModel(input_ids, labels=input_ids)` on batch x length tokens
          (logits at all `length` positions, `length` - 1 targets a row).
  reward  the reward model's score at the last token (`RewardModel.forward`, summed);
          transformers: its `GPT2Model` trunk and a linear head at the last position.

The same rounds also time a square matmul (`round_peak_size`) at the step's precision (torch.mm and,
on CPU, a oneDNN-packed product), the matmul peak under the same conditions as the steps: a
step's `bound` is transformers' time over the time of the step's model FLOPs at that rate, the
best ratio any implementation of the same work reaches on this machine (the host's speed drifts
too much between sections for the `peak` section's number to serve).

The step functions are shared with `bench/peak_memory.py`, which measures the peak memory of
one step of a single model in a fresh process.
"""

from __future__ import annotations

import torch

from bench.common import (TEMPERATURE, OthersCpu, build_pair, fmt_cores, fmt_others, interleaved, load_average,
                          median, model_config, peak_products, precisions, table, train_flops)

STEPS = ("ppo", "lm", "reward")
PEER_WHAT = {"ppo": "logits_to_keep + log-softmax + gather", "lm": "GPT2LMHeadModel(labels=...)",
             "reward": "GPT2Model + linear head at the last token"}


def step_inputs(cfg, *, batch: int, query: int, response: int, dev: torch.device, seed: int = 2) -> dict:
    """Random tokens (batch, query + response + 1) and their views: contexts, responses, `lm`'s
    batch (every position a target), the pad token (one outside the vocabulary: there are none)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.n_vocab - 1, (batch, query + response + 1), generator=g).to(dev)
    T = query + response
    return dict(tokens=tokens[:, :T], contexts=tokens[:, :query], responses=tokens[:, query:T],
                lm_batch={"tokens": tokens, "mask": torch.ones(batch, T, dtype=torch.bool, device=dev)},
                pad=cfg.n_vocab + 2)


def ours_step(kind: str, gpt, x: dict, autocast, dev: torch.device):
    """A function running one `kind` step of ours (forward under `autocast`, backward, gradients freed)."""
    from lm_human_preferences.policy import Policy
    from lm_human_preferences.rewards import RewardModel
    from lm_human_preferences.train_sft import lm_loss

    model = {"ppo": lambda: Policy(gpt), "lm": lambda: gpt, "reward": lambda: RewardModel(gpt)}[kind]().to(dev).train()

    def loss():
        if kind == "ppo":
            out = model(x["contexts"], x["responses"], temperature=TEMPERATURE, pad_token=x["pad"])
            return out.logprobs.sum() + out.values.sum()
        if kind == "lm":
            return lm_loss(model, x["lm_batch"], pad_token=x["pad"])
        return model(x["contexts"], x["responses"], pad_token=x["pad"]).sum()

    def run():
        with autocast():
            value = loss()
        value.backward()
        model.zero_grad(set_to_none=True)
    return run


def peer_step(kind: str, hf, x: dict, autocast, dev: torch.device):
    """transformers doing the work of `ours_step(kind, ...)`."""
    hf.eval()  # no dropout: the same computation as ours (dropout is 0 anyway)
    head = torch.nn.Linear(hf.config.n_embd, 1).to(dev) if kind == "reward" else None
    L = x["responses"].shape[1]

    def loss():
        tokens = x["tokens"]
        if kind == "ppo":
            logits = hf(input_ids=tokens, logits_to_keep=L + 1).logits[:, :-1].float() / TEMPERATURE
            return torch.log_softmax(logits, -1).gather(-1, x["responses"][..., None]).sum()
        if kind == "lm":
            return hf(input_ids=tokens, labels=tokens).loss
        h = hf.transformer(input_ids=tokens).last_hidden_state[:, -1]
        with torch.autocast(dev.type, enabled=False):  # fp32, as our reward head
            return head(h.float()).sum()

    def run():
        with autocast():
            value = loss()
        value.backward()
        hf.zero_grad(set_to_none=True)
        if head is not None:
            head.zero_grad(set_to_none=True)
    return run


def step_flops(cfg, kind: str, *, batch: int, query: int, response: int) -> float:
    """Model FLOPs of a step (see `common.forward_flops`): LM-head products at the response
    positions (ppo), at every position (lm), at none (reward)."""
    T = query + response
    return train_flops(cfg, batch=batch, length=T, head_positions={"ppo": response, "lm": T, "reward": 0}[kind])


def bench_train(sz: dict, dev: torch.device) -> dict:
    cfg = model_config(sz["model"])
    ours, hf = build_pair(cfg, dev)
    if sz["compile"]:  # both compiled; the first (untimed) round of `interleaved` compiles
        ours.compile_blocks()
        hf = torch.compile(hf)
    B, Tc, L = sz["train_batch"], sz["query"], sz["response"]
    x = step_inputs(cfg, batch=B, query=Tc, response=L, dev=dev)
    n = sz["round_peak_size"]
    steps: dict = {kind: {} for kind in STEPS}
    for prec, autocast in precisions(dev).items():
        products = peak_products(prec, dev, n)
        for kind in STEPS:
            watch = OthersCpu()
            times = interleaved({"ours": ours_step(kind, ours, x, autocast, dev),
                                 "transformers": peer_step(kind, hf, x, autocast, dev), **products},
                                dev=dev, repeats=sz["repeats"])
            others = watch.cores()
            t_ours, t_peer = median(times["ours"]), median(times["transformers"])
            flops = step_flops(cfg, kind, batch=B, query=Tc, response=L)
            peak = max(2 * n ** 3 / median(times[k]) for k in products)
            steps[kind][prec] = dict(ours_s=t_ours, peer_s=t_peer, ratio=t_peer / t_ours,
                                     ours_tokens_per_s=B * (Tc + L) / t_ours, peer_tokens_per_s=B * (Tc + L) / t_peer,
                                     ours_flops_per_s=flops / t_ours, peer_flops_per_s=flops / t_peer,
                                     round_peak_flops_per_s=peak, bound=t_peer * peak / flops, times=times,
                                     load=load_average(), others_cores=others)
            print(f"  train {kind} {prec}: ours {B * (Tc + L) / t_ours:8.1f} tok/s  transformers "
                  f"{B * (Tc + L) / t_peer:8.1f} tok/s (ratio {t_peer / t_ours:.2f}x; bound {t_peer * peak / flops:.2f}x "
                  f"at {peak / 1e9:.0f} GFLOP/s; other processes {fmt_cores(others)})", flush=True)
    return dict(config=cfg.to_dict(), batch=B, query=Tc, response=L, peer_work=PEER_WHAT,
                model_flops={k: step_flops(cfg, k, batch=B, query=Tc, response=L) for k in STEPS}, steps=steps)


def train_table(s: dict) -> str:
    rows = [[kind, p, f"{r['ours_tokens_per_s']:.1f}", f"{r['peer_tokens_per_s']:.1f}", f"{r['ratio']:.2f}x",
             f"{r['bound']:.2f}x" if "bound" in r else "", f"{r['ours_s']:.3f}", f"{r['peer_s']:.3f}", fmt_others(r)]
            for kind, by_prec in s["steps"].items() for p, r in by_prec.items()]
    return table(f"training step (fwd+bwd): batch {s['batch']} x {s['query'] + s['response']} tokens (tokens/s; "
                 f"ratio = ours / transformers doing the same work: "
                 + "; ".join(f"{k}: {v}" for k, v in s["peer_work"].items()) + "; bound = the best ratio here: "
                 "transformers s over the step's model FLOPs at the matmul rate of the same rounds)",
                 ["step", "precision", "ours tok/s", "transformers tok/s", "ratio", "bound", "ours s", "transformers s",
                  "others' CPU"], rows)
