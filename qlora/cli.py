"""`qlora` command line: one subcommand per job. `qlora --help` lists them.

Bad input (a QLoRAError) prints one clear line and exits 2, without a stack trace.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora.errors import QLoRAError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora", description="Fine-tune large models on small GPUs: 4-bit NF4 base, LoRA adapters, "
                                  "and where every byte of memory goes.")
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
    prof.add_argument("--model", required=True, help="model folder, or a bundled name: minilm, smollm2")
    prof.add_argument("--task", default="causal-lm", help="causal-lm | seq-cls | image-cls (default causal-lm)")
    prof.add_argument("--configs", default="full,head,lora,lora-ckpt,qlora,qlora-ckpt")
    prof.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    prof.add_argument("--seq", default="128,512", help="comma-separated sequence lengths (image sizes for image-cls)")
    prof.add_argument("--rank", default="8", help="comma-separated LoRA ranks")
    prof.add_argument("--dtype", default="bfloat16", help="weights and compute dtype (bfloat16 | float32)")
    prof.add_argument("--target-modules", default="all-linear", help="LoRA targets: all-linear or comma-separated names")
    prof.add_argument("--lora-dropout", type=float, default=0.0,
                      help="LoRA dropout (default 0); > 0 saves a dropped copy of each adapted layer's input")
    prof.add_argument("--out", default="runs/profile", help="report folder (default runs/profile)")
    prof.set_defaults(func=_profile)

    plan = sub.add_parser("plan", help="which configurations fit in a memory budget (estimator only, no weights)")
    plan.add_argument("--model", required=True, help="model folder or config.json (or a bundled name)")
    plan.add_argument("--memory", required=True, help="memory budget, e.g. 24GiB")
    plan.add_argument("--seq", type=int, default=2048)
    plan.add_argument("--rank", type=int, default=16)
    plan.add_argument("--task", default="causal-lm")
    plan.add_argument("--dtype", default="bfloat16")
    plan.add_argument("--device", default="cuda", help="cuda | cpu: which kernels to assume (default cuda)")
    plan.set_defaults(func=_plan)

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
    exp.add_argument("--requantize", default="none", metavar="{none,nf4,fp4}",
                     help="nf4/fp4: write the 4-bit layers re-quantized (bitsandbytes format, loads with transformers "
                          "+ bitsandbytes); the added error is measured and reported (default none)")
    exp.set_defaults(func=_export)
    return parser


def _recipe_list() -> str:
    try:
        return ", ".join(known_recipes())
    except QLoRAError as e:
        return str(e)


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
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    rows = sweep(args.model, task=args.task, configurations=[c.strip() for c in args.configs.split(",")],
                 batches=_ints(args.batch, "batch"), seqs=_ints(args.seq, "seq"), ranks=_ints(args.rank, "rank"),
                 dtype=args.dtype, target_modules=targets, lora_dropout=args.lora_dropout, out=args.out)
    from memprofile.report import markdown_table as markdown_report
    print(markdown_report(rows))
    print(f"\nwrote {args.out}/report.json, report.md, report.csv, memory.png")
    return 0


def _plan(args) -> int:
    from memprofile.estimate import plan
    from memprofile.report import human
    from qlora.bundled import resolve_model
    from qlora.profile import ESTIMATOR_TASK, check_task
    check_task(args.task)
    model = args.model if args.model.endswith(".json") else resolve_model(args.model)
    budget = parse_size(args.memory)
    result = plan(model, budget, seq=args.seq, rank=args.rank, task=ESTIMATOR_TASK[args.task], dtype=args.dtype, device=args.device)
    print(f"{model}: seq {args.seq}, rank {args.rank}, {args.dtype}, budget {human(budget)} ({args.device})\n")
    print("| configuration | fits | largest batch | peak at that batch | weights | grads+optimizer | activations |")
    print("|---|---|---|---|---|---|---|")
    for conf, r in result.items():
        b = r["bytes"]
        weights = b["weights_quantized"] + b["weights_frozen"] + b["weights_trainable"]
        print(f"| {conf} | {'yes' if r['fits'] else 'no'} | {r['batch']} | {human(r['peak'])} | {human(weights)} | "
              f"{human(b['gradients'] + b['optimizer'])} | {human(b['activations'])} |")
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
                            force=args.force, verify=not args.no_verify, max_shard_size=parse_size(args.max_shard_size),
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
    packaged = recipes_dir() / "configs" / (path.name if path.suffix in (".yaml", ".yml") else f"{name_or_path}.yaml")
    if packaged.is_file() and (path.suffix in (".yaml", ".yml") or len(path.parts) == 1):
        return packaged
    raise QLoRAError(f"no config file or recipe {name_or_path!r}; recipes: {', '.join(known_recipes())} "
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
