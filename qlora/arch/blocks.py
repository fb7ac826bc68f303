"""The stack of blocks: one home for how qlora finds a model's repeated layers.

- `transformer_blocks`: transformers' own checkpointable layers (GradientCheckpointingLayer), in order
  (checkpointing and the planner's k-of-L blocks);
- `repeated_module_lists`: nn.ModuleLists of >= 2 children of one type, largest first (checkpointing of
  any nn.Module, the planner's smaller traced model);
- `outermost_module_lists`: the nn.ModuleLists not inside another one's children (FSDP's units).
"""
from __future__ import annotations

from torch import nn


def repeated_module_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """nn.ModuleLists of >= 2 children of one type (a stack of blocks), largest first (by params)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(c) for c in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            found.append((size, len(module), name, module))
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [(name, module) for _, _, name, module in found]


def is_transformers_model(model: nn.Module) -> bool:
    return bool(getattr(model, "supports_gradient_checkpointing", False)) and callable(
        getattr(model, "gradient_checkpointing_enable", None))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """transformers' checkpointable layers (GradientCheckpointingLayer), in model order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer  # lazy: ~1.8 s; a model that has them loaded it
    except ImportError:            # transformers < 4.53: no per-layer switch
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def outermost_module_lists(model: nn.Module) -> list[nn.ModuleList]:
    """Every nn.ModuleList of `model` that is not inside a child of another one, in model order."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    inner = {id(sub) for lst in lists for child in lst for sub in child.modules() if sub is not child}
    return [lst for lst in lists if id(lst) not in inner]
