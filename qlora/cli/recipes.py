"""qlora train / qlora demo: find a recipe (a configs/NAME.yaml of the recipes package) and run it.

The library knows nothing of recipes; the command line finds them by name: the package `qlora_recipes`
(pyproject.toml maps it to the folder recipes/; an editable install of a checkout uses that folder).
"""
from __future__ import annotations

import importlib
import sys
import typing
from pathlib import Path

import yaml

from qlora.errors import QLoRAError, RecipeFailed
from qlora.util.configs import load_config


def add_parsers(sub) -> None:
    demo = sub.add_parser("demo", help="a short QLoRA fine-tune on bundled data (no download)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of recipes/configs/demo.yaml")
    demo.set_defaults(func=run_demo)

    tr = sub.add_parser("train", help="run a recipe: qlora train sft data=my.jsonl [key=value ...]",
                        description="Run a recipe: qlora train NAME_OR_CONFIG [key=value ...]. "
                                    f"Recipes: {recipe_list()}. Fine-tune on your own data: "
                                    "qlora train sft model=FOLDER_OR_HUB_ID data=my.jsonl")
    tr.add_argument("config", help="a recipe name (sft, seq_cls, ...) or a config file (recipes/configs/*.yaml)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lora.r=16 train.epochs=1 mode=qlora")
    tr.set_defaults(func=run_train)



def recipe_list() -> str:
    try:
        return ", ".join(known_recipes())
    except QLoRAError as e:
        return str(e)


def recipes_package():
    """The recipes package `qlora_recipes` (the folder recipes/, mapped by pyproject.toml; installed with qlora)."""
    try:
        return importlib.import_module("qlora_recipes")
    except ModuleNotFoundError:
        raise QLoRAError("the recipes (package qlora_recipes) are not installed: reinstall qlora "
                         "(pip install . in a source checkout)") from None


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


def recipe_name(path: Path) -> str:
    """The `recipe:` key of a config file (which script of the recipes package runs it)."""
    tree = yaml.safe_load(path.read_text()) or {}
    name = tree.get("recipe") if isinstance(tree, dict) else None
    if not name:
        raise QLoRAError(f"{path} has no 'recipe:' key naming the script in recipes/ that runs it")
    return name


def run_recipe(config_path: str, overrides: list[str]):
    """Import the recipe module that the config names, build its config (the type of main()'s first
    argument) from the YAML and the overrides, and run main()."""
    package = recipes_package()
    path = find_config(config_path)
    name = recipe_name(path)
    if not (recipes_dir() / f"{name}.py").is_file():
        raise QLoRAError(f"{path} names recipe {name!r}, which does not exist; recipes: {', '.join(known_recipes())}")
    module = importlib.import_module(f"{package.__name__}.{name}")
    hints = typing.get_type_hints(module.main)
    config_class = next(v for k, v in hints.items() if k != "return")
    return module.main(load_config(path, overrides, config_class))


def run_or_fail(config: str, overrides: list[str]) -> int:
    """0, or 1 when the recipe ran but failed a check it promises (qlora.errors.RecipeFailed)."""
    try:
        run_recipe(config, overrides)
    except RecipeFailed as e:
        print(f"qlora train: failed: {e}", file=sys.stderr)
        return 1
    return 0


def run_train(args) -> int:
    return run_or_fail(args.config, args.overrides)


def run_demo(args) -> int:
    overrides = [f"out_dir={args.out}"] + list(args.overrides)
    return run_or_fail("demo", overrides)
