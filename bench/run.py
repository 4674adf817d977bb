#!/usr/bin/env python
"""Benchmarks: our GPT-2 / PPO code against peers, measured in the same process.

    python bench/run.py                          # the default sections, full sizes (~5 min on 2 idle cores)
    python bench/run.py --device cuda            # on a GPU: every section, GPU sizes -> bench/results-cuda.json
    python bench/run.py --only sampling,train    # some of: sampling, train, memory, ppo, peak, ops, ppo_scale
    python bench/run.py --only train --update    # re-measure one section into bench/results-<device>.json
    python bench/run.py --quick                  # tiny sizes: a smoke check (seconds), no JSON
    python bench/run.py --quick --only ppo_scale # the sentiment-scale PPO update at tiny sizes

Every comparison runs ours and the peer alternately (a warm-up round, then rounds in ABBA order)
and reports medians, so drift in machine speed hits both sides alike; each measurement also
records how much CPU other processes used meanwhile (`others_cores`; ~0 on a quiet machine).

  sampling  `language.sample.sample_sequence` vs transformers `GPT2LMHeadModel.generate` on
            identical weights: fixed length, temperature 0.7, no top-k/top-p, fp32 and bf16
            autocast; plus our prefill alone (the same matmul work for any implementation).
  train     forward+backward of each kind of training step, ours vs transformers doing the same
            work (`bench/train_steps.py`): the PPO minibatch step (logits at the response
            positions), the next-token loss at every position (pretraining, SFT) and the reward
            model's last-token score; fp32 and bf16 autocast.
  memory    peak memory of one next-token-loss step, ours and transformers', each in a fresh
            process (`bench/peak_memory.py` says how it is measured).
  ppo       seconds per phase of `train_policy.PPOTrainer.step` on the offline task.
  peak      the machine's matmul peak (best square matmul) and streaming read bandwidth; with
            the sections above, achieved model FLOP/s and MFU (= achieved / peak).
  ops       micro-benchmarks of the hot spots the profiles point at, beside alternatives.
  ppo_scale the PPO update at the sentiment task's scale (the project's throughput target:
            124M, batch 512, query 64, response 24, bf16, >= 550 episodes/s on one GPU): a
            random-weight 124M GPT-2 (vocab 50257) as policy, reference and reward-model trunk,
            random-token queries (nothing is downloaded), the sentiment presets of params.py;
            episodes/s, the phases as in `ppo`, and the peak GPU memory. Default on cuda only:
            on a CPU one update at this size takes many minutes (--only ppo_scale runs it anyway;
            with --quick it runs in seconds at tiny sizes).

--device cuda moves models and inputs to the GPU; every timed call then ends with
torch.cuda.synchronize() (kernels run asynchronously), autocast is CUDA's, fp32 is what torch
runs by default (no TF32 for matmuls, recorded in the JSON), and `peak` measures the GPU. GPU
sizes: sampling batch 512 (the sentiment rollout batch) and 16, training step on 128 rows (a
quarter of a 512 batch), query 64, response 24. On cpu: batch 16 for both.

Results are printed as tables and written as JSON: a full run (the default sections, not
--quick) writes bench/results-<device>.json; other runs write only where --json / --update say.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

# interleaved, model_config, now, PPO_PHASES and _timed are read through this module by tests/test_bench.py.
from bench.common import fmt_others, interleaved, load_average, model_config, now, table  # noqa: E402,F401
from bench.limits import bench_ops, bench_peak  # noqa: E402
from bench.peak_memory import bench_memory, memory_table  # noqa: E402
from bench.ppo_update import PPO_PHASES, _timed, bench_ppo, bench_ppo_scale, ppo_table  # noqa: E402,F401
from bench.sampling import bench_sampling, sampling_table  # noqa: E402
from bench.train_steps import bench_train, train_table  # noqa: E402

SECTIONS = ("sampling", "train", "memory", "ppo", "peak", "ops", "ppo_scale")
LM_STEP_TARGET, LM_MEMORY_TARGET = 1.5, 0.6  # the lm step: speed over transformers, peak memory as a fraction
PPO_SCALE_TARGET = 550  # episodes/s on one GPU


def default_sections(dev: torch.device) -> tuple[str, ...]:
    """Every section on a GPU; on a CPU all but ppo_scale (many minutes per update there)."""
    return SECTIONS if dev.type == "cuda" else tuple(s for s in SECTIONS if s != "ppo_scale")


# ---- sizes --------------------------------------------------------------------------------

def sizes(quick: bool, dev: torch.device) -> dict:
    """`batch`: sampling (and ops); `more_batches`: sampling again at these; `train_batch`: the
    training step; `round_peak_size`: the square matmul timed in the training step's rounds (the
    best size of `peak_sizes` on the machines measured); `ppo_*`: the offline task's PPO update
    (None: its presets); `scale`: ppo_scale."""
    if quick:
        tiny = dict(n_vocab=512, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
        return dict(model=tiny, batch=4, more_batches=[], train_batch=4, query=8, response=4, repeats=3,
                    peak_sizes=[128, 256], round_peak_size=256, peak_repeats=3, ppo_batch=8, ppo_nminibatches=2, ppo_noptepochs=1,
                    ppo_updates=3, bandwidth_mb=16, scale=dict(model=tiny, batch=8, query=8, response=4))
    full = dict(model="124M", query=64, response=24, repeats=5, ppo_batch=None, ppo_nminibatches=None,
                ppo_noptepochs=None, ppo_updates=5, scale=dict(model="124M", batch=512, query=64, response=24))
    if dev.type == "cuda":
        # Sampling at the sentiment rollout batch, and at 16 (latency-bound: launch overheads); the
        # training step on a quarter of it; matmuls big enough to fill a GPU.
        return dict(full, batch=512, more_batches=[16], train_batch=128, peak_sizes=[4096, 8192], round_peak_size=8192,
                    peak_repeats=8,
                    bandwidth_mb=2048)
    return dict(full, batch=16, more_batches=[], train_batch=16, peak_sizes=[1024, 2048, 3072], round_peak_size=2048,
                peak_repeats=8,
                bandwidth_mb=512)



def mfu_table(results: dict) -> dict:
    """Achieved model FLOP/s of each measured implementation as a fraction of the matmul peak."""
    peak = results.get("peak")
    if not peak:
        return {}
    measured = [("sampling", prec, r, ("ours", "peer", "prefill"))
                for prec, r in results.get("sampling", {}).get("precisions", {}).items()]
    measured += [(f"train_{kind}", prec, r, ("ours", "peer"))
                 for kind, by_prec in results.get("train", {}).get("steps", {}).items() for prec, r in by_prec.items()]
    measured += [("ppo_scale", prec, r, ("ours",)) for prec, r in results.get("ppo_scale", {}).get("precisions", {}).items()]
    rows = {}
    for section, prec, r, keys in measured:
        for who in keys:
            achieved = r[f"{who}_flops_per_s"]
            rows[f"{section}/{prec}/{who}"] = dict(flops_per_s=achieved, peak_flops_per_s=peak[f"{prec}_flops_per_s"],
                                                   mfu=achieved / peak[f"{prec}_flops_per_s"])
    return rows


def targets(results: dict) -> list[dict]:
    """The project's performance targets, met or not, from whatever sections ran. Every ratio is
    against transformers doing the same work."""
    out = []
    for prec, r in results.get("sampling", {}).get("precisions", {}).items():
        out.append(dict(target=f"sampling {prec} >= 3x transformers.generate", value=f"{r['ratio']:.2f}x",
                        met=r["ratio"] >= 3, bound=r["ratio_bound"]))
    steps = results.get("train", {}).get("steps", {})
    for kind, goal in (("lm", LM_STEP_TARGET), ("ppo", 1.2)):
        for prec, r in steps.get(kind, {}).items():
            out.append(dict(target=f"{kind} training step {prec} >= {goal}x transformers (same work)",
                            value=f"{r['ratio']:.2f}x", met=r["ratio"] >= goal, bound=r.get("bound")))
    for prec, r in results.get("memory", {}).get("precisions", {}).items():
        out.append(dict(target=f"lm step peak memory {prec} <= {LM_MEMORY_TARGET}x transformers'",
                        value=f"{r['ratio']:.2f}x", met=r["ratio"] <= LM_MEMORY_TARGET))
    for key, r in results.get("mfu", {}).items():
        section, prec, who = key.split("/")
        if section in ("train_ppo", "train_lm") and who == "ours":
            out.append(dict(target=f"{section[6:]} training step {prec} >= 50% of matmul peak", value=f"{r['mfu']:.0%}",
                            met=r["mfu"] >= 0.5))
    # The throughput target is for a GPU at full size: elsewhere the number is shown, not judged.
    scale = results.get("ppo_scale", {})
    judged = scale.get("device") == "cuda" and not results.get("quick")
    for prec, r in scale.get("precisions", {}).items():
        out.append(dict(target=f"ppo_scale >= {PPO_SCALE_TARGET} episodes/s", value=f"{r['episodes_per_s']:.1f}",
                        met=r["episodes_per_s"] >= PPO_SCALE_TARGET if judged else None,
                        why_not_judged=None if judged else ("not on a GPU" if scale.get("device") != "cuda"
                                                            else "--quick sizes")))
    return out


# ---- report -------------------------------------------------------------------------------

def report(results: dict) -> str:
    out = []
    if "sampling" in results:
        s = results["sampling"]
        for r in [s] + list(s.get("more_batches", {}).values()):
            out.append(sampling_table(r, query=s["query"], response=s["response"]))
    if "steps" in results.get("train", {}):  # (a results file from before the steps were split has none)
        out.append(train_table(results["train"]))
    if "memory" in results:
        out.append(memory_table(results["memory"]))
    if "ppo" in results:
        out.append(ppo_table("PPO update breakdown", results["ppo"]))
    if "ppo_scale" in results:
        s = results["ppo_scale"]
        out.append(ppo_table(f"PPO update at sentiment scale on {s['device_name']}, {s['queries']}", s))
    if "peak" in results:
        p = results["peak"]
        rows = [["fp32 matmul", f"{p['fp32_flops_per_s'] / 1e9:.1f} GFLOP/s"],
                ["bf16 matmul", f"{p['bf16_flops_per_s'] / 1e9:.1f} GFLOP/s"],
                ["memory read", f"{p['read_bytes_per_s'] / 1e9:.1f} GB/s"]]
        where = (f"{p['threads']} threads" if p.get("device", "cpu") == "cpu"
                 else f"{p['device']}, float32 matmul precision {p['float32_matmul_precision']}")
        out.append(table(f"machine limits (best square matmul of sizes {p['sizes']}, {where}; "
                         f"other processes' CPU {fmt_others(p)})", ["what", "measured"], rows))
        if results.get("mfu"):
            rows = [[k, f"{r['flops_per_s'] / 1e9:.1f}", f"{r['peak_flops_per_s'] / 1e9:.1f}", f"{r['mfu']:.1%}"]
                    for k, r in results["mfu"].items()]
            out.append(table("model FLOP/s utilisation (MFU = achieved model FLOP/s / measured matmul peak)",
                             ["section/precision/implementation", "GFLOP/s", "peak GFLOP/s", "MFU"], rows))
    if results.get("targets"):
        out.append(table("targets (bound: the best ratio within reach here; a training step's is transformers' "
                         "time over the time of the step's model FLOPs at the matmul rate of the same rounds; "
                         "sampling's is transformers' time over our prefill's)",
                         ["target", "measured", "met", "bound"],
                         [[t["target"], t["value"], f"n/a ({t['why_not_judged']})" if t["met"] is None
                           else "yes" if t["met"] else "NO", f"{t['bound']:.2f}x" if t.get("bound") else ""]
                          for t in results["targets"]]))
    if "ops" in results:
        o = results["ops"]
        rows = [[name, k, f"{v * 1e3:.2f}"] for name, r in o.items() if isinstance(r, dict) for k, v in r.items()]
        rows.append(["(other processes' CPU during these)", "", fmt_others(o)])
        out.append(table(f"hot spots (batch {o['batch']}, n_embd {o['n_embd']}, vocab {o['n_vocab']}, "
                         f"{o.get('device', 'cpu')}; median ms)",
                         ["operation", "variant", "ms"], rows))
    return "\n".join(out)


def machine_info(dev: torch.device) -> dict:
    import transformers
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = dict(device=dev.type, cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                cpu_capability=torch.backends.cpu.get_cpu_capability())
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=torch.cuda.get_device_name(dev), gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), float32_matmul_precision=torch.get_float32_matmul_precision())
    else:
        info["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")  # malloc settings only matter for CPU tensors
    return info


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device, list[str], Path]:
    """The options, the device, the sections to run and the default results file; a usage error
    (exit status 2) for a device that is not there, unknown sections or a results file to update
    that holds other sizes or another device's results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where models and inputs live")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but ppo_scale on cpu, all on "
                         f"cuda)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check, not a measurement")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed rounds per comparison and timed PPO updates (default 5; quick 3)")
    ap.add_argument("--update", action="store_true",
                    help="merge the sections run into the existing JSON file instead of replacing it (to re-measure "
                         "a section that other processes disturbed)")
    ap.add_argument("--json", default=None, help="where to write results (default: bench/results-<device>.json "
                                                 "for a full run, none otherwise)")
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="leave glibc's malloc as it is; by default the benchmark keeps freed memory in the heap, "
                         "as launch.py does (lm_human_preferences.runtime.keep_freed_memory)")
    ap.add_argument("--fp32-products", choices=("onednn", "vendor"), default="onednn",
                    help="CPU fp32 training products: oneDNN (launch.py's default) or MKL on Intel CPUs (vendor, "
                         "--run.fp32_products=vendor)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile our full passes (run.compile) and the peer's training model; meant for GPUs "
                         "(compiling takes minutes on a CPU); results go to bench/results-<device>-compile.json")
    args = ap.parse_args(argv)
    from lm_human_preferences.language.devices import parse_device

    try:
        dev = parse_device(args.device)
    except RuntimeError as e:
        ap.error(f"--device {args.device}: {e} (torch {torch.__version__}, built with CUDA {torch.version.cuda or 'no'})")
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(default_sections(dev))
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; expected some of {list(SECTIONS)}")
    default_json = ROOT / "bench" / f"results-{dev.type}{'-compile' if args.compile else ''}.json"
    if args.update:
        target = Path(args.json or default_json)
        old = json.loads(target.read_text()) if target.is_file() else None
        if old is not None and old.get("quick") != args.quick:
            ap.error(f"--update: {target} holds {'full-size' if args.quick else 'quick'} results; do not mix sizes")
        if old is not None and old.get("device", "cpu") != dev.type:
            ap.error(f"--update: {target} holds {old.get('device', 'cpu')} results; do not mix devices")
    return args, dev, only, default_json


def main(argv: list[str] | None = None) -> int:
    args, dev, only, default_json = parse_args(argv)
    sz = sizes(args.quick, dev)
    sz["compile"], sz["glibc_malloc"] = args.compile, args.glibc_malloc
    from lm_human_preferences.language import kernels

    sz["fp32_products"] = args.fp32_products
    kernels.set_fp32_products(args.fp32_products)
    if args.quick:
        torch.set_num_threads(1)  # tiny ops gain nothing from threads, and it keeps a smoke run immune to a busy machine
    if args.repeats is not None:
        sz["repeats"] = sz["ppo_updates"] = args.repeats
    from lm_human_preferences.runtime import keep_freed_memory

    kept = False if args.glibc_malloc else keep_freed_memory()
    info = machine_info(dev)
    info["malloc"] = "heap-keeping, as launch.py" if kept else f"glibc (GLIBC_TUNABLES={info.get('glibc_tunables')})"
    info["fp32_products"] = args.fp32_products
    gpu = f"; {info['gpu']} (CUDA {info['cuda']})" if dev.type == "cuda" else ""
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads, "
          f"{info['cpu_capability']}){gpu}, transformers {info['transformers']}, malloc {info['malloc']}; "
          f"load average {load_average()}",
          flush=True)
    results: dict = {"machine": info, "device": dev.type, "quick": args.quick, "compile": args.compile,
                     "argv": sys.argv[1:],
                     "load_start": load_average()}
    run_sections(results, only, sz, dev)
    full = not args.quick and set(default_sections(dev)) <= set(only)
    path = args.json or (str(default_json) if full or args.update else None)
    if args.update and path and Path(path).is_file():
        merged = json.loads(Path(path).read_text())
        # The file's "machine" is its first full run's; each update says where its sections were measured.
        merged.setdefault("updates", []).append({**{k: results[k] for k in ("argv", "load_start", "load_end", "wall_s",
                                                                          "machine")}, "sections": only})
        merged.update({k: results[k] for k in only})
        results = merged
    results["mfu"] = mfu_table(results)
    results["targets"] = targets(results)
    print(report(results))
    if path:
        Path(path).write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nresults written to {path}")
    return 0


def run_sections(results: dict, only: list[str], sz: dict, dev: torch.device) -> None:
    """Each section of `only` into `results`, in a fixed order, with the load and wall time."""
    t_start = time.perf_counter()
    torch.set_grad_enabled(True)
    for name, fn in (("peak", bench_peak), ("sampling", bench_sampling), ("train", bench_train),
                     ("memory", bench_memory), ("ppo", bench_ppo), ("ppo_scale", bench_ppo_scale), ("ops", bench_ops)):
        if name in only:
            print(f"[{name}]", flush=True)
            results[name] = fn(sz, dev)
            if dev.type == "cuda":  # give the next section the whole GPU (and an honest peak memory)
                gc.collect()
                torch.cuda.empty_cache()
    results["load_end"] = load_average()
    results["wall_s"] = time.perf_counter() - t_start


if __name__ == "__main__":
    sys.exit(main())
