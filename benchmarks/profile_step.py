"""What a qlora training step's time goes to: torch.profiler over one step, kernels grouped by kind.

    python benchmarks/profile_step.py --size 1b --batch 4 --seq 2048 --json runs/profile.json   # a GPU
    python benchmarks/profile_step.py --dtype float32 --batch 1 --seq 256                        # CPU smoke run

One process, one model (bench_vs_peft's `qlora` variant: `qlora train`'s defaults), and the same step
with each long-context lever on in turn (checkpoint offload, tiled MLP) and with checkpointing off: the
median step time of `--timed` steps each, then one profiled default step. Kernel (CUDA) or op (CPU)
self-time is grouped: 4-bit dequantize, matmul, attention, loss (the chunked head's softmax), copies
between host and device (the offload), and the rest (norms, activations, adds); forward vs backward
(the backward includes the checkpoint recompute) from the profiler's record_function ranges.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_vs_peft as bench  # noqa: E402

GROUPS = [  # (group, substrings of a kernel / op name), first match wins
    ("dequantize 4-bit", ("dequant", "kdequantize", "bitsandbytes")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_sdp")),
    ("host<->device copies", ("memcpy htod", "memcpy dtoh", "memcpy hto", "memcpy dto", "copy_host", "pinned")),
    ("matmul", ("gemm", "cutlass", "matmul", "addmm", "aten::mm", "bmm", "sm90_xmma", "nvjet", "cublas")),
    ("softmax / loss", ("softmax", "exp", "logsumexp", "cross_entropy", "nll")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other (norms, activations, adds, casts)"


def timed(step, batch, opt, n) -> float:
    times = []
    for _ in range(n + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(**batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])          # the first (warm-up) is not counted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="100m", choices=sorted(bench.CONFIGS))
    p.add_argument("--folder", default=None)
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--timed", type=int, default=3)
    p.add_argument("--levers", default="offload,tiled,no-ckpt", help="steps timed beside the default")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    bench.CONFIG = bench.CONFIGS[args.size]
    folder = Path(args.folder or Path("/tmp") / f"qlora-bench-llama-{args.size}")
    if not args.random_init:
        bench.make_model(folder, bench.CONFIG)
    dtype = getattr(torch, args.dtype)
    step = bench.build(bench.variant_settings("qlora"), str(folder), dtype, args.random_init).train()
    device = next(step.parameters()).device
    ids = torch.randint(0, bench.CONFIG["vocab_size"], (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(2)).to(device)
    batch = {"input_ids": ids, "labels": ids}
    opt = torch.optim.AdamW([q for q in step.parameters() if q.requires_grad], lr=1e-5)
    result = {"args": vars(args), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "step_seconds": {"default": timed(step, batch, opt, args.timed)}}
    print(f"default: {result['step_seconds']['default']:.3f} s", flush=True)

    from qlora.levers.checkpointing import disable_checkpointing, enable_checkpointing
    from qlora.levers.offload import offload_saved_tensors
    from qlora.levers.tiled_mlp import tile_mlps, untile_mlps
    model = step.model
    for lever in filter(None, args.levers.split(",")):
        if lever == "offload":
            step.context = lambda: offload_saved_tensors(model)
        elif lever == "tiled":
            tile_mlps(model, tile=1024, min_tokens=0)
        elif lever == "no-ckpt":
            disable_checkpointing(model)
        try:
            result["step_seconds"][lever] = timed(step, batch, opt, args.timed)
            print(f"{lever}: {result['step_seconds'][lever]:.3f} s", flush=True)
        except torch.OutOfMemoryError as e:
            result["step_seconds"][lever] = f"OOM: {str(e)[:120]}"
        step.context = bench.contextlib.nullcontext
        untile_mlps(model)
        enable_checkpointing(model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    from torch.profiler import ProfilerActivity, profile, record_function
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    timed(step, batch, opt, 1)
    with profile(activities=acts) as prof:
        with record_function("forward + loss"):
            loss = step(**batch)
        with record_function("backward (with the recompute)"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    on_cuda = torch.cuda.is_available()
    groups, ranges = {}, {}
    for e in prof.key_averages():
        if e.key in ("forward + loss", "backward (with the recompute)", "optimizer"):
            ranges[e.key] = (e.device_time_total if on_cuda else e.cpu_time_total) / 1e6
            continue
        t = (e.self_device_time_total if on_cuda else e.self_cpu_time_total) / 1e6
        if t > 0 and (on_cuda or not e.key.startswith("ProfilerStep")):
            groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + t
    total = sum(groups.values())
    result.update(profile_groups_seconds=groups, profile_ranges_seconds=ranges,
                  top_kernels=[(e.key, (e.self_device_time_total if on_cuda else e.self_cpu_time_total) / 1e6)
                               for e in sorted(prof.key_averages(), key=lambda e: -(e.self_device_time_total
                                               if on_cuda else e.self_cpu_time_total))[:15]])
    print(f"\nprofiled step, {'GPU kernel' if on_cuda else 'CPU op'} self-time by group ({total:.3f} s):")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {t:.3f} s | {t / total:.1%} |")
    print("ranges: " + ", ".join(f"{k} {v:.3f} s" for k, v in ranges.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
