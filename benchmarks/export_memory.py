"""Benchmark (not a test): peak memory of `qlora export` on a >= 1B-parameter model, next to PEFT.

    .venv/bin/python benchmarks/export_memory.py                       # ~1.1B params, a few minutes
    .venv/bin/python benchmarks/export_memory.py --params 3e8 --skip-peft --keep --out-dir /tmp/xb

What it does, all on CPU, nothing downloaded:

1. Writes a Llama-style checkpoint with random bf16 weights (TinyLlama-1.1B's shapes: hidden 2048,
   MLP 5632, 32 heads / 4 KV heads, vocab 32000; the layer count set from --params) into several
   safetensors shards + model.safetensors.index.json + config.json. Generated shard by shard, so the
   generator never holds more than one shard.
2. Writes a random LoRA adapter on every linear layer directly in PEFT's format
   (adapter_config.json with qlora's `qlora` section: nf4, blocksize 64, double quant, bf16, and
   quantized_modules = every adapted layer; adapter_model.safetensors), r=16, alpha=32.
3. In a fresh process: `qlora export --base B --adapter A --out O --no-verify` (bf16 output).
4. In another fresh process, PEFT's route on the same files: AutoModelForCausalLM.from_pretrained
   (dtype=bfloat16) + PeftModel.from_pretrained + merge_and_unload() + save_pretrained.
   (PEFT merges onto the original W, qlora onto dequant(quant(W)): same work, different numbers.)
5. Also the floor: a process that only imports what the export imports (torch, bitsandbytes, qlora).

Peak RSS of each child: the kernel's high-water mark (VmHWM, which the child writes out as it
exits), plus psutil polling every 50 ms for the anonymous part (rss - shared: file pages mapped from the
safetensors files count in RSS but are page cache the kernel can drop). Prints a markdown table
(method, peak RSS MiB, ratio to the bf16 model size, wall time) and writes it with all the figures
to DIR/export_memory.json (and .md). The generated model is deleted at the end unless --keep;
DIR defaults to a fresh /tmp/qlora-export-bench-* folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
TARGET_RATIO = 0.25
PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ----------------------------------------------------------------------------- the checkpoint

def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    kv = HIDDEN // HEADS * KV_HEADS
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,)}


def n_layers_for(params: float) -> int:
    per_layer = sum(math.prod(s) for s in layer_shapes(0).values())
    return max(1, round((params - 2 * VOCAB * HIDDEN - HIDDEN) / per_layer))


def random_tensor(shape, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:                                  # norms: around 1
        return (1 + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    for rows in torch.split(torch.arange(shape[0]), 4096):   # fp32 scratch of <= 4096 rows at a time
        out[rows[0]: rows[-1] + 1] = torch.randn((len(rows), *shape[1:]), generator=gen) * 0.02
    return out


def write_checkpoint(folder: Path, n_layers: int, layers_per_shard: int = 3) -> tuple[int, int]:
    """Random bf16 Llama checkpoint, shard by shard. Returns (parameters, bytes)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    groups = [list(range(i, min(i + layers_per_shard, n_layers))) for i in range(0, n_layers, layers_per_shard)]
    n_files = len(groups) + 1
    weight_map, total, params = {}, 0, 0
    for f, group in enumerate([None, *groups]):
        if group is None:                                # first shard: embeddings, final norm, head
            shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
                      "lm_head.weight": (VOCAB, HIDDEN)}
        else:
            shapes = {k: v for i in group for k, v in layer_shapes(i).items()}
        name = f"model-{f + 1:05d}-of-{n_files:05d}.safetensors"
        tensors = {k: random_tensor(s, gen) for k, s in shapes.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
            params += t.numel()
        del tensors
        print(f"  wrote {name} ({(folder / name).stat().st_size / 1e6:.0f} MB)", flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=n_layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    return params, total


def write_adapter(folder: Path, base: Path, n_layers: int, r: int = 16, alpha: int = 32) -> int:
    """A random LoRA on every linear layer, in PEFT's file format with qlora's `qlora` section."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors, modules = {}, []
    for i in range(n_layers):
        for key, shape in layer_shapes(i).items():
            if len(shape) != 2:
                continue
            path = key.removesuffix(".weight")
            modules.append(path)
            out_f, in_f = shape
            a = torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)
            tensors[f"base_model.model.{path}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"base_model.model.{path}.lora_B.weight"] = (torch.randn(out_f, r, generator=gen) * 2e-3).to(torch.bfloat16)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "use_rslora": False, "target_modules": sorted({p.rsplit(".", 1)[-1] for p in modules}),
        "exclude_modules": None, "modules_to_save": None, "init_lora_weights": True, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": str(base),
        "qlora": {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "bfloat16",
                  "quantized_from_dtype": "bfloat16", "quantized_modules": sorted(modules),
                  "architecture": "LlamaForCausalLM", "base_dtype": "bfloat16", "adapter_dtype": "bfloat16"},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return sum(t.numel() for t in tensors.values())


# ----------------------------------------------------------------------------- measuring a child

# Runs the measured code and, at exit, writes the kernel's peak RSS for this process (VmHWM) to a
# file. (ru_maxrss from wait4 would not do: Linux carries the parent's RSS at fork over into the
# child's ru_maxrss across exec.)
WRAPPER = """
import atexit, json, runpy, sys
def _report(path=sys.argv[1]):
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    with open(path, "w") as f:
        json.dump({k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}, f)
atexit.register(_report)
mode, target, args = sys.argv[2], sys.argv[3], sys.argv[4:]
if mode == "module":
    sys.argv = [target, *args]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *args]
    exec(compile(target, "<measured>", "exec"), {"__name__": "__main__"})
"""


def measure(mode: str, target: str, args: list[str], label: str, cwd: Path) -> dict:
    """Run `python -m target args` (mode "module") or `python -c target args` (mode "code") in a fresh
    process: wall time, exit code, peak RSS (VmHWM, reported by the process at exit) and the peak
    of RSS and of its anonymous part (rss - shared) polled every 50 ms with psutil."""
    import psutil
    report = cwd / f".peak-{os.getpid()}.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", WRAPPER, str(report), mode, target, *args]
    print(f"\n== {label}: {target.strip().splitlines()[0][:80]} {' '.join(args)[:150]}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "10"})
    peaks = {"rss": 0, "anon": 0}
    stop = threading.Event()

    def poll():
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                m = p.memory_info()
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                break
            peaks["rss"] = max(peaks["rss"], m.rss)
            peaks["anon"] = max(peaks["anon"], m.rss - m.shared)
            stop.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    code = proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    kernel = json.loads(report.read_text()) if report.is_file() else {}
    report.unlink(missing_ok=True)
    out = {"method": label, "exit_code": code, "wall_s": wall,
           "peak_rss_bytes": kernel.get("VmHWM", peaks["rss"]), "peak_rss_source": "VmHWM" if kernel else "polled",
           "polled_peak_rss_bytes": peaks["rss"], "polled_peak_anon_bytes": peaks["anon"], "at_exit": kernel}
    print(f"   exit {code}, {wall:.1f} s, peak RSS {out['peak_rss_bytes'] / 2**20:.0f} MiB "
          f"(polled: RSS {peaks['rss'] / 2**20:.0f} MiB, anonymous {peaks['anon'] / 2**20:.0f} MiB)", flush=True)
    return out


PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""
FLOOR_SCRIPT = "import qlora.cli, qlora.export.from_files, bitsandbytes.functional, safetensors, tqdm"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=1.1e9, help="approximate parameter count (default 1.1e9)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="working folder for the model, adapter, exports and the results (default: new /tmp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated model and the exports")
    ap.add_argument("--skip-peft", action="store_true", help="measure qlora export only")
    ap.add_argument("--requantize", action="store_true",
                    help="also measure `qlora export --requantize nf4` (merged layers re-quantized to 4-bit)")
    args = ap.parse_args(argv)

    work = args.out_dir or Path(tempfile.mkdtemp(prefix="qlora-export-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / "base", work / "adapter"
    for p in (base, adapter, work / "out-qlora", work / "out-peft"):
        shutil.rmtree(p, ignore_errors=True)
    n_layers = n_layers_for(args.params)
    print(f"writing a random bf16 Llama checkpoint with {n_layers} layers into {base}", flush=True)
    t0 = time.perf_counter()
    params, model_bytes = write_checkpoint(base, n_layers)
    adapter_params = write_adapter(adapter, base, n_layers)
    print(f"  {params / 1e9:.3f}B parameters, {model_bytes / 2**20:.0f} MiB bf16, adapter {adapter_params / 1e6:.1f}M "
          f"params; generated in {time.perf_counter() - t0:.0f} s", flush=True)

    runs = [measure("code", FLOOR_SCRIPT, [], "imports only (floor)", work)]
    runs.append(measure("module", "qlora.cli", ["export", "--base", str(base), "--adapter", str(adapter), "--out",
                                                str(work / "out-qlora"), "--dtype", "bfloat16", "--no-verify"],
                        "qlora export --no-verify", work))
    if args.requantize:
        runs.append(measure("module", "qlora.cli", ["export", "--base", str(base), "--adapter", str(adapter), "--out",
                                                    str(work / "out-nf4"), "--dtype", "bfloat16", "--no-verify",
                                                    "--requantize", "nf4"],
                            "qlora export --requantize nf4 --no-verify", work))
    if not args.skip_peft:
        runs.append(measure("code", PEFT_SCRIPT, [str(base), str(adapter), str(work / "out-peft")],
                            "PEFT from_pretrained + merge_and_unload + save_pretrained", work))
    for run in runs:
        run["ratio_to_model"] = run["peak_rss_bytes"] / model_bytes
        run["anon_ratio_to_model"] = run["polled_peak_anon_bytes"] / model_bytes

    exported = work / "out-qlora"
    check = {}
    if exported.is_dir():
        from safetensors import safe_open
        n, size = 0, 0
        for f in exported.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    sl = h.get_slice(key)
                    n += 1
                    size += math.prod(sl.get_shape()) * 2
        check = {"files": sorted(p.name for p in exported.iterdir()), "tensors": n, "bf16_bytes": size,
                 "same_size_as_base": size == model_bytes}

    lines = [f"Model: {params / 1e9:.3f}B params, {n_layers} layers, bf16 size {model_bytes / 2**20:.0f} MiB "
             f"(adapter r=16 on all {7 * n_layers} linear layers). Target for qlora: peak RSS <= "
             f"{TARGET_RATIO} x model size.", "",
             "| method | peak RSS MiB | ratio to model size | peak anonymous RSS MiB (polled) | wall time s | exit |",
             "|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        lines.append(f"| {run['method']} | {run['peak_rss_bytes'] / 2**20:.0f} | {run['ratio_to_model']:.3f} | "
                     f"{run['polled_peak_anon_bytes'] / 2**20:.0f} | {run['wall_s']:.1f} | {run['exit_code']} |")
    table = "\n".join(lines)
    print("\n" + table)
    qrun = runs[1]
    verdict = "meets" if qrun["exit_code"] == 0 and qrun["ratio_to_model"] <= TARGET_RATIO else "MISSES"
    print(f"\nqlora export {verdict} the target: peak RSS {qrun['ratio_to_model']:.3f} x model size "
          f"(<= {TARGET_RATIO}); exported folder: {check}")
    results = {"params": params, "n_layers": n_layers, "model_bytes": model_bytes, "adapter_params": adapter_params,
               "target_ratio": TARGET_RATIO, "runs": runs, "export_check": check, "table_markdown": table,
               "cpu_count": os.cpu_count(), "torch": torch.__version__}
    (work / "export_memory.json").write_text(json.dumps(results, indent=2))
    (work / "export_memory.md").write_text(table + "\n")
    print(f"results: {work / 'export_memory.json'}")
    if not args.keep:
        for p in (base, adapter, work / "out-qlora", work / "out-peft"):
            shutil.rmtree(p, ignore_errors=True)
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
