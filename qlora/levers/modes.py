"""Training configurations: which weights train, in which precision, with or without checkpointing.

    model = build_for_mode("qlora-ckpt", load_float=..., load_4bit=..., lora=LoraConfig(...))

| mode       | base weights          | trainable                         |
|------------|-----------------------|-----------------------------------|
| full       | float (bf16 or fp32)  | everything                        |
| head       | float, frozen         | the output head only              |
| lora       | float, frozen         | LoRA adapters (+ modules_to_save) |
| qlora      | NF4 4-bit, frozen     | LoRA adapters in bf16 (+ head)    |
| *-ckpt     | as above              | as above; activations recomputed  |

Shared by the recipes (accuracy tables) and by `qlora.plan.sweep` (memory tables).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from torch import nn

from qlora.arch.heads import output_head_paths, task_head_paths
from qlora.errors import QLoRAError
from qlora.levers.checkpointing import enable_checkpointing
from qlora.lora.config import LoraConfig
from qlora.lora.inject import add_lora, find_modules

MODES = ("full", "head", "lora", "qlora")
CONFIGURATIONS = ("full", "head", "lora", "lora-ckpt", "qlora", "qlora-ckpt")


def check_mode(mode: str, allowed=CONFIGURATIONS) -> str:
    if mode not in allowed:
        raise QLoRAError(f"mode {mode!r} is not known; allowed: {', '.join(allowed)}")
    return mode


def unfreeze_head(model: nn.Module, names: list[str] | None = None) -> int:
    """Freeze everything except the output head; returns its param count.

    The head is `names` (module names or dotted suffixes, e.g. a recipe's modules_to_save such as
    ['classifier', 'pooler']) or, when None, the modules called lm_head / classifier / score."""
    heads = set(find_modules(model, names, what="head module")) if names else output_head_paths(model)
    if not heads:
        raise QLoRAError(f"{type(model).__name__} has no output head (lm_head, classifier or score) to train")
    for p in model.parameters():
        p.requires_grad_(False)
    count, modules = 0, dict(model.named_modules())
    for name in sorted(heads):
        if any(name.startswith(other + ".") for other in heads):
            continue
        for p in modules[name].parameters():
            if not p.requires_grad:
                p.requires_grad_(True)
                count += p.numel()
    return count


def build_for_mode(mode: str, *, load_float: Callable[[], nn.Module], load_4bit: Callable[[], nn.Module],
                   lora: LoraConfig | None = None, head: list[str] | None = None) -> nn.Module:
    """A fresh model set up for `mode` (one of CONFIGURATIONS); `head` names what head-only trains
    (default: lm_head / classifier / score). LoRA modes without `modules_to_save` train a
    classifier's new head (classifier / score, not a causal LM's lm_head) in full."""
    check_mode(mode)
    base, _, ckpt = mode.partition("-")
    if base in ("lora", "qlora") and lora is None:
        raise QLoRAError(f"mode {mode!r} needs a LoraConfig")
    model = load_4bit() if base == "qlora" else load_float()
    if base == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif base == "head":
        unfreeze_head(model, head)
    else:
        if lora.modules_to_save is None and (new_head := task_head_paths(model)):
            lora = replace(lora, modules_to_save=sorted(new_head))   # a classifier's new head trains in full
        add_lora(model, lora)          # add_lora keeps its own copy: `lora` serves every mode unchanged
    if ckpt:
        enable_checkpointing(model)
    return model
