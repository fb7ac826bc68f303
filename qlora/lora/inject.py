"""Attaching, merging and removing LoRA adapters on any `nn.Module`.

    model = add_lora(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    print_trainable_parameters(model)   # trainable params: ... || all params: ... || trainable%: ...
    merge_lora(model); unmerge_lora(model); model = unload_lora(model)
    with disable_adapters(model): ...    # base model only

Everything is checked before anything changes: a bad target list leaves the model untouched.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
from typing import Iterator

import torch
from torch import nn

from memprofile.tensors import param_counts
from qlora.arch.experts import expert_weight_names, is_experts_module, is_router, matrix_name, per_expert_names
from qlora.arch.heads import output_head_paths
from qlora.arch.multimodal import in_towers, tower_paths
from qlora.arch.names import matches_target as _matches
from qlora.arch.quantized import (
    four_bit_params,
    has_4bit,
    is_4bit,
    is_4bit_param,
    is_linear,
    is_transposed,
    runs_as_linear,
)
from qlora.errors import QLoRAError
from qlora.lora.config import LoraConfig
from qlora.lora.experts import LoRAExperts, attach, detach
from qlora.lora.layers import LoRALayer, ModulesToSave, lora_class_for
from qlora.quant.bnb_fixes import import_bnb
from qlora.quant.inspect import quant_settings

_INTERNAL = {"base_layer", "lora_A", "lora_B", "original_module", "modules_to_save", "lora_dropout", "expert_deltas"}


def _candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Paths a user can target: every module except the insides of existing adapters, and each 3-D matrix of
    an experts module (`...mlp.experts.gate_up_proj`, mapped to its experts module)."""
    out = {}
    for name, module in model.named_modules():
        if name and not _INTERNAL.intersection(name.split(".")):
            out[name] = module
            if is_experts_module(module):
                out.update({f"{name}.{w}": module for w in expert_weight_names(module)})
    return out


def _closest(asked: str, names: list[str], n: int = 6) -> list[str]:
    leaves = sorted({name.split(".")[-1] for name in names})
    close = difflib.get_close_matches(asked, leaves, n=n, cutoff=0.3)
    close += [c for c in difflib.get_close_matches(asked, names, n=n, cutoff=0.3) if c not in close]
    return close[:n] or leaves[:n]


def find_targets(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """Module path -> module that `config` adapts. Raises QLoRAError, changing nothing, when a
    target is unknown, of an unsupported type, or already has an adapter. An image-text model's towers
    (qlora.arch.multimodal) are adapted only when asked: `config.vision`, or a target naming only tower modules."""
    candidates = _candidate_modules(model)
    names = list(candidates)
    spec = config.target_modules
    towers = [] if config.vision else tower_paths(model)
    if spec == "all-linear":
        heads = output_head_paths(model)
        found = {n: m for n, m in candidates.items()
                 if (is_linear(m) and not isinstance(m, LoRALayer) and n not in heads
                     and (is_4bit(m) or runs_as_linear(m))
                     and not is_router(m, model.get_submodule(n.rpartition(".")[0]) if "." in n else model))
                 or matrix_name(n, m)}
        found = {n: m for n, m in found.items() if not in_towers(n, towers)}
        if not found:
            raise QLoRAError("target_modules='all-linear' found no Linear (or Conv1D) layers outside the output head")
        found = _without_peft_fused_names(model, found)
    else:
        found = {}
        for one in [spec] if isinstance(spec, str) else spec:
            hits = {n: m for n, m in candidates.items() if _matches(n, one if isinstance(spec, str) else [one])}
            if not hits:
                raise QLoRAError(
                    f"target module {one!r} matches no module of {type(model).__name__}. "
                    f"Closest names in this model: {_closest(one, names)}. "
                    "Give module-path suffixes (e.g. 'q_proj', 'attention.self.query'), a regex, or 'all-linear'.")
            text = {n: m for n, m in hits.items() if not in_towers(n, towers)}
            found.update(text or hits)      # a name on both sides: the language model's; only in a tower: named
    for one in config.target_parameters or []:     # PEFT's target_parameters: experts matrices only
        hits = {n: m for n, m in candidates.items() if matrix_name(n, m) and _matches(n, [one])}
        if not hits:
            raise QLoRAError(f"target_parameters entry {one!r} matches no experts matrix of {type(model).__name__}")
        found.update(hits)
    # an experts module named as a whole: each of its matrices
    found = {**{n: m for n, m in found.items() if not is_experts_module(m) or matrix_name(n, m)},
             **{f"{n}.{w}": m for n, m in found.items() if is_experts_module(m) and not matrix_name(n, m)
                for w in expert_weight_names(m)}}
    if config.exclude_modules:
        found = {n: m for n, m in found.items() if not _matches(n, config.exclude_modules)}
    for name, module in found.items():
        if matrix_name(name, module):
            if name.rpartition(".")[2] in getattr(module, "expert_deltas", {}):
                raise QLoRAError(f"{name!r} already has a LoRA adapter; remove it first (qlora.unload_lora) "
                                 "or leave it out of target_modules")
            continue
        if isinstance(module, LoRALayer):
            raise QLoRAError(f"{name!r} already has a LoRA adapter; remove it first (qlora.unload_lora) "
                             "or leave it out of target_modules")
        if isinstance(module, ModulesToSave):
            raise QLoRAError(f"{name!r} is in modules_to_save (trained in full); it can't also get LoRA")
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if is_linear(module) and not is_4bit(module) and not runs_as_linear(module):
            what = "a router" if is_router(module, parent) else "a linear layer"
            raise QLoRAError(f"{name!r} is {what} with a forward of its own ({type(module).__name__}: it does not "
                             "compute x @ W.T + b from its "
                             "weight, e.g. routing scores or a grouped projection); LoRA cannot wrap it. Leave it out "
                             "of target_modules (or exclude it with exclude_modules)")
        if lora_class_for(module) is None:
            raise QLoRAError(
                f"{name!r} is a {type(module).__name__}; LoRA supports nn.Linear, transformers Conv1D, "
                "bitsandbytes Linear4bit, "
                "nn.Embedding and nn.Conv2d. Name those layers instead, or exclude this one with exclude_modules.")
    if not found:
        raise QLoRAError(f"target_modules={spec!r} matched only modules excluded by exclude_modules")
    return found


def _without_peft_fused_names(model: nn.Module, found: dict) -> dict:
    """all-linear minus the Linears PEFT's loader cannot adapt in this family: in a family whose checkpoints
    store each expert's matrices as separate tensors that transformers fuses (qlora.arch.experts.per_expert_names),
    PEFT maps every LoRA target named like them (gate_proj, up_proj, down_proj) onto the fused experts, so an
    adapter on a dense or shared-expert MLP Linear of that name would not load in PEFT, transformers or vLLM.
    They are left out, said in one line (name them to adapt them anyway)."""
    names = per_expert_names(model) if any(is_experts_module(m) for m in model.modules()) else set()
    left_out = sorted(n for n, m in found.items() if not matrix_name(n, m) and n.rpartition(".")[2] in names)
    if not left_out:
        return found
    print(f"all-linear: {len(left_out)} Linear layer(s) named {'/'.join(sorted(names))} outside the experts left out "
          f"({left_out[0]}{', ...' if len(left_out) > 1 else ''}): PEFT loads an adapter on such names only onto "
          "this family's fused experts; name them in target_modules to adapt them anyway (PEFT will not load that)")
    return {n: m for n, m in found.items() if n not in left_out}


def find_modules(model: nn.Module, names: list[str], what: str = "module") -> dict[str, nn.Module]:
    """Module path -> module for each of `names` (module-path suffixes), outermost matches only
    (e.g. 'classifier' and not also 'classifier.dense'). An unknown name raises QLoRAError naming the
    closest modules; `what` says what the names are for (e.g. "modules_to_save entry")."""
    candidates = _candidate_modules(model)
    found = {}
    for one in names:
        hits = {n: m for n, m in candidates.items() if _matches(n, [one])}
        if not hits:
            raise QLoRAError(f"{what} {one!r} matches no module. "
                             f"Closest names in this model: {_closest(one, list(candidates))}")
        for n, m in hits.items():
            if not any(n.startswith(other + ".") for other in hits):
                found[n] = m
    return found


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    return find_modules(model, config.modules_to_save or [], "modules_to_save entry")


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Attach LoRA adapters in place: targets are wrapped, every base parameter is frozen, adapters
    and `modules_to_save` copies are trainable. Returns the same model object.

    `config` is not changed: `model.qlora_config` is a copy that also records the 4-bit settings
    (`qlora` field) and, after a second add_lora, the union of the targets."""
    targets = find_targets(model, config)
    to_save = find_modules_to_save(model, config)
    overlap = {t for t in targets for s in to_save if t == s or t.startswith(s + ".")}
    if overlap:
        raise QLoRAError(f"{sorted(overlap)[0]!r} is both a LoRA target and inside modules_to_save; pick one")
    previous = getattr(model, "qlora_config", None)
    if previous is not None and (previous.r, previous.lora_alpha, previous.use_rslora, previous.rank_pattern,
                                 previous.alpha_pattern) != (config.r, config.lora_alpha, config.use_rslora,
                                                             config.rank_pattern, config.alpha_pattern):
        raise QLoRAError("this model already has adapters with a different r/lora_alpha/use_rslora; "
                         "one adapter file holds one setting: remove the old ones first (qlora.unload_lora)")

    config = copy.deepcopy(config)   # the model keeps its own record; the caller's config is not changed
    for p in model.parameters():
        p.requires_grad_(False)
    for path, module in targets.items():
        if matrix_name(path, module):      # an experts matrix: LoRA on each expert's routed tokens
            name = path.rpartition(".")[2]
            attach(module, name, LoRAExperts(module, name, config.r_for(path), config.alpha_for(path),
                                             lora_dropout=config.lora_dropout,
                                             use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                                             dtype=config.dtype))
            continue
        cls = lora_class_for(module)
        layer = cls(module, config.r_for(path), config.alpha_for(path), lora_dropout=config.lora_dropout,
                    use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                    dtype=config.dtype)
        _set_submodule(model, path, layer)
    for path, module in to_save.items():
        _set_submodule(model, path, ModulesToSave(module))
    for module in model.modules():
        if isinstance(module, LoRALayer):
            for name, p in module.named_parameters():
                p.requires_grad_(not name.startswith("base_layer."))
        elif isinstance(module, ModulesToSave):
            for p in module.modules_to_save.parameters():
                p.requires_grad_(True)

    config.qlora = dict(config.qlora or {})
    if has_4bit(model):
        import_bnb()   # a base quantized elsewhere (transformers' loader): trained through our fixes too
        config.qlora.update(quant_settings(model) or {})
        # every layer that trained on 4-bit weights (adapted or not): the export re-creates exactly those
        config.qlora["quantized_modules"] = sorted(
            {n.removesuffix(".base_layer") for n, m in model.named_modules() if is_4bit(m)})
        towers = tower_paths(model)
        if any(in_towers(n, towers) for n in config.qlora["quantized_modules"]):
            config.qlora["quantize_vision"] = True      # an image-text model's towers were 4-bit too (load_4bit's option)
    experts_4bit = sorted(f"{path}.{name}" for path, module, name, _ in four_bit_params(model)
                          if is_experts_module(module))
    if experts_4bit:    # 4-bit experts matrices: the export rebuilds them through the 4-bit model (qlora.export)
        config.qlora["quantized_experts"] = experts_4bit
    # layers whose checkpoint weight is [in, out] (transformers' Conv1D, 4-bit or not): the export
    # transposes them around the merge and the 4-bit round trip
    transposed = sorted({n.removesuffix(".base_layer") for n, m in model.named_modules()
                         if is_transposed(m) and not isinstance(m, LoRALayer)})
    if transposed:
        config.qlora["transposed_modules"] = transposed
    if previous is not None:  # a second add_lora on other modules: record the explicit union
        config.target_modules = sorted(lora_layers(model))
        config.modules_to_save = sorted(set(previous.modules_to_save or []) | set(config.modules_to_save or [])) or None
    model.qlora_config = config
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters: memprofile.tensors.param_counts, the one count. A 4-bit weight counts
    as its unpacked element count; the frozen original kept beside a `modules_to_save` copy is not counted
    (the trained copy stands in for it in forward), unless another module shares its tensor (a tied head)."""
    return param_counts(model)


def print_trainable_parameters(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    line = (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
    print(line)
    return line


def merge_lora(model: nn.Module) -> nn.Module:
    """Add s·B·A into every adapted base weight (fp32 arithmetic). Idempotent. All layers are
    checked first: when one can't be merged (non-finite result, 4-bit base), none is."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.check_merge()
    for layer in layers:
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract s·B·A again. Idempotent."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge the adapters and put plain modules back (`modules_to_save` keep their trained copy)."""
    layers = lora_layers(model)
    if any(is_4bit(layer.base_layer) or any(is_4bit_param(p) for p in layer.base_layer.parameters(recurse=False))
           for layer in layers.values()):
        raise QLoRAError("this model has a 4-bit base: merging into 4-bit weights changes the outputs. "
                         "Use qlora.export_merged(model, out_folder) to get a plain bf16/fp16 model.")
    merge_lora(model)   # all or nothing, before any module is replaced
    for path, layer in layers.items():
        if isinstance(layer, LoRAExperts):
            detach(layer.base_layer, layer.weight_name)
        else:
            _set_submodule(model, path, layer.base_layer)
    for path, module in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]:
        _set_submodule(model, path, module.modules_to_save)
    if hasattr(model, "qlora_config"):
        del model.qlora_config
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (merged adapters are unmerged for it, then re-merged)."""
    layers = list(lora_layers(model).values())
    saves = [m for m in model.modules() if isinstance(m, ModulesToSave)]
    was_merged = [layer.merged for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        for m in saves:
            m.use_original = True
        yield model
    finally:
        for layer, merged in zip(layers, was_merged):
            layer.disabled = False
            if merged:
                layer.merge()
        for m in saves:
            m.use_original = False


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own tensors under our module paths (LoRA A/B and modules_to_save copies)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
