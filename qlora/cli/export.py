"""qlora export: merge an adapter into its base, a plain model folder (optionally re-quantized)."""
from __future__ import annotations

import ctypes
import sys

from qlora.cli import args


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="merge an adapter into its base: a plain bf16/fp16/fp32 model folder")
    p.add_argument("--base", required=True, help="base model folder the adapter was trained on (or a bundled name)")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --force)")
    p.add_argument("--dtype", default="bfloat16", type=args.dtype, help="dtype of the merged weights: "
                     "bfloat16 (default) | float16 | float32")
    p.add_argument("--merge-onto", default="dequantized", choices=["dequantized", "original"],
                     help="dequantized: the NF4 weights the adapter was trained against (default)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-verify", action="store_true", help="skip the logit comparison")
    p.add_argument("--max-shard-size", default="2GB", type=args.size, help="largest output shard (default 2GB)")
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
    from qlora.export import export_adapter, summary  # lazy: qlora --help imports no torch
    release_freed_memory_early()
    result = export_adapter(args.base, args.adapter, args.out, dtype=args.dtype, merge_onto=args.merge_onto,
                            force=args.force, verify=not args.no_verify, max_shard_size=args.max_shard_size,
                            requantize=args.requantize)
    print(summary(result))
    if result.verification and result.verification["passed"] is False:   # None: requantized, no limit
        print("verification failed: the export differs from the trained model more than the limits allow "
              f"(the folder was still written: {result.out})", file=sys.stderr)
        return 1
    return 0
