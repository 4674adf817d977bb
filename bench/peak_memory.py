#!/usr/bin/env python
"""Peak memory of one training step, ours or transformers', each in a fresh process.

    python bench/peak_memory.py --who ours --step lm --precision fp32 --model 124M --batch 16 --query 64 --response 24

prints one JSON line. `bench/run.py --only memory` runs it once per step, implementation and
precision, and tabulates the results.

Method. A fresh process builds the one model it measures (random weights: memory does not depend
on them), its inputs and the step function (`train_steps.ours_step` / `peer_step`), collects
garbage, and then:
  * cpu: resets the kernel's resident-set high-water mark (`echo 5 > /proc/self/clear_refs`),
    reads the resident set (VmRSS), runs one step and reads the high-water mark (VmHWM). The
    step's peak is VmHWM - VmRSS before it: every page the step touched on top of the model
    at rest, whoever allocated it (torch, oneDNN, Python). Where the mark cannot be reset, the
    high-water mark since the process began is used (`resource.getrusage`), which is no lower.
  * cuda: `torch.cuda.max_memory_allocated` over the step (after `reset_peak_memory_stats`)
    minus the memory allocated before it: torch's caching allocator's own count.
It is the first step of the process, so its parameter gradients are allocated inside it (as in
every step that frees them, `zero_grad(set_to_none=True)`), and on cpu no freed memory of an
earlier step is resident already. Python's tracemalloc would not see torch's allocations at all.
The allocator is the one the timings use: heap-keeping unless --glibc-malloc.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import hf_config, model_config, precisions, table  # noqa: E402
from bench.train_steps import STEPS, ours_step, peer_step, step_inputs  # noqa: E402


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def measure(step, dev: torch.device) -> dict:
    """Peak bytes `step()` adds over what is in use before it (see the module docstring)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return dict(peak_bytes=peak - before, before_bytes=before, method="torch.cuda.max_memory_allocated")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method, before = "VmHWM after clear_refs", _status_kib("VmRSS") * 1024
    except OSError:
        method, before = "ru_maxrss since start", _status_kib("VmRSS") * 1024
    step()
    peak = (_status_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return dict(peak_bytes=peak * 1024 - before, before_bytes=before, method=method)


def build(who: str, cfg, dev: torch.device):
    if who == "ours":
        from lm_human_preferences.language.gpt import GPT
        return GPT(cfg).to(dev)
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel(hf_config(cfg)).to(dev)


def bench_memory(sz: dict, dev: torch.device) -> dict:
    """The `lm` step's peak memory, ours and transformers', each precision, each in its own process."""
    spec = sz["model"] if isinstance(sz["model"], str) else json.dumps(sz["model"])
    rows = {}
    for prec in precisions(dev):
        got = {}
        for who in ("ours", "transformers"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--who", who, "--step", "lm", "--precision", prec,
                   "--model", spec, "--batch", str(sz["train_batch"]), "--query", str(sz["query"]),
                   "--response", str(sz["response"]), "--device", str(dev), "--threads", str(torch.get_num_threads())]
            cmd += ["--fp32-products", sz.get("fp32_products", "onednn")]
            proc = subprocess.run(cmd + (["--glibc-malloc"] if sz.get("glibc_malloc") else []), capture_output=True,
                                  text=True, cwd=ROOT)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            got[who] = json.loads(proc.stdout.strip().splitlines()[-1])
        ours, peer = got["ours"]["peak_bytes"], got["transformers"]["peak_bytes"]
        rows[prec] = dict(ours_bytes=ours, peer_bytes=peer, ratio=ours / peer, method=got["ours"]["method"],
                          ours_before_bytes=got["ours"]["before_bytes"], peer_before_bytes=got["transformers"]["before_bytes"])
        print(f"  memory lm {prec}: ours {ours / 2 ** 20:.0f} MiB  transformers {peer / 2 ** 20:.0f} MiB "
              f"(ratio {ours / peer:.2f}; {rows[prec]['method']})", flush=True)
    return dict(step="lm", batch=sz["train_batch"], query=sz["query"], response=sz["response"], precisions=rows)


def memory_table(s: dict) -> str:
    rows = [[p, f"{r['ours_bytes'] / 2 ** 20:.0f}", f"{r['peer_bytes'] / 2 ** 20:.0f}", f"{r['ratio']:.2f}",
             f"{r['ours_before_bytes'] / 2 ** 20:.0f}", f"{r['peer_before_bytes'] / 2 ** 20:.0f}", r["method"]]
            for p, r in s["precisions"].items()]
    return table(f"peak memory of one next-token-loss (lm) step: batch {s['batch']} x {s['query'] + s['response']} "
                 f"tokens, each in a fresh process (MiB over the model at rest; ratio = ours / transformers)",
                 ["precision", "ours MiB", "transformers MiB", "ratio", "ours before MiB", "transformers before MiB",
                  "method"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--who", choices=("ours", "transformers"), required=True)
    ap.add_argument("--step", choices=STEPS, required=True)
    ap.add_argument("--precision", choices=("fp32", "bf16"), required=True)
    ap.add_argument("--model", required=True, help="a GPT-2 size (124M, ...) or a JSON config")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--query", type=int, required=True)
    ap.add_argument("--response", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--glibc-malloc", action="store_true")
    ap.add_argument("--fp32-products", choices=("onednn", "vendor"), default="onednn")
    args = ap.parse_args(argv)
    from lm_human_preferences.language import kernels

    kernels.set_fp32_products(args.fp32_products)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.glibc_malloc:
        from lm_human_preferences.runtime import keep_freed_memory
        keep_freed_memory()
    dev = torch.device(args.device)
    cfg = model_config(json.loads(args.model) if args.model.startswith("{") else args.model)
    torch.manual_seed(0)
    model = build(args.who, cfg, dev)
    x = step_inputs(cfg, batch=args.batch, query=args.query, response=args.response, dev=dev)
    make = ours_step if args.who == "ours" else peer_step
    out = measure(make(args.step, model, x, precisions(dev)[args.precision], dev), dev)
    print(json.dumps(dict(out, who=args.who, step=args.step, precision=args.precision)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
