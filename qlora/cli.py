"""`qlora` command line: one subcommand per job. `qlora --help` lists them.

Bad input (a QLoRAError) prints one clear line and exits 2, without a stack trace.
"""
from __future__ import annotations

import argparse
import sys

from qlora.errors import QLoRAError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora", description="Fine-tune large models on small GPUs: 4-bit NF4 base, LoRA adapters, "
                                  "and where every byte of memory goes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="a short QLoRA fine-tune on bundled data (no download)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.set_defaults(func=_demo)

    exp = sub.add_parser("export", help="merge an adapter into its base: a plain bf16/fp16/fp32 model folder")
    exp.add_argument("--base", required=True, help="base model folder the adapter was trained on (or a bundled name)")
    exp.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    exp.add_argument("--out", required=True, help="output folder (refused if it exists, unless --force)")
    exp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    exp.add_argument("--merge-onto", default="dequantized", choices=["dequantized", "original"],
                     help="dequantized: the NF4 weights the adapter was trained against (default)")
    exp.add_argument("--force", action="store_true", help="replace an existing --out")
    exp.add_argument("--no-verify", action="store_true", help="skip the logit comparison")
    exp.add_argument("--max-shard-size", default="2GB", help="largest output shard (default 2GB)")
    exp.set_defaults(func=_export)
    return parser


def parse_size(text: str) -> int:
    """'24GiB', '2GB', '512MB', '1e9' -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    t = str(text).strip().upper().replace(" ", "")
    for unit, factor in units.items():
        if t.endswith(unit):
            number = t[: -len(unit)]
            break
    else:
        number, factor = t, 1
    try:
        return int(float(number) * factor)
    except ValueError:
        raise QLoRAError(f"size {text!r} is not understood; write e.g. 24GiB, 2GB, 512MB") from None


def _export(args) -> int:
    from qlora.export import export_adapter, summary
    result = export_adapter(args.base, args.adapter, args.out, dtype=args.dtype, merge_onto=args.merge_onto,
                            force=args.force, verify=not args.no_verify, max_shard_size=parse_size(args.max_shard_size))
    print(summary(result))
    if result.verification and not result.verification["passed"]:
        print("verification failed: the export differs from the trained model more than the limits allow "
              f"(the folder was still written: {result.out})", file=sys.stderr)
        return 1
    return 0


def _demo(args) -> int:
    from qlora.demo import run_demo
    return run_demo(args)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except QLoRAError as e:
        print(f"qlora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
