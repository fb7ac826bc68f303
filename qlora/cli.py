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
    return parser


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
