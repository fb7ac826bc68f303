"""qlora vs the PEFT + bitsandbytes baselines people run: one QLoRA training step, same model, batch and LoRA.

    .venv/bin/python benchmarks/bench_vs_peft.py --dtype float32 --repeats 1 --timed 1     # CPU table
    .venv/bin/python benchmarks/bench_vs_peft.py --dtype float32 --variants qlora --repeats 0 --budget 1GiB \
        --in-process --search-step 128 --fit-lengths 512,1024,2048       # CPU longest context (fit, then verify)
    .venv/bin/python benchmarks/bench_vs_peft.py --size 1b --seq 2048 --json runs/bench.json      # GPU
    (benchmarks/gpu.sh runs the GPU set; BENCHMARKS.md "Baselines (issue 16)" has each command's figures)

Model: Llama-style, hidden 768, 8 layers, GQA 12/4 heads, MLP 2048, vocab 32,000, untied head
(99.5M params), random bf16 weights written once to a temp folder (`--size 1b`: TinyLlama-1.1B's
shape; `--size 8b`: Llama-3.1-8B's, for the longest-context search on a GPU). Every variant: NF4 +
double quantization, LoRA r=16 / alpha 16 / dropout 0.05 on all linear layers (`qlora train`'s
defaults), AdamW, batch 4 x 512 tokens, the compute dtype `--dtype` (bf16 default; float32 for
CPUs, where bf16 matmuls are ~5x slower).

The variants (`--variants`, comma-separated; `name:key=value+key=value` overrides one setting):
  peft             baseline 1, what transformers' Trainer / TRL's SFTTrainer with bf16=True run:
                   from_pretrained(BitsAndBytesConfig) + prepare_model_for_kbit_training (fp32 norms,
                   embeddings, head) + get_peft_model, non-reentrant checkpointing, bf16 autocast around
                   forward and loss (in an fp32 run there is no autocast: it would change nothing)
  peft-no-upcast   baseline 2: the same without prepare_model_for_kbit_training's up-casts (a careful user)
  peft-offload     baseline 3: baseline 1 + transformers' checkpoint offload
                   (activation_checkpointing_enable(offload=True): torch's save_on_cpu(pin_memory=True))
  peft-liger       baseline 4 (CUDA only): baseline 1 + Liger Kernel's fused linear cross-entropy
  peft-no-autocast baseline 1 without autocast: what every GPU figure before issue 16 compared against
  qlora            `qlora train`'s defaults: adapters in the compute dtype, no up-casts, non-reentrant
                   checkpointing, chunked head + loss (256 tokens), no offload
  qlora-model-loss / qlora-upcast / qlora-no-ckpt   one saver off: the model's own loss / fp32 up-casts /
                   no checkpointing
  qlora-offload / qlora-tiled   the long-context levers on their own (checkpointed inputs to host memory;
                   the MLP in 256-token tiles)
  keys: kbit, autocast, offload, liger, chunk, upcast, ckpt, blocks (checkpoint only the first N blocks),
        tile (MLP tile in tokens, 0 off), tile_min (tile only from this length on)

Each run is a fresh process; runs go A B C ... A B C (`--repeats`). Memory is measured by the same
method for all (memprofile.measure: the exact allocator-event peak on CPU, max_memory_allocated on
CUDA). The first loss of each variant (eval mode, no dropout) is printed to show they compute the
same thing. Beside the measured time: the step's matmul floor, from its analytic FLOPs and this
machine's measured matmul rate at the step's shapes (`step_floor`).
"""
from __future__ import annotations

import argparse
import contextlib
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
    # Llama-3.1-8B's shape (8.03B params): the 24 GiB longest-context target (GPU only)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
               rope_theta=500000.0),
}
CONFIG = CONFIGS["100m"]

# every setting a variant can change, with the defaults of `qlora train`
DEFAULTS = dict(path="qlora", kbit=True, autocast=True, offload=False, liger=False, chunk=256, upcast=False,
                ckpt=True, blocks=-1, tile=0, tile_min=0)
VARIANTS = {
    "peft": dict(path="peft"),
    "peft-no-upcast": dict(path="peft", kbit=False),
    "peft-offload": dict(path="peft", offload=True),
    "peft-liger": dict(path="peft", liger=True),
    "peft-no-autocast": dict(path="peft", autocast=False),
    "qlora": dict(),
    "qlora-model-loss": dict(chunk=0),
    "qlora-upcast": dict(upcast=True),
    "qlora-no-ckpt": dict(ckpt=False),
    "qlora-offload": dict(offload=True),
    "qlora-tiled": dict(tile=256),
}
CPU_VARIANTS = "peft,peft-no-upcast,peft-offload,qlora,qlora-model-loss,qlora-upcast,qlora-no-ckpt"
GPU_VARIANTS = "peft,peft-no-upcast,peft-offload,peft-liger,peft-no-autocast,qlora,qlora-model-loss,qlora-no-ckpt"
LORA = dict(r=16, lora_alpha=16, lora_dropout=0.05)


def variant_settings(spec: str) -> dict:
    """'qlora' or 'qlora:blocks=4+tile=512' -> the full settings dict."""
    name, _, over = spec.partition(":")
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    v = {**DEFAULTS, **VARIANTS[name]}
    for item in filter(None, over.split("+")):
        key, _, value = item.partition("=")
        if key not in DEFAULTS or key == "path":
            raise SystemExit(f"variant {spec!r}: unknown key {key!r}; keys: {', '.join(k for k in DEFAULTS if k != 'path')}")
        v[key] = type(DEFAULTS[key])(int(value)) if isinstance(DEFAULTS[key], (bool, int)) else value
    return v


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
    """Wraps a model so that forward returns the training loss (what measure_step differentiates),
    under the variant's autocast and offload contexts."""

    def __init__(self, model, loss, context=contextlib.nullcontext):
        super().__init__()
        self.model, self.loss, self.context = model, loss, context

    def forward(self, input_ids, labels):
        with self.context() as self.last_context:       # the offloader's stats, when offloading
            return self.loss(self.model, input_ids, labels)


def build(v: dict, folder: str, dtype=torch.bfloat16, random_init: bool = False) -> StepModule:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # autocast only where it changes something: bf16/fp16 compute (CPU autocast has no fp32 mode)
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if v["autocast"] and dtype != torch.float32 \
        else contextlib.nullcontext
    if v["path"] == "peft":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype)
        ckpt = {"use_reentrant": False}
        if v["kbit"]:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs=ckpt)
        if v["ckpt"]:   # again with offload (transformers 5: a keyword of activation_checkpointing_enable)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, offload=v["offload"])
        if v["liger"]:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
            apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                        fused_linear_cross_entropy=True, model=model)
        model = get_peft_model(model, LoraConfig(target_modules="all-linear", **LORA))
        return StepModule(model, lambda m, ids, y: m(input_ids=ids, labels=y).loss, autocast)
    import qlora
    from qlora.objectives.losses import causal_lm_loss
    if random_init:     # no checkpoint on disk: random weights built on the device, quantized in place
        from transformers import LlamaConfig, LlamaForCausalLM

        from qlora.quant import quantize_model
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(LlamaConfig(**CONFIG))
        finally:
            torch.set_default_dtype(default)
        model = quantize_model(model, compute_dtype=dtype)
        if device == "cuda":
            torch.cuda.empty_cache()
    else:
        model = qlora.load_4bit(folder, compute_dtype=dtype)
    qlora.add_lora(model, qlora.LoraConfig(target_modules="all-linear", **LORA))
    blocks = None if v["blocks"] < 0 else v["blocks"]
    qlora.prepare_for_training(model, checkpointing=v["ckpt"], upcast_norms=v["upcast"],
                               **({"checkpoint_blocks": blocks} if blocks is not None else {}))
    if v["tile"]:
        from qlora.levers.tiled_mlp import tile_mlps
        tile_mlps(model, tile=v["tile"], min_tokens=v["tile_min"])
    context = contextlib.nullcontext
    if v["offload"]:
        from qlora.levers.offload import offload_saved_tensors
        context = lambda: offload_saved_tensors(min_bytes=1 << 20)   # noqa: E731
    if v["chunk"] <= 0:
        return StepModule(model, lambda m, ids, y: m(input_ids=ids, labels=y).loss, context)
    return StepModule(model, lambda m, ids, y: causal_lm_loss(m, ids, y, chunk_size=v["chunk"]), context)


def worker(args) -> dict:
    """One fresh process: build, measure one step, time a few more. Prints one JSON line."""
    from memprofile.measure import measure_step_or_oom
    v = variant_settings(args.worker)
    torch.manual_seed(1)
    step = build(v, args.folder, getattr(torch, args.dtype), args.random_init)
    if args.longest:
        return longest_in_process(step, args)
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids.to(_device(step)), "labels": ids.to(_device(step))}
    step.eval()
    with torch.no_grad():
        first_loss = step(**batch).item()     # eval: no dropout, so every variant gives the same loss
    step.train()
    m = measure_step_or_oom(step, batch, loss_fn=lambda out, b: out, warmup_steps=1, timed_steps=args.timed)
    stats = getattr(getattr(step, "last_context", None), "stats", None)
    offloaded = None if stats is None else {"tensors": stats.tensors, "bytes": stats.bytes, "kept": stats.kept}
    return {"variant": args.worker, "settings": v, "batch": args.batch, "seq": args.seq, "first_loss": first_loss,
            "offloaded": offloaded,
            "fits": m.fits, "bytes": m.bytes(), "peak_method": m.peak_method, "step_seconds": m.step_seconds,
            "step_seconds_method": m.step_seconds_method}


def _device(module) -> torch.device:
    return next(module.parameters()).device


def longest_in_process(step, args) -> dict:
    """The longest batch-1 sequence whose step fits the budget, probed in this process.

    CUDA: the allocator is capped at the budget (set_per_process_memory_fraction), so a probe that
    would need more fails with OOM like it would on a card of that size; a probe fits when the step
    ran and max_memory_allocated stayed within the budget. CPU: the allocator-event peak is exact,
    no cap needed. One AdamW whose state exists before the first probe (a 128-token step made it),
    so every probe is a steady-state step measured once. Doubling from --search-start, then
    bisection to --search-step."""
    from memprofile.measure import measure_step_or_oom
    from qlora.util.sizes import parse_size
    budget, device = parse_size(args.longest), _device(step)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    step.train()
    opt = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-5)
    warm = torch.randint(0, CONFIG["vocab_size"], (1, 128)).to(device)
    measure_step_or_oom(step, {"input_ids": warm, "labels": warm}, loss_fn=lambda out, b: out, optimizer=opt,
                        warmup_steps=1, timed_steps=0)
    probes = {}

    def fits(seq):
        ids = torch.randint(0, CONFIG["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(2)).to(device)
        t = time.perf_counter()
        m = measure_step_or_oom(step, {"input_ids": ids, "labels": ids}, loss_fn=lambda out, b: out,
                                optimizer=opt, warmup_steps=0, timed_steps=0)
        ok = bool(m.fits and m.peak is not None and m.peak <= budget)
        probes[seq] = {"fits": ok, "peak": m.peak, "seconds": time.perf_counter() - t,
                       "bytes": m.bytes() if m.fits else None}
        print(f"  {args.worker}: seq {seq:>6}: peak {(m.peak or 0) / 2**20:10.1f} MiB -> {'fits' if ok else 'no'}",
              file=sys.stderr, flush=True)
        return ok

    t0 = time.perf_counter()
    if args.fit_lengths:
        good, complete, fit = fit_then_verify(fits, probes, [int(n) for n in args.fit_lengths.split(",")], budget,
                                              args.search_step)
        return {"variant": args.worker, "budget": budget, "longest_seq": good, "complete": complete,
                "fit": fit, "probes": probes}
    good, complete = search_longest(fits, args.search_start, CONFIG["max_position_embeddings"], args.search_step,
                                    in_time=lambda: time.perf_counter() - t0 < args.search_seconds)
    return {"variant": args.worker, "budget": budget, "longest_seq": good, "complete": complete, "probes": probes}


def fit_then_verify(fits, probes: dict, lengths: list[int], budget: int, step: int) -> tuple[int, bool, dict]:
    """For CPUs, where each long probe takes minutes: the peak is measured at a few short `lengths`, a
    line peak = a + b·seq is fitted (the step's memory is linear in seq when attention keeps no
    [seq, seq] tensor; the residuals are printed to show it), and the predicted longest length is then
    verified by measurement: it must fit and the next multiple of `step` must not; if either fails,
    the search walks by `step` until both hold."""
    for n in lengths:
        fits(n)
    xs, ys = lengths, [probes[n]["peak"] for n in lengths]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    residual = max(abs(y - (a + b * x)) for x, y in zip(xs, ys))
    predicted = int((budget - a) / b) // step * step
    fit = {"bytes_at_zero": a, "bytes_per_token": b, "max_residual_bytes": residual, "predicted": predicted}
    print(f"  fit: {a / 2**20:.1f} MiB + {b / 2**20:.4f} MiB/token (max residual {residual / 2**20:.2f} MiB) "
          f"-> predicted longest {predicted}", file=sys.stderr, flush=True)
    seq = predicted
    if fits(seq):
        while fits(seq + step):
            seq += step
        return seq, True, fit
    seq -= step
    while seq > 0 and not fits(seq):
        seq -= step
    return seq, seq > 0, fit


def run_worker(spec: str, folder: str, batch: int, seq: int, opts, longest: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", spec, "--folder", folder, "--batch", str(batch), "--seq", str(seq),
           "--timed", str(opts.timed), "--dtype", opts.dtype, "--size", opts.size,
           "--search-seconds", str(opts.search_seconds), "--search-start", str(opts.search_start),
           "--search-step", str(opts.search_step), "--fit-lengths", opts.fit_lengths]
    cmd += ["--random-init"] if opts.random_init else []
    cmd += ["--longest", longest] if longest else []
    # a search's probes print to stderr as they end: passed through, so a log shows them even if it is stopped
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if longest else subprocess.PIPE, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        err = [l for l in (out.stderr or "").strip().splitlines() if l.strip()]
        return {"variant": spec, "error": err[-1] if err else f"exit {out.returncode}", "stderr": (out.stderr or "")[-3000:]}
    return json.loads(lines[-1])


def longest_seq(spec: str, folder: str, budget: int, opts, lo: int = 128, hi: int = 32768) -> dict:
    """Largest seq (multiple of 128, batch 1) whose measured peak fits `budget`: doubling, then bisection;
    each probe a fresh process (the CPU allocator-event peak is exact, so probes need no cap)."""
    probes = {}

    def fits(seq):
        r = run_worker(spec, folder, 1, seq, opts)
        if "error" in r:
            raise RuntimeError(f"{spec} at seq {seq}: {r['error']}\n{r['stderr']}")
        ok = r["fits"] and r["bytes"]["peak"] <= budget
        probes[seq] = {"fits": ok, "peak": r["bytes"]["peak"], "bytes": r["bytes"]}
        print(f"  {spec}: seq {seq:>6}: peak {r['bytes']['peak'] / 2**20:8.1f} MiB -> {'fits' if ok else 'no'}", flush=True)
        return ok
    good, complete = search_longest(fits, lo, hi, 128)
    return {"variant": spec, "budget": budget, "longest_seq": good, "complete": complete, "probes": probes}


def search_longest(fits, start: int, hi: int, step: int, in_time=lambda: True) -> tuple[int, bool]:
    """(largest length that fits, whether the search finished): doubling from `start` up to `hi`,
    then bisection to `step`; stops early (complete=False) once `in_time()` turns false."""
    good, bad, seq = 0, None, min(start, hi)
    while bad is None and good < hi and in_time():
        if fits(seq):
            good, seq = seq, min(seq * 2, hi)         # the last doubling tries `hi` itself
        else:
            bad = seq
    while bad is not None and bad - good > step and in_time():
        mid = (good + bad) // 2 // step * step
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good, (bad is not None and bad - good <= step) or (bad is None and good == hi)


# ------------------------------------------------------------------------------------------ the floor
def step_flops(config: dict, batch: int, seq: int, rank: int, checkpointing: bool = True) -> dict:
    """Analytic matmul FLOPs of one QLoRA step (frozen 4-bit base, LoRA on every block linear, frozen head).

    Per base linear [d_in -> d_out] over N = batch*seq tokens: forward 2·N·d_in·d_out, again in the
    recompute (checkpointing), and once for the input gradient (no weight gradient: frozen).
    Attention per layer: QK^T and AV, 2·2·B·S²·H per forward (the full square; a causal kernel can
    skip half), again in the recompute, twice that in backward. Head: forward + input gradient, 2·2·N·H·V.
    Adapters: A and B, forward, recompute,
    input and weight gradients."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    v, n = config["vocab_size"], batch * seq
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    passes = 3 if checkpointing else 2                       # forward (+ recompute) + input grad
    base = sum(2 * n * a * b for a, b in linears) * passes * layers
    attn = 2 * 2 * batch * seq * seq * h * (passes + 1) * layers   # backward of attention = 2 forwards
    head = 2 * 2 * n * h * v
    adapters = sum(2 * n * rank * (a + b) for a, b in linears) * (passes + 1) * layers
    return {"base_linears": base, "attention": attn, "head": head, "adapters": adapters,
            "total": base + attn + head + adapters}


def _time(fn, repeats=3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def step_floor(config: dict, batch: int, seq: int, rank: int, dtype) -> dict:
    """Seconds the step's matmuls alone take on this machine: each shape of the step timed once
    (best of 3) and multiplied by how often the step runs it; plus the 4-bit dequantizations
    (bitsandbytes dequantizes each weight in forward, recompute and backward), which are memory-bound."""
    import bitsandbytes.functional as bf
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kvh, v = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    hd, n = h // heads, batch * seq
    kv = hd * kvh
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=dtype)   # noqa: E731
    seconds, flops, dequant = 0.0, 0.0, 0.0
    x = {d: mk(n, d) for d in (h, i)}
    for a, b in set(linears):
        w = mk(b, a)
        t = _time(lambda: x[a] @ w.T)
        c = linears.count((a, b)) * 3 * layers
        seconds, flops = seconds + c * t, flops + c * 2 * n * a * b
        q, state = bf.quantize_4bit(w.to(torch.bfloat16), quant_type="nf4", compress_statistics=True)
        dequant += c * _time(lambda: bf.dequantize_4bit(q, state).to(dtype))
        la, lb, c4 = mk(rank, a), mk(b, rank), linears.count((a, b)) * 4 * layers
        seconds += c4 * (_time(lambda: x[a] @ la.T) + _time(lambda: x[h][:, :rank] @ lb.T))
        flops += c4 * 2 * n * rank * (a + b)
    q_, k_ = mk(batch * heads, seq, hd), mk(batch * heads, hd, seq)
    t_attn = _time(lambda: torch.bmm(q_, k_))
    seconds += t_attn * 2 * 4 * layers
    flops += 2 * 2 * batch * heads * seq * seq * hd * 4 * layers
    wh = mk(v, h)
    chunk = x[h][:256]
    t_head = _time(lambda: chunk @ wh.T)
    seconds += t_head * 2 * (n / 256)
    flops += 2 * 2 * n * h * v
    return {"matmul_seconds": seconds, "dequantize_seconds": dequant, "gflops_per_s": flops / seconds / 1e9,
            "flops": step_flops(config, batch, seq, rank), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ report
def compare(runs: dict, result: dict, args) -> None:
    """Medians, ratios against baselines 1 and 2, and the per-category table (printed; added to `result`)."""
    ok = {k: rs for k, rs in runs.items() if rs and "error" not in rs[0] and rs[0].get("fits")}
    med = {k: {"step": statistics.median(r["step_seconds"] for r in rs),
               "peak": statistics.median(r["bytes"]["peak"] for r in rs)} for k, rs in ok.items()}
    tokens = args.batch * args.seq
    result["median"] = med
    result["tokens_per_second"] = {k: tokens / m["step"] for k, m in med.items()}
    names = list(ok)
    print(f"\nbatch {args.batch} x {args.seq}, LoRA {LORA}, {args.dtype}, {args.repeats} repeat(s)\n")
    print("| category (MiB) | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for key in ok[names[0]][0]["bytes"]:
        print(f"| {key} | " + " | ".join(mib(ok[k][-1]["bytes"][key]) for k in names) + " |")
    print("| step time (s, median) | " + " | ".join(f"{med[k]['step']:.2f}" for k in names) + " |")
    print("| tokens/s | " + " | ".join(f"{tokens / med[k]['step']:,.0f}" for k in names) + " |")
    result["ratios"] = {}
    for base in ("peft", "peft-no-upcast"):
        if base in med:
            r = {k: {"peak": med[k]["peak"] / med[base]["peak"], "step": med[k]["step"] / med[base]["step"]}
                 for k in names}
            result["ratios"][base] = r
            print(f"| peak / {base} | " + " | ".join(f"{r[k]['peak']:.3f}" for k in names) + " |")
            print(f"| step time / {base} | " + " | ".join(f"{r[k]['step']:.3f}" for k in names) + " |")
    print("\nfirst loss (eval mode): " + ", ".join(f"{k} {ok[k][0]['first_loss']:.5f}" for k in names))
    for k, rs in runs.items():
        if rs and "error" in rs[0]:
            print(f"{k}: did not run: {rs[0]['error']}")


def mib(n) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help="model folder (default: generated once in the temp dir)")
    p.add_argument("--size", default="100m", choices=sorted(CONFIGS), help="model shape (1b, 8b: for GPUs)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated (default CPU: {CPU_VARIANTS}; CUDA: {GPU_VARIANTS})")
    p.add_argument("--longest", default=None, help=argparse.SUPPRESS)
    p.add_argument("--longest-variants", default="peft,qlora", help="variants of the longest-context search")
    p.add_argument("--in-process", action="store_true",
                   help="longest-context search inside one process per variant (CUDA: the allocator capped at the "
                        "budget; CPU: the exact allocator-event peak; default: one fresh process per probe)")
    p.add_argument("--search-seconds", type=float, default=float("inf"), help=argparse.SUPPRESS)
    p.add_argument("--search-start", type=int, default=1024, help="first length of the in-process search")
    p.add_argument("--search-step", type=int, default=1024, help="resolution of the in-process search")
    p.add_argument("--fit-lengths", default="", help="in-process search: fit the peak at these lengths, then "
                   "verify the predicted longest (CPU; e.g. 512,1024,2048)")
    p.add_argument("--random-init", action="store_true",
                   help="qlora variants: random weights built on the device, no model folder (the 8b search)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype of every variant (bf16 is ~5x slower than fp32 on CPUs without AVX512-BF16)")
    p.add_argument("--timed", type=int, default=2, help="unprofiled steps timed per run (0: the profiled step's time)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of fresh processes, one per variant each")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True, help="measure the matmul floor")
    p.add_argument("--budget", default="", help="memory budget for the longest-context search (e.g. 1GiB; '' skips)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    global CONFIG
    CONFIG = CONFIGS[args.size]
    if args.worker:
        print(json.dumps(worker(args)))
        return
    folder = Path(args.folder or Path(tempfile.gettempdir()) / f"qlora-bench-llama-{args.size}")
    if not args.random_init:
        make_model(folder, CONFIG)
    specs = (args.variants or (GPU_VARIANTS if torch.cuda.is_available() else CPU_VARIANTS)).split(",")
    for s in specs + args.longest_variants.split(","):
        variant_settings(s)          # fail on a typo before any run
    runs = {s: [] for s in specs}
    t0 = time.time()
    print(f"model {args.size} in {folder}; device: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; {torch.get_num_threads()} threads",
          flush=True)
    result = {"machine": os.uname().nodename, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "runs": runs}

    def save():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2))
    for i in range(args.repeats):
        for spec in specs:       # A B C ... A B C: each a fresh process
            r = run_worker(spec, str(folder), args.batch, args.seq, args)
            runs[spec].append(r)
            if "error" in r:
                print(f"run {i + 1} {spec}: did not run: {r['error']}", flush=True)
            else:
                print(f"run {i + 1} {spec}: step {r['step_seconds']:.2f} s, peak {mib(r['bytes']['peak'])} MiB, "
                      f"first loss {r['first_loss']:.5f}", flush=True)
            save()
    if args.repeats > 0:
        compare(runs, result, args)
        if args.floor:
            f = step_floor(CONFIG, args.batch, args.seq, LORA["r"], getattr(torch, args.dtype))
            result["floor"] = f
            print(f"\nstep's matmul floor on this machine: {f['matmul_seconds']:.2f} s "
                  f"({f['flops']['total'] / 1e9:,.0f} GFLOP analytic: base {f['flops']['base_linears'] / 1e9:,.0f}, "
                  f"attention {f['flops']['attention'] / 1e9:,.0f}, head {f['flops']['head'] / 1e9:,.0f}, adapters "
                  f"{f['flops']['adapters'] / 1e9:,.0f}; {f['gflops_per_s']:,.0f} GFLOP/s at the step's shapes, "
                  f"{f['threads']} threads) + 4-bit dequantization {f['dequantize_seconds']:.2f} s")
        save()
    print(f"\n{time.time() - t0:.0f} s so far", flush=True)
    if args.budget:
        from qlora.util.sizes import parse_size
        budget = parse_size(args.budget)
        print(f"\nlongest context at batch 1 within {args.budget}:")
        searches = {}
        for spec in args.longest_variants.split(","):
            if args.in_process:
                searches[spec] = run_worker(spec, str(folder), 1, 0, args, longest=args.budget)
            else:
                searches[spec] = longest_seq(spec, str(folder), budget, args)
            result["longest_search"] = searches
            save()
        longest = {k: r.get("longest_seq", 0) for k, r in searches.items()}
        result["longest_seq"] = longest
        base = longest.get("peft") or 1
        print(", ".join(f"{k} {n} tokens ({n / base:.2f}x peft)" for k, n in longest.items()))
    save()


if __name__ == "__main__":
    main()
