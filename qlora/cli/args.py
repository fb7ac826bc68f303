"""Argument types and the options every planning subcommand shares (defaults: qlora train's). Torch-free."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qlora.errors import QLoRAError
from qlora.util.dtypes import DTYPE_NAMES, canonical_dtype
from qlora.util.sizes import parse_size


def positive_int(text: str, minimum: int = 1) -> int:
    """argparse type: an integer >= 1 (>= `minimum`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a whole number >= {minimum}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= {minimum}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return positive_int(text, minimum=0)


def dtype(text: str) -> str:
    """argparse type: a float dtype name (aliases bf16/fp16/fp32 accepted) -> its full name."""
    name = canonical_dtype(str(text))
    if name is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype qlora trains in; use one of {', '.join(DTYPE_NAMES)}")
    return name


def size(text: str) -> int:
    """argparse type: a positive size such as 24GiB -> bytes."""
    try:
        return parse_size(text)
    except QLoRAError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def model(text: str) -> str:
    """argparse type: a model folder, config.json, bundled name or Hub id. A local config.json is
    checked to be a JSON object (a folder or name is resolved later, by the subcommand)."""
    path = Path(text)
    config = path / "config.json" if path.is_dir() else path if path.suffix == ".json" else None
    if path.is_dir() and not (path / "config.json").exists():
        raise argparse.ArgumentTypeError(f"folder {text!r} has no config.json; give a Hugging Face model folder "
                                         "(config.json + weights), its config.json, or a bundled name (minilm, smollm2)")
    if config is not None and config.exists():
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


def ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise QLoRAError(f"--{what} {text!r}: give comma-separated integers, e.g. 1,4") from None
    if not values or min(values) < 1:
        raise QLoRAError(f"--{what} {text!r}: give comma-separated integers >= 1")
    return values


def run_options(p) -> None:
    """The options that say how the run trains (defaults: qlora train's)."""
    p.add_argument("--dtype", default="auto", type=lambda t: t if t == "auto" else dtype(t),
                   help="compute dtype: auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32")
    p.add_argument("--loss", default="chunked", help="chunked (qlora's chunked head + loss) | model (full logits)")
    p.add_argument("--loss-chunk-size", type=positive_int, default=256, help="tokens per chunk of the chunked loss")
    p.add_argument("--optimizer", default="adamw", help="adamw | adamw8bit | paged_adamw8bit")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.05,
                   help="LoRA dropout (default 0.05); > 0 saves a dropped copy of each adapted layer's input")
    p.add_argument("--target-modules", default="all-linear", help="LoRA targets: all-linear or comma-separated names")


def run_settings(args, **fields):
    from qlora.plan import RunSettings  # lazy: qlora --help imports no torch
    targets = args.target_modules if args.target_modules == "all-linear" else tuple(args.target_modules.split(","))
    return RunSettings(task=args.task, compute_dtype=args.dtype, loss=args.loss, loss_chunk_size=args.loss_chunk_size,
                       optimizer=args.optimizer, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                       target_modules=targets, **fields)
