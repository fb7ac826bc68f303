"""qlora export: merge an adapter into its base, a plain model folder (optionally re-quantized), or one GGUF file.

    qlora export --base B --adapter A --out FOLDER [--dtype bfloat16]              # folder (default)
    qlora export --base B [--adapter A] --out model.gguf --format gguf [--dtype f16|bf16|q8_0|q4_k_m|...]
    qlora export --base B --adapter A --out adapter.gguf --format gguf --adapter-only    # llama.cpp LoRA GGUF
"""
from __future__ import annotations

import argparse
import ctypes
import sys

from qlora.cli import args as cli_args
from qlora.errors import QLoRAError


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="merge an adapter into its base: a plain bf16/fp16/fp32 model folder")
    p.add_argument("--base", required=True, help="base model folder the adapter was trained on (or a bundled name)")
    p.add_argument("--adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors); "
                                       "--format gguf without it writes the base")
    p.add_argument("--out", required=True, help="output folder, or the .gguf file with --format gguf (refused if it "
                                                "exists, unless --force)")
    p.add_argument("--format", default="folder", choices=["folder", "gguf"],
                   help="folder: a transformers model folder (default); gguf: one llama.cpp/Ollama file + Modelfile")
    p.add_argument("--dtype", default=None, help="folder: bfloat16 (default) | float16 | float32; gguf: f16 "
                   "(default) | bf16 | q8_0 | q4_k_m | q5_k_m | q6_k (K-quants need llama-cpp-python)")
    p.add_argument("--merge-onto", default="dequantized", choices=["dequantized", "original"],
                     help="dequantized: the NF4 weights the adapter was trained against (default)")
    p.add_argument("--adapter-only", action="store_true", help="with --format gguf: the adapter alone as llama.cpp's "
                   "LoRA GGUF (llama-cli --lora, Ollama ADAPTER), not merged")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-verify", action="store_true", help="skip the logit comparison")
    p.add_argument("--max-shard-size", default="2GB", type=cli_args.size, help="largest output shard (default 2GB)")
    p.add_argument("--requantize", default="none", metavar="{none,nf4,fp4}",
                     help="nf4/fp4: write the 4-bit layers re-quantized (bitsandbytes format, loads with transformers "
                          "+ bitsandbytes); the added error is measured and reported (default none)")
    p.set_defaults(func=run)


def release_freed_memory_early() -> None:
    """glibc keeps freed large blocks for reuse and raises its mmap threshold as it goes, so an
    export that allocates and frees one layer after another holds on to ~75 MB more than it uses.
    A fixed 1 MiB threshold returns big blocks to the system at once (Linux/glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)     # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def run(args) -> int:
    if args.format == "gguf":
        return run_gguf(args)
    if args.adapter_only:
        raise QLoRAError("--adapter-only writes llama.cpp's LoRA GGUF; add --format gguf")
    from qlora.export import export_adapter, summary  # lazy: qlora --help imports no torch
    if args.adapter is None:
        raise QLoRAError("qlora export --format folder needs --adapter (the base folder is already a model folder); "
                         "--format gguf writes a base without one")
    dtype = cli_args.dtype(args.dtype or "bfloat16") if _is_float_dtype(args.dtype) else None
    if dtype is None:
        raise QLoRAError(f"--dtype {args.dtype!r}: a folder export is bfloat16 | float16 | float32 "
                         "(GGUF types need --format gguf)")
    release_freed_memory_early()
    result = export_adapter(args.base, args.adapter, args.out, dtype=dtype, merge_onto=args.merge_onto,
                            force=args.force, verify=not args.no_verify, max_shard_size=args.max_shard_size,
                            requantize=args.requantize)
    print(summary(result))
    if result.verification and result.verification["passed"] is False:   # None: requantized, no limit
        print("verification failed: the export differs from the trained model more than the limits allow "
              f"(the folder was still written: {result.out})", file=sys.stderr)
        return 1
    return 0


def _is_float_dtype(text) -> bool:
    try:
        cli_args.dtype(text or "bfloat16")
        return True
    except argparse.ArgumentTypeError:
        return False


def run_gguf(args) -> int:
    """--format gguf: one .gguf file (+ Modelfile), checked by reading it back."""
    from qlora.export.gguf import check_gguf_dtype, export_gguf  # lazy: qlora --help imports no torch
    from qlora.export.gguf_verify import summary_lines  # lazy: as above
    if args.requantize not in (None, "none"):
        raise QLoRAError("--requantize writes bitsandbytes folders; with --format gguf choose --dtype q8_0 (or a "
                         "K-quant) instead")
    if args.adapter_only:
        from qlora.export.gguf_lora import export_lora_gguf  # lazy: as above
        written = export_lora_gguf(args.base, args.adapter, args.out, dtype=args.dtype or "f16", force=args.force)
        print(f"wrote {len(written) // 2} LoRA pairs to {args.out} (llama.cpp LoRA GGUF, {args.dtype or 'f16'}); "
              f"use it over a GGUF of the base: llama-cli -m BASE.gguf --lora {args.out}")
        return 0
    dtype = check_gguf_dtype(args.dtype or "f16")     # a K-quant without llama_cpp: refused before any reading
    release_freed_memory_early()
    result = export_gguf(args.base, args.adapter, args.out, dtype=dtype, merge_onto=args.merge_onto, force=args.force,
                         verify=not args.no_verify)
    size = result.out.stat().st_size
    what = (f"{len(result.layers)} merged layers, merged onto {result.merge_onto} weights" if args.adapter
            else "the base, no adapter")
    print(f"exported {result.out} (GGUF {result.dtype}, {size / 2**20:.1f} MiB; {what}) and "
          f"{result.out.with_suffix('.Modelfile').name} beside it")
    for line in summary_lines(result.verification):
        print(line)
    for w in result.warnings:
        print(f"  warning: {w}")
    if result.verification and result.verification.get("passed") is False:
        print("verification failed: the GGUF file differs from the merged model more than the limits allow "
              f"(the file was still written: {result.out})", file=sys.stderr)
        return 1
    return 0
