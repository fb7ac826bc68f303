"""qlora vs PEFT + bitsandbytes: one QLoRA training step, same model, same batch, same settings.

    .venv/bin/python benchmarks/bench_vs_peft.py                      # the issue's setting (CPU: ~10 min)
    .venv/bin/python benchmarks/bench_vs_peft.py --repeats 3 --budget 1GiB --json runs/bench.json

Model: Llama-style, hidden 768, 8 layers, GQA 12/4 heads, MLP 2048, vocab 32,000, untied head
(99.5M params), random bf16 weights written once to a temp folder. Both paths: NF4 + double
quantization, bf16 compute, LoRA r=16 / alpha 16 on all linear layers, gradient checkpointing
(non-reentrant), AdamW, batch 4 x 512 tokens. `--dtype float32` runs both paths in fp32 (for timing
on CPUs where bf16 matmuls are slow; memory ratios are then those of an fp32 step).
  peft:  from_pretrained(BitsAndBytesConfig) + prepare_model_for_kbit_training + get_peft_model
  qlora: qlora.load_4bit + add_lora + prepare_for_training + chunked head/loss (qlora.losses)
Each run is a fresh process; runs alternate A B A B. Memory is measured by the same method for
both (memprofile.measure: allocator events on CPU, max_memory_allocated on CUDA); the first
loss of each path is printed to show they compute the same thing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {
    # the CPU setting: 99.5M params
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=32768),
    # the GPU setting: TinyLlama-1.1B's shape (1.10B params), for benchmarks/gpu.sh
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=131072),
}
CONFIG = CONFIGS["100m"]


def make_model(folder: Path, config: dict) -> None:
    """Random bf16 weights, written once (built on the GPU when there is one: seconds, not minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(folder)


class StepModule(torch.nn.Module):
    """Wraps a model so that forward returns the training loss (what measure_step differentiates)."""

    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, input_ids, labels):
        return self.loss(self.model, input_ids, labels)


def build(path: str, folder: str, rank: int, chunk: int, upcast: bool = False, dtype=torch.bfloat16):
    if path == "peft":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear"))
        return StepModule(model, lambda m, ids, y: m(input_ids=ids, labels=y).loss)
    import qlora
    from qlora.losses import causal_lm_loss
    model = qlora.load_4bit(folder, compute_dtype=dtype)
    qlora.add_lora(model, qlora.LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear"))
    qlora.prepare_for_training(model, checkpointing=True, upcast_norms=upcast)
    if chunk <= 0:
        return StepModule(model, lambda m, ids, y: m(input_ids=ids, labels=y).loss)
    return StepModule(model, lambda m, ids, y: causal_lm_loss(m, ids, y, chunk_size=chunk))


def worker(args) -> dict:
    """One fresh process: build, measure one step, time a few more. Prints one JSON line."""
    from memprofile.measure import measure_step_or_oom
    torch.manual_seed(1)
    step = build(args.worker, args.folder, args.rank, args.chunk, args.upcast, getattr(torch, args.dtype))
    if args.longest:
        return longest_in_process(step, args)
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids.to(_device(step)), "labels": ids.to(_device(step))}
    with torch.no_grad():
        first_loss = step(**batch).item()
    optimizer = None
    if args.optim == "adamw8bit":
        import bitsandbytes as bnb
        optimizer = lambda params: bnb.optim.AdamW8bit(params, lr=1e-5)
    m = measure_step_or_oom(step, batch, loss_fn=lambda out, b: out, optimizer=optimizer, warmup_steps=1,
                            timed_steps=args.timed)
    return {"path": args.worker, "variant": {"chunk": args.chunk, "upcast": args.upcast, "optim": args.optim}, "batch": args.batch, "seq": args.seq, "first_loss": first_loss, "fits": m.fits,
            "bytes": m.bytes(), "peak_method": m.peak_method, "step_seconds": m.step_seconds}


def _device(module) -> torch.device:
    return next(module.parameters()).device


def longest_in_process(step, args) -> dict:
    """CUDA: the longest batch-1 sequence whose step fits the budget, probed in this process.

    The allocator is capped at the budget (set_per_process_memory_fraction), so a probe that would
    need more fails with OOM like it would on a card of that size; a probe fits when the step ran
    and max_memory_allocated stayed within the budget. Doubling from 1024, then bisection to 1024."""
    from memprofile.measure import measure_step_or_oom
    from qlora.sizes import parse_size
    budget, device = parse_size(args.longest), _device(step)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    probes = {}

    def fits(seq):
        ids = torch.randint(0, CONFIG["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(2)).to(device)
        t = time.perf_counter()
        m = measure_step_or_oom(step, {"input_ids": ids, "labels": ids}, loss_fn=lambda out, b: out,
                                warmup_steps=0, timed_steps=0)
        ok = bool(m.fits and m.peak is not None and m.peak <= budget)
        probes[seq] = {"fits": ok, "peak": m.peak, "seconds": time.perf_counter() - t}
        print(f"  {args.worker}: seq {seq:>6}: peak {(m.peak or 0) / 2**20:10.1f} MiB -> {'fits' if ok else 'no'}",
              file=sys.stderr, flush=True)
        return ok

    t0 = time.perf_counter()
    good, complete = search_longest(fits, 1024, CONFIG["max_position_embeddings"], 1024,
                                    in_time=lambda: time.perf_counter() - t0 < args.search_seconds)
    return {"path": args.worker, "budget": budget, "longest_seq": good, "complete": complete, "probes": probes}


def run_worker(path: str, folder: str, batch: int, seq: int, opts, **variant) -> dict:
    v = {"chunk": opts.chunk, "upcast": False, "optim": "adamw", **variant}
    cmd = [sys.executable, __file__, "--worker", path, "--folder", folder, "--batch", str(batch), "--seq", str(seq),
           "--rank", str(opts.rank), "--chunk", str(v["chunk"]), "--timed", str(opts.timed), "--optim", v["optim"],
           "--dtype", opts.dtype]
    cmd += ["--upcast"] if v["upcast"] else []
    cmd += ["--search-seconds", str(opts.search_seconds), "--size", opts.size]
    cmd += ["--longest", variant["longest"]] if variant.get("longest") else []
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{path} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def longest_seq(path: str, folder: str, budget: int, opts, lo: int = 128, hi: int = 32768) -> int:
    """Largest seq (multiple of 128, batch 1) whose measured peak fits `budget`, by bisection."""
    def fits(seq):
        r = run_worker(path, folder, 1, seq, opts)
        ok = r["fits"] and r["bytes"]["peak"] <= budget
        print(f"  {path}: seq {seq:>6}: peak {r['bytes']['peak'] / 2**20:8.1f} MiB -> {'fits' if ok else 'no'}", flush=True)
        return ok
    return search_longest(fits, lo, hi, 128)[0]


def search_longest(fits, start: int, hi: int, step: int, in_time=lambda: True) -> tuple[int, bool]:
    """(largest length that fits, whether the search finished): doubling from `start` up to `hi`,
    then bisection to `step`; stops early (complete=False) once `in_time()` turns false."""
    good, bad, seq = 0, None, start
    while bad is None and seq <= hi and in_time():
        if fits(seq):
            good, seq = seq, seq * 2
        else:
            bad = seq
    while bad is not None and bad - good > step and in_time():
        mid = (good + bad) // 2 // step * step
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good, (bad is not None and bad - good <= step) or (bad is None and seq > hi)


def compare(runs: dict, result: dict, args) -> None:
    """Medians, ratios and the per-category table of the A B A B runs (printed; added to `result`)."""
    med = {k: {"step": statistics.median(r["step_seconds"] for r in v),
               "peak": statistics.median(r["bytes"]["peak"] for r in v)} for k, v in runs.items()}
    result.update(median=med, step_time_ratio=med["qlora"]["step"] / med["peft"]["step"],
                  peak_ratio=med["qlora"]["peak"] / med["peft"]["peak"])
    print(f"\nbatch {args.batch} x {args.seq}, r={args.rank}, {args.repeats} repeats\n")
    print("| category (MiB) | PEFT + bitsandbytes | qlora | ratio |\n|---|---|---|---|")
    for key in runs["peft"][0]["bytes"]:
        a, b = runs["peft"][-1]["bytes"][key], runs["qlora"][-1]["bytes"][key]
        print(f"| {key} | {mib(a)} | {mib(b)} | {b / a if a else float('nan'):.3f} |")
    print(f"| step time (s, median) | {med['peft']['step']:.3f} | {med['qlora']['step']:.3f} | "
          f"{result['step_time_ratio']:.3f} |")
    tokens = args.batch * args.seq
    result["tokens_per_second"] = {k: tokens / v["step"] for k, v in med.items()}
    print(f"| tokens/s | {tokens / med['peft']['step']:,.0f} | {tokens / med['qlora']['step']:,.0f} | "
          f"{med['peft']['step'] / med['qlora']['step']:.3f} |")
    print(f"\nfirst loss: PEFT {runs['peft'][0]['first_loss']:.5f}, qlora {runs['qlora'][0]['first_loss']:.5f}")


def mib(n) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["peft", "qlora"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help="model folder (default: generated once in the temp dir)")
    p.add_argument("--size", default="100m", choices=sorted(CONFIGS), help="model shape (1b: for GPUs)")
    p.add_argument("--longest", default=None, help=argparse.SUPPRESS)
    p.add_argument("--in-process", action="store_true",
                   help="longest-context search inside one process per path with the allocator capped at the "
                        "budget (CUDA only; default: one fresh process per probe)")
    p.add_argument("--search-seconds", type=float, default=float("inf"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--chunk", type=int, default=256, help="qlora's loss chunk in tokens (0: the model's own loss)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype of both paths (bf16 is ~5x slower than fp32 on CPUs without AVX512-BF16)")
    p.add_argument("--upcast", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--optim", default="adamw", help=argparse.SUPPRESS)
    p.add_argument("--ablate", action="store_true", help="also measure each qlora saver on its own")
    p.add_argument("--timed", type=int, default=2, help="unprofiled steps timed per run")
    p.add_argument("--repeats", type=int, default=2, help="A B pairs")
    p.add_argument("--budget", default="1GiB", help="memory budget for the longest-context search ('' to skip)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    global CONFIG
    CONFIG = CONFIGS[args.size]
    if args.worker:
        print(json.dumps(worker(args)))
        return
    folder = Path(args.folder or Path(tempfile.gettempdir()) / f"qlora-bench-llama-{args.size}")
    make_model(folder, CONFIG)
    runs = {"peft": [], "qlora": []}
    t0 = time.time()
    print(f"model {args.size} in {folder}; device: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}", flush=True)
    for i in range(args.repeats):
        for path in ("peft", "qlora"):       # alternate A B A B
            r = run_worker(path, str(folder), args.batch, args.seq, args)
            runs[path].append(r)
            print(f"run {i + 1} {path}: step {r['step_seconds']:.2f} s, peak {mib(r['bytes']['peak'])} MiB, "
                  f"first loss {r['first_loss']:.5f}", flush=True)
    result = {"machine": os.uname().nodename, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "date": time.strftime("%Y-%m-%d"), "args": vars(args), "runs": runs}
    def save():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2))
    if args.repeats > 0:
        compare(runs, result, args)
        save()
    print(f"\n{time.time() - t0:.0f} s so far", flush=True)
    if args.ablate:
        print("\nqlora savers, each changed on its own (peak MiB / step s):")
        variants = {"default (chunked loss, no up-cast, AdamW)": {}, "model's own loss (no chunking)": {"chunk": 0},
                    "fp32 up-cast of norms/embeddings/head": {"upcast": True}, "8-bit AdamW": {"optim": "adamw8bit"}}
        result["ablation"] = {}
        for name, v in variants.items():
            r = run_worker("qlora", str(folder), args.batch, args.seq, args, **v)
            result["ablation"][name] = r
            print(f"| {name} | {mib(r['bytes']['peak'])} | {r['step_seconds']:.2f} | optimizer {mib(r['bytes']['optimizer'])} |",
                  flush=True)
    if args.budget:
        from qlora.sizes import parse_size
        budget = parse_size(args.budget)
        print(f"\nlongest context at batch 1 within {args.budget}:")
        if args.in_process:
            searches = {path: run_worker(path, str(folder), 1, 0, args, longest=args.budget) for path in ("peft", "qlora")}
            result["longest_search"] = searches
            longest = {path: r["longest_seq"] for path, r in searches.items()}
        else:
            longest = {path: longest_seq(path, str(folder), budget, args) for path in ("peft", "qlora")}
        result["longest_seq"] = longest
        result["longest_seq_ratio"] = longest["qlora"] / max(longest["peft"], 1)
        print(f"PEFT {longest['peft']}, qlora {longest['qlora']} tokens (ratio {result['longest_seq_ratio']:.2f})")
    save()


if __name__ == "__main__":
    main()
