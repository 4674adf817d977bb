"""The `sampling` section of `bench/run.py`: `language.sample.sample_sequence` against transformers
`GPT2LMHeadModel.generate` on identical weights (fixed length, temperature 0.7, no top-k/top-p),
fp32 and bf16 autocast, with our prefill alone timed beside them (the same matmul work for any
implementation: transformers' time over it is the bound, the ratio if our decode steps cost
nothing) and, on CPU, repeated calls inside `keep_decoding_weights`."""

from __future__ import annotations

import contextlib
import copy

import torch

from bench.common import (TEMPERATURE, OthersCpu, build_pair, fmt_cores, fmt_others, forward_flops, interleaved,
                          load_average, median, model_config, precisions, sampling_flops, table)


def bench_sampling(sz: dict, dev: torch.device) -> dict:
    cfg = model_config(sz["model"])
    ours, hf = build_pair(cfg, dev)
    out = dict(config=cfg.to_dict(), query=sz["query"], response=sz["response"], temperature=TEMPERATURE,
               **_sampling_at(ours, hf, cfg, dev, batch=sz["batch"], query=sz["query"], response=sz["response"],
                              repeats=sz["repeats"]))
    if sz["more_batches"]:
        out["more_batches"] = {str(B): _sampling_at(ours, hf, cfg, dev, batch=B, query=sz["query"],
                                                    response=sz["response"], repeats=sz["repeats"])
                               for B in sz["more_batches"]}
    return out


def _sampling_at(ours, hf, cfg, dev: torch.device, *, batch: int, query: int, response: int, repeats: int) -> dict:
    B, Tc, L = batch, query, response
    pad = cfg.n_vocab + 2  # our padding token (outside the vocabulary, as the library uses it)
    torch.manual_seed(1)
    context = torch.randint(0, cfg.n_vocab - 1, (B, Tc)).to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)  # sample_from_logits draws on the logits' device
    work = dict(new_tokens=B * L, flops=sampling_flops(cfg, batch=B, query=Tc, response=L),
                prefill_flops=forward_flops(cfg, batch=B, positions=list(range(Tc)), head_positions=1))
    rows = {}
    for prec, autocast in precisions(dev).items():
        fns = {"ours": _sample_run(ours, context, autocast, length=L, pad=pad, gen=gen),
               "transformers": _peer_sample_run(hf, context, autocast, length=L),
               "ours_prefill": _prefill_run(ours, context, autocast, length=L, pad=pad)}
        with contextlib.ExitStack() as kept:
            if dev.type == "cpu":
                # Repeated sampling from a fixed model inside `keep_decoding_weights` (collecting
                # labels, reward statistics): the weights packed once, not on every call. A copy of
                # the model, so that the other runs keep packing theirs.
                ours_kept = kept.enter_context(copy.deepcopy(ours).keep_decoding_weights())
                fns["ours_kept"] = _sample_run(ours_kept, context, autocast, length=L, pad=pad, gen=gen)
            watch = OthersCpu()
            times = interleaved(fns, dev=dev, repeats=repeats)
            others = watch.cores()
        rows[prec] = r = _sampling_row(times, others, **work)
        kept_note = f"; weights kept across calls: ratio {r['ratio_kept']:.2f}x" if "ours_kept" in times else ""
        print(f"  sampling {prec} batch {B}: ours {r['ours_tokens_per_s']:8.1f} tok/s  transformers "
              f"{r['peer_tokens_per_s']:8.1f} tok/s  ratio {r['ratio']:.2f}x  (ours: prefill "
              f"{r['ours_prefill_s']:.3f} s + {L - 1} decode steps {r['ours_decode_s']:.3f} s{kept_note}; other "
              f"processes {fmt_cores(others)})", flush=True)
    return dict(batch=B, model_flops=work["flops"], prefill_flops=work["prefill_flops"], precisions=rows)


def _sample_run(model, context: torch.Tensor, autocast, *, length: int, pad: int, gen: torch.Generator):
    """Our sampling of `length` tokens after `context`, as a timed run."""
    from lm_human_preferences.language.sample import sample_sequence

    def run():
        with autocast():
            out = sample_sequence(model, context, length=length, temperature=TEMPERATURE, pad_token=pad, generator=gen)
        assert out.shape == (context.shape[0], length)
    return run


def _peer_sample_run(hf, context: torch.Tensor, autocast, *, length: int):
    """transformers' `generate` of exactly `length` tokens, the same sampling, as a timed run."""
    def run():
        with autocast(), torch.no_grad():
            out = hf.generate(input_ids=context, attention_mask=torch.ones_like(context), do_sample=True,
                              top_k=0, top_p=1.0, temperature=TEMPERATURE, min_new_tokens=length,
                              max_new_tokens=length, pad_token_id=hf.config.pad_token_id)
        assert out.shape == (context.shape[0], context.shape[1] + length), out.shape
    return run


def _prefill_run(model, context: torch.Tensor, autocast, *, length: int, pad: int):
    """Our prefill alone, as `sample_sequence` starts (packing the weights for decoding on CPU,
    the context through the cache, logits at its last position): the part of sampling that is
    the same matmul work for every implementation."""
    @torch.no_grad()
    def run():
        with autocast():
            cache = model.new_cache(context.shape[0], context.shape[1] + length)
            model.pack_for_decoding(cache)
            out = model(context, pad_token=pad, cache=cache, logits=False)
            model.lm_logits(out.hidden[:, -1], cache)
    return run


def _sampling_row(times: dict[str, list[float]], others: float | None, *, new_tokens: int, flops: float,
                  prefill_flops: float) -> dict:
    """One precision's sampling results from the timed runs' seconds."""
    t_ours, t_peer, t_pre = (median(times[k]) for k in ("ours", "transformers", "ours_prefill"))
    row = dict(ours_s=t_ours, peer_s=t_peer, ours_tokens_per_s=new_tokens / t_ours,
               peer_tokens_per_s=new_tokens / t_peer, ratio=t_peer / t_ours,
               ours_prefill_s=t_pre, ours_decode_s=t_ours - t_pre, ratio_bound=t_peer / t_pre,
               ours_flops_per_s=flops / t_ours, peer_flops_per_s=flops / t_peer,
               prefill_flops_per_s=prefill_flops / t_pre,
               times=times, load=load_average(), others_cores=others)
    if "ours_kept" in times:
        t_kept = median(times["ours_kept"])
        row.update(ours_kept_s=t_kept, ratio_kept=t_peer / t_kept)
    return row


def sampling_table(s: dict, *, query: int, response: int) -> str:
    rows = [[p, f"{r['ours_tokens_per_s']:.1f}", f"{r['peer_tokens_per_s']:.1f}", f"{r['ratio']:.2f}x",
             f"{r['ours_s']:.3f}", f"{r['peer_s']:.3f}", f"{r['ours_prefill_s']:.3f}",
             f"{r['ours_decode_s']:.3f}", f"{r['ratio_bound']:.2f}x",
             f"{r['ratio_kept']:.2f}x" if "ratio_kept" in r else "n/a", fmt_others(r)]
            for p, r in s["precisions"].items()]
    return table(f"sampling: batch {s['batch']}, query {query}, response {response} "
                 f"(new tokens/s; ratio = ours / transformers.generate; bound = transformers s / our "
                 f"prefill s, the ratio if our decode steps cost nothing; kept = the ratio of repeated "
                 f"calls inside `keep_decoding_weights`, which pack the weights once)",
                 ["precision", "ours tok/s", "transformers tok/s", "ratio", "ours s", "transformers s",
                  "ours prefill s", "ours decode s", "bound", "kept", "others' CPU"], rows)
