"""Mixture-of-experts layers as transformers 5 records them: one rule for "is this an experts module".

    is_experts_module(module)        # decorated by transformers' `use_experts_implementation`
    expert_weights(module)           # {"gate_up_proj": (in, out), "down_proj": (in, out)}: its 3-D matrices
    per_expert_names(model)          # {"gate_proj", "up_proj", "down_proj"}: what its checkpoints call each expert's

transformers 5 keeps each layer's experts as fused 3-D parameters behind its experts interface
(`transformers.integrations.moe.use_experts_implementation`, ~67 architectures: Mixtral, Qwen2/3-MoE,
OLMoE, DeepSeek-V2/V3, gpt-oss, GLM-4-MoE, PhiMoE, Granite-MoE, ...). The decorator records the layout on
each instance, and qlora reads only that, never a list of architectures:

- `has_gate`: the up matrix is `gate_up_proj` [E, 2I, H] (gate and up fused; `is_concatenated` says
  whether as two halves or interleaved), else `up_proj` [E, I, H];
- `is_transposed`: the matrices are stored [E, in, out] (gpt-oss) instead of [E, out, in];
- `has_bias`: `<name>_bias` [E, out] beside each matrix;
- `num_experts`; the activation is the module's own `_apply_gate` / `act_fn`, and routing (router, top-k,
  weights) happens in the parent block, outside the experts module.

Families whose experts are `nn.Linear` modules (Switch, NLLB-MoE, older checkpoints) are linear layers to
qlora and need nothing from here.
"""
from __future__ import annotations

import re

from torch import nn

from memprofile.tensors import unpacked_shape

_FLAGS = ("has_gate", "has_bias", "is_transposed", "num_experts")


def is_experts_module(module: nn.Module) -> bool:
    """True for a module transformers' experts interface decorated (it sets these flags on the instance)."""
    flags = module.__dict__        # the instance's own attributes (not ones a wrapper forwards to what it wraps)
    return all(flag in flags for flag in _FLAGS) and isinstance(flags["num_experts"], int)


def is_router(module: nn.Module, parent: nn.Module | None) -> bool:
    """A linear layer that scores the experts (Mixtral's gate, PhiMoE's and Llama 4's nn.Linear routers with a
    forward of their own) or gates them (Qwen2-MoE's `shared_expert_gate`, Linear(H, 1)): one output per expert,
    or a single one, where it, its parent or a sibling records `num_experts`. Routers and gates stay as they
    are: not quantized, no LoRA unless named (like the output head)."""
    if not isinstance(module, nn.Linear):
        return False
    counts = {getattr(m, "num_experts", None) for m in (module, parent, *(parent.children() if parent else ()))}
    experts = {n for n in counts if isinstance(n, int) and n > 1}
    return bool(experts) and (module.out_features in experts or module.out_features == 1)   # 1: a shared expert's gate


def expert_weight_names(module: nn.Module) -> list[str]:
    """The experts module's 3-D matrices, in the order its forward uses them (and registers them)."""
    return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]


def matrix_name(path: str, module: nn.Module) -> str | None:
    """The matrix a target path names (`...mlp.experts.down_proj` -> 'down_proj'), when `module` is the experts
    module it belongs to; None for a module path."""
    name = path.rpartition(".")[2]
    if is_experts_module(module) and name in expert_weight_names(module) and name not in module._modules:
        return name
    return None


def expert_features(module: nn.Module, name: str, shape=None) -> tuple[int, int]:
    """(in_features, out_features) of one expert of matrix `name`, from its [E, a, b] shape."""
    _, a, b = shape if shape is not None else module.get_parameter(name).shape
    return (a, b) if module.is_transposed else (b, a)


def expert_weights(module: nn.Module) -> dict[str, tuple[int, int]]:
    """{matrix name: (in_features, out_features) of one expert}."""
    return {name: expert_features(module, name, _shape(module, name)) for name in expert_weight_names(module)}


def _shape(module: nn.Module, name: str):
    return tuple(unpacked_shape(module.get_parameter(name)))    # a 4-bit matrix's shape is in its quant state


def per_expert_names(model: nn.Module) -> set[str]:
    """The names this model type's checkpoints give each expert's matrices (`experts.*.gate_proj.weight` ->
    "gate_proj"), read from transformers' checkpoint conversion mapping, which fuses them at load; empty when it
    fuses none. PEFT's loader maps any LoRA target of these names onto the fused experts (its v4 -> v5
    conversion), so in such a family a Linear outside the experts with one of these names cannot hold an adapter
    PEFT loads (qlora.lora.inject leaves them out of all-linear)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping  # lazy: transformers >= 5 only
    except ImportError:
        return set()
    names = set()
    for converter in (get_checkpoint_conversion_mapping(model_type) or []) if model_type else []:
        for pattern in getattr(converter, "source_patterns", None) or []:
            names.update(re.findall(r"experts\.\*\.(\w+)\.weight", pattern))
    return names
