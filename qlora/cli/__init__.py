"""`qlora` command line: one subcommand per job. `qlora --help` lists them.

Exit status: 0 done; 1 a check failed (e.g. an export's verification); 2 a problem with the input or
the environment (one line on stderr naming it and the fix, no stack trace); 3 a bug in qlora (the
traceback, then a line saying so); 130 interrupted (Ctrl-C).

Nothing heavy is imported at module level: `qlora --help` must not pay for torch.

    recipes.py  qlora train / qlora demo: find a recipe's config and run it
    plan.py     qlora plan;  profile.py  qlora profile;  export.py  qlora export
    args.py     argument types and the options the planning subcommands share
    status.py   the exit-status rules: which errors are the user's;  __main__.py  python -m qlora.cli
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from qlora import __version__
from qlora.cli import export, plan, profile, recipes
from qlora.cli.recipes import find_config, known_recipes, recipes_dir, recipes_package, run_recipe  # noqa: F401
from qlora.cli.status import REPORT_BUGS, user_error_message


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage is one line on stderr (the problem and where the options are), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qlora", description="Fine-tune large models on small GPUs: 4-bit NF4 base, LoRA adapters, "
                                  "and where every byte of memory goes.",
        epilog="exit status: 0 done, 1 a check failed, 2 bad input or environment, 3 a bug in qlora")
    parser.add_argument("--version", action="version", version=f"qlora {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    recipes.add_parsers(sub)
    profile.add_parser(sub)
    plan.add_parser(sub)
    export.add_parser(sub)
    return parser


def _version() -> str:
    return __version__


def entry() -> None:
    """The `qlora` command: main() with the process's arguments, then exit with its status. After
    `qlora plan`, which writes no file and whose worker processes have ended, the interpreter's
    teardown (~1.2 s of torch's and transformers' finalizers) is skipped: output flushed, os._exit."""
    code = main()
    if sys.argv[1:2] == ["plan"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv=None) -> int:
    """Run one subcommand; returns the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)       # bad usage: one "error:" line (_Parser.error)
    except SystemExit as e:                  # --help, --version (0) or bad usage (2): returned, not raised
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"qlora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- sorted below into the user's problem (2) and our bug (3)
        message = user_error_message(e, args)
        if message is None:
            traceback.print_exc()
            print(f"qlora {args.command}: this is a bug in qlora ({type(e).__name__}), not a problem with your "
                  f"input; please report it to {REPORT_BUGS}",
                  file=sys.stderr)
            return 3
        print(f"qlora {args.command}: error: {message}", file=sys.stderr)
        return 2
