"""`qlora` command line: one subcommand per job. `qlora --help` lists them.

Exit status: 0 done; 1 a check failed (e.g. an export's verification); 2 a problem with the input or
the environment (one line on stderr naming it and the fix, no stack trace); 3 a bug in qlora (the
traceback, then a line saying so); 130 interrupted (Ctrl-C).

Nothing heavy is imported at module level: `qlora --help` must not pay for torch.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qlora.errors import QLoRAError
from qlora.sizes import parse_size

DTYPES = ("bfloat16", "float16", "float32")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return value


def _dtype(text: str) -> str:
    """argparse type: a float dtype name (aliases bf16/fp16/fp32 accepted) -> its full name."""
    name = str(text).lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype qlora trains in; use one of {', '.join(DTYPES)}")
    return name


def _size(text: str) -> int:
    """argparse type: a positive size such as 24GiB -> bytes."""
    try:
        return parse_size(text)
    except QLoRAError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model(text: str) -> str:
    """argparse type: a model folder, config.json, bundled name or Hub id. A local config.json is
    checked to be a JSON object (a folder or name is resolved later, by the subcommand)."""
    path = Path(text)
    config = path / "config.json" if path.is_dir() else path if path.suffix == ".json" else None
    if path.is_dir() and not (path / "config.json").exists():
        raise argparse.ArgumentTypeError(f"folder {text!r} has no config.json; give a Hugging Face model folder "
                                         "(config.json + weights), its config.json, or a bundled name (minilm, smollm2)")
    if config is not None and config.exists():
        import json
        try:
            data = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise argparse.ArgumentTypeError(f"{config} is not valid JSON ({e}); give a model's config.json "
                                             "(a Hugging Face model folder has one)") from None
        except OSError as e:
            raise argparse.ArgumentTypeError(f"{config} cannot be read ({e.strerror})") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise argparse.ArgumentTypeError(f"{config} has no 'model_type'; give a Hugging Face model's config.json")
    elif path.suffix == ".json":
        raise argparse.ArgumentTypeError(f"{text!r} does not exist; give a model folder, its config.json, "
                                         "or a bundled name (minilm, smollm2)")
    return text


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
    demo = sub.add_parser("demo", help="a short QLoRA fine-tune on bundled data (no download)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of recipes/configs/demo.yaml")
    demo.set_defaults(func=_demo)

    tr = sub.add_parser("train", help="run a recipe: qlora train sft data=my.jsonl [key=value ...]",
                        description="Run a recipe: qlora train NAME_OR_CONFIG [key=value ...]. "
                                    f"Recipes: {_recipe_list()}. Fine-tune on your own data: "
                                    "qlora train sft model=FOLDER_OR_HUB_ID data=my.jsonl")
    tr.add_argument("config", help="a recipe name (sft, seq_cls, ...) or a config file (recipes/configs/*.yaml)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lora.r=16 train.epochs=1 mode=qlora")
    tr.set_defaults(func=_train)

    prof = sub.add_parser("profile", help="measure and predict memory of each training configuration")
    prof.add_argument("--model", required=True, type=_model, help="model folder, or a bundled name: minilm, smollm2")
    prof.add_argument("--task", default="causal-lm", help="causal-lm | seq-cls | image-cls (default causal-lm)")
    prof.add_argument("--configs", default="full,head,lora,lora-ckpt,qlora,qlora-ckpt",
                      help="comma-separated training configurations (default: all six)")
    prof.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    prof.add_argument("--seq", default="128,512", help="comma-separated sequence lengths (image sizes for image-cls)")
    prof.add_argument("--rank", default="16", help="comma-separated LoRA ranks (default 16)")
    _run_options(prof)
    prof.add_argument("--out", default="runs/profile", help="report folder (default runs/profile)")
    prof.set_defaults(func=_profile)

    plan = sub.add_parser("plan", help="what fits in a memory budget, from a config.json alone (no weights)")
    plan.add_argument("--model", required=True, type=_model, help="config.json, model folder, or a bundled name")
    plan.add_argument("--memory", required=True, type=_size, help="memory budget per device, e.g. 24GiB, 80GB, 512MiB")
    plan.add_argument("--seq", type=_positive_int, default=2048,
                      help="sequence length (image side for image-cls; default 2048)")
    plan.add_argument("--effective-batch", type=_positive_int, default=16, help="examples per optimizer step (default 16)")
    plan.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank (default 16)")
    plan.add_argument("--task", default="causal-lm", help="causal-lm | seq-cls | image-cls")
    plan.add_argument("--mode", default="qlora", help="the mode to recommend for: full | head | lora | qlora")
    plan.add_argument("--configs", default="full,lora,lora-ckpt,qlora,qlora-ckpt", help="configurations to tabulate")
    plan.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                      help="cuda | cpu: the device the run will use (default cuda)")
    plan.add_argument("--levers", action="store_true",
                      help="also the longest context at batch 1 with each long-context lever (activation offload, "
                           "tiled MLP, both): three more length searches")
    plan.add_argument("--world-size", type=_positive_int, default=1,
                      help="FSDP ranks: per-rank bytes by formula (default 1)")
    _run_options(plan)
    plan.set_defaults(func=_plan)

    exp = sub.add_parser("export", help="merge an adapter into its base: a plain bf16/fp16/fp32 model folder")
    exp.add_argument("--base", required=True, help="base model folder the adapter was trained on (or a bundled name)")
    exp.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    exp.add_argument("--out", required=True, help="output folder (refused if it exists, unless --force)")
    exp.add_argument("--dtype", default="bfloat16", type=_dtype, help="dtype of the merged weights: "
                     "bfloat16 (default) | float16 | float32")
    exp.add_argument("--merge-onto", default="dequantized", choices=["dequantized", "original"],
                     help="dequantized: the NF4 weights the adapter was trained against (default)")
    exp.add_argument("--force", action="store_true", help="replace an existing --out")
    exp.add_argument("--no-verify", action="store_true", help="skip the logit comparison")
    exp.add_argument("--max-shard-size", default="2GB", type=_size, help="largest output shard (default 2GB)")
    exp.add_argument("--requantize", default="none", metavar="{none,nf4,fp4}",
                     help="nf4/fp4: write the 4-bit layers re-quantized (bitsandbytes format, loads with transformers "
                          "+ bitsandbytes); the added error is measured and reported (default none)")
    exp.set_defaults(func=_export)
    return parser


def _version() -> str:
    from qlora import __version__
    return __version__


def _run_options(p) -> None:
    """The options that say how the run trains (defaults: qlora train's)."""
    p.add_argument("--dtype", default="auto", type=lambda t: t if t == "auto" else _dtype(t),
                   help="compute dtype: auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32")
    p.add_argument("--loss", default="chunked", help="chunked (qlora's chunked head + loss) | model (full logits)")
    p.add_argument("--loss-chunk-size", type=_positive_int, default=256, help="tokens per chunk of the chunked loss")
    p.add_argument("--optimizer", default="adamw", help="adamw | adamw8bit | paged_adamw8bit")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.05,
                   help="LoRA dropout (default 0.05); > 0 saves a dropped copy of each adapted layer's input")
    p.add_argument("--target-modules", default="all-linear", help="LoRA targets: all-linear or comma-separated names")


def _settings(args, **fields):
    from qlora.plan import RunSettings
    targets = args.target_modules if args.target_modules == "all-linear" else tuple(args.target_modules.split(","))
    return RunSettings(task=args.task, compute_dtype=args.dtype, loss=args.loss, loss_chunk_size=args.loss_chunk_size,
                       optimizer=args.optimizer, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                       target_modules=targets, **fields)


def _recipe_list() -> str:
    try:
        return ", ".join(known_recipes())
    except QLoRAError as e:
        return str(e)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise QLoRAError(f"--{what} {text!r}: give comma-separated integers, e.g. 1,4") from None
    if not values or min(values) < 1:
        raise QLoRAError(f"--{what} {text!r}: give comma-separated integers >= 1")
    return values


def _profile(args) -> int:
    from qlora.profile import sweep
    import torch
    settings = _settings(args, device="cuda" if torch.cuda.is_available() else "cpu")
    rows = sweep(args.model, task=args.task, configurations=[c.strip() for c in args.configs.split(",")],
                 batches=_ints(args.batch, "batch"), seqs=_ints(args.seq, "seq"), ranks=_ints(args.rank, "rank"),
                 settings=settings, out=args.out)
    from memprofile.report import markdown_table as markdown_report
    print(f"assumed: {settings.describe()} (mode and checkpointing per row)")
    print(markdown_report(rows))
    print(f"\nwrote {args.out}/report.json, report.md, report.csv, memory.png")
    return 0


def _plan(args) -> int:
    from qlora.plan import LEVERS, format_levers, format_plan, plan
    model = args.model
    if not (model.endswith(".json") or Path(model).is_dir()):
        from qlora.bundled import resolve_model
        model = resolve_model(model)
    settings = _settings(args, device=args.device, lora_r=args.rank, mode=args.mode)
    levers = LEVERS if args.levers and settings.task == "causal-lm" else None
    result = plan(model, args.memory, settings, seq=args.seq, effective_batch=args.effective_batch,
                  configurations=[c.strip() for c in args.configs.split(",")], world_size=args.world_size,
                  levers=levers)
    print(format_plan(result))
    if levers:
        print()
        print(format_levers(result["levers"], args.memory))
    return 0


def _release_freed_memory_early() -> None:
    """glibc keeps freed large blocks for reuse and raises its mmap threshold as it goes, so an
    export that allocates and frees one layer after another holds on to ~75 MB more than it uses.
    A fixed 1 MiB threshold returns big blocks to the system at once (Linux/glibc only)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)     # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _export(args) -> int:
    from qlora.export import export_adapter, summary
    _release_freed_memory_early()
    result = export_adapter(args.base, args.adapter, args.out, dtype=args.dtype, merge_onto=args.merge_onto,
                            force=args.force, verify=not args.no_verify, max_shard_size=args.max_shard_size,
                            requantize=args.requantize)
    print(summary(result))
    if result.verification and result.verification["passed"] is False:   # None: requantized, no limit
        print("verification failed: the export differs from the trained model more than the limits allow "
              f"(the folder was still written: {result.out})", file=sys.stderr)
        return 1
    return 0


def recipes_package():
    """The recipes package `qlora_recipes`: recipes/ beside this package in a source checkout (also
    when an older install is on the path), else the one installed with the wheel."""
    import importlib
    import importlib.util
    if "qlora_recipes" in sys.modules:
        return sys.modules["qlora_recipes"]
    checkout = Path(__file__).resolve().parent.parent
    init = checkout / "recipes" / "__init__.py"
    if (checkout / "pyproject.toml").is_file() and init.is_file():
        spec = importlib.util.spec_from_file_location("qlora_recipes", init,
                                                      submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["qlora_recipes"] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module("qlora_recipes")
    except ModuleNotFoundError:
        raise QLoRAError("the recipes (package qlora_recipes) are not installed: reinstall qlora "
                         "(pip install .), or run from a source checkout") from None


def recipes_dir() -> Path:
    """The folder of the recipes package (its scripts and configs/)."""
    return Path(list(recipes_package().__path__)[0])


def known_recipes() -> list[str]:
    """Recipe names: the configs/NAME.yaml files of the recipes package."""
    return sorted(p.stem for p in (recipes_dir() / "configs").glob("*.yaml"))


def find_config(name_or_path: str) -> Path:
    """A config file: an existing path, a recipe name (`sft`), or a packaged config's path as the docs
    write it (`recipes/configs/sft.yaml`) when run outside a checkout."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    as_written = path.suffix in (".yaml", ".yml") and path.parent.parts[-2:] == ("recipes", "configs")
    packaged = recipes_dir() / "configs" / (path.name if as_written else f"{name_or_path}.yaml")
    if packaged.is_file() and (as_written or len(path.parts) == 1):
        return packaged
    raise QLoRAError(f"config file or recipe {name_or_path!r} not found; recipes: {', '.join(known_recipes())} "
                     f"(configs in {recipes_dir() / 'configs'})")


def run_recipe(config_path: str, overrides: list[str]):
    """Import the recipe module that the config names, build its config (the type of main()'s first
    argument) from the YAML and the overrides, and run main()."""
    import importlib
    import typing
    package = recipes_package()
    from qlora_recipes.config import load_recipe_config, recipe_name
    path = find_config(config_path)
    name = recipe_name(path)
    if not (recipes_dir() / f"{name}.py").is_file():
        raise QLoRAError(f"{path} names recipe {name!r}, which does not exist; recipes: {', '.join(known_recipes())}")
    module = importlib.import_module(f"{package.__name__}.{name}")
    hints = typing.get_type_hints(module.main)
    config_class = next(v for k, v in hints.items() if k != "return")
    cfg = load_recipe_config(path, overrides, config_class)
    return module.main(cfg)


def _run_or_fail(config: str, overrides: list[str]) -> int:
    """0, or 1 when the recipe ran but failed a check it promises (qlora_recipes.common.RecipeFailed)."""
    recipes_package()
    from qlora_recipes.common import RecipeFailed
    try:
        run_recipe(config, overrides)
    except RecipeFailed as e:
        print(f"qlora train: failed: {e}", file=sys.stderr)
        return 1
    return 0


def _train(args) -> int:
    return _run_or_fail(args.config, args.overrides)


def _demo(args) -> int:
    overrides = [f"out_dir={args.out}"] + list(args.overrides)
    return _run_or_fail("demo", overrides)


REPORT_BUGS = "the qlora maintainers, with the command line, `qlora --version` and the traceback above"


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
            import traceback
            traceback.print_exc()
            print(f"qlora {args.command}: this is a bug in qlora ({type(e).__name__}), not a problem with your "
                  f"input; please report it to {REPORT_BUGS}",
                  file=sys.stderr)
            return 3
        print(f"qlora {args.command}: error: {message}", file=sys.stderr)
        return 2


def user_error_message(e: BaseException, args=None) -> str | None:
    """One line for an error caused by the user's input or environment, or None for a bug.

    QLoRAError is ours (the message is written for the user). Operating-system errors (a missing or
    unreadable file, a full disk, a read-only folder), out-of-memory and a config file that does not
    parse are the environment's, so they are named with the file and a fix."""
    import errno
    if isinstance(e, QLoRAError):
        return str(e)
    if type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError):
        return (f"out of memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}); lower the batch size "
                "or sequence length, or see `qlora plan --help` for what fits")
    if isinstance(e, OSError):
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        fix = {errno.ENOENT: "check the path", errno.EACCES: "check its permissions or choose another folder",
               errno.EPERM: "check its permissions or choose another folder",
               errno.ENOSPC: "free some disk space or write elsewhere",
               errno.EROFS: "the file system is read-only: write elsewhere",
               errno.EISDIR: "give a file, not a folder", errno.ENOTDIR: "give a folder, not a file",
               errno.EEXIST: "a file of that name is in the way: move it or choose another path",
               errno.EDQUOT: "free some disk space or write elsewhere"}.get(e.errno, "check the path and the disk")
        if isinstance(e, ConnectionError):
            fix = "no network or the Hub is unreachable: give a local folder, or a bundled name (minilm, smollm2)"
        what = e.strerror or (str(e).splitlines() or [type(e).__name__])[0].rstrip(".")
        return f"{what}:{where}; {fix}" if where else f"{what}; {fix}"
    config = getattr(args, "config", None)
    yaml = sys.modules.get("yaml")          # only imported if a YAML file was read
    if yaml is not None and isinstance(e, yaml.YAMLError):
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return (f"{config or 'a YAML file'} is not valid YAML{at}: {getattr(e, 'problem', None) or e}; "
                "fix the file (quote values that hold ':' or '{')")
    import json
    if isinstance(e, json.JSONDecodeError):
        return f"a JSON file is not valid JSON ({e}); fix or replace the file"
    return None


if __name__ == "__main__":
    entry()
