"""Experts matrices in an export from files: read from the checkpoint's own layout, merged, written back in it.

A mixture-of-experts checkpoint stores each layer's experts the family's way (Mixtral per expert
`block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen3-MoE / DeepSeek per expert `gate_proj/up_proj/down_proj`,
gpt-oss fused); transformers 5 turns them into fused [E, a, b] matrices when it loads, with its own conversion
mapping. `CheckpointExperts` applies that same mapping to the checkpoint keys of one fused matrix at a time:

    experts = CheckpointExperts(folder, hf_config, specs)     # which checkpoint keys make which matrix
    w = experts.read("model.layers.0.mlp.experts.gate_up_proj")          # [E, 2I, H], as the model holds it
    experts.pieces(name, merged)      # {checkpoint key: tensor}: transformers' revert (what save_pretrained writes)

Memory: one fused matrix (its checkpoint tensors, then the stacked copy), never the model.
"""
from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import torch
import transformers

from qlora.arch.experts import expert_weight_names, is_experts_module
from qlora.export.checkpoint import read_tensor
from qlora.export.verify import model_class_for
from qlora.lora.experts import from_peft, peft_stems


class CheckpointExperts:
    def __init__(self, folder: Path, hf_config: dict, specs: dict):
        """`specs`: {checkpoint key: (file, shape, dtype)} of the base folder (qlora.export.checkpoint)."""
        from transformers.conversion_mapping import get_model_conversion_mapping  # lazy: transformers >= 5 only
        from transformers.core_model_loading import (  # lazy: transformers >= 5 only
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        config = transformers.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            self.model = model_class_for(hf_config)._from_config(config)
        self.specs = specs
        mapping = get_model_conversion_mapping(self.model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self._converter = {p: c for c in converters for p in c.source_patterns}
        meta_state = self.model.state_dict()
        prefix = getattr(self.model, "base_model_prefix", "")
        self.matrices = {f"{n}.{w}": m for n, m in self.model.named_modules() if is_experts_module(m)
                         for w in expert_weight_names(m)}
        self.sources: dict[str, list[tuple[str, str]]] = {}     # matrix -> [(checkpoint key, source pattern)]
        for key in specs:
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
            if renamed in self.matrices:
                self.sources.setdefault(renamed, []).append((key, pattern))

    def is_transposed(self, name: str) -> bool:
        return bool(self.matrices[name].is_transposed)

    def read(self, name: str) -> torch.Tensor:
        """The fused [E, a, b] matrix `name` from its checkpoint tensors, through transformers' conversion."""
        from transformers.core_model_loading import dot_natural_key  # lazy: transformers >= 5 only

        keys = sorted(self.sources[name], key=lambda kp: dot_natural_key(kp[0]))
        if len(keys) == 1 and keys[0][1] is None:          # stored fused already (gpt-oss)
            return read_tensor(self.specs[keys[0][0]][0], keys[0][0])
        converter = deepcopy(self._converter[keys[0][1]])
        for key, pattern in keys:
            converter.add_tensor(name, key, pattern, read_tensor(self.specs[key][0], key))
        out = converter.convert(name, model=self.model, config=self.model.config)
        value = out[name]
        return value[0] if isinstance(value, list) else value

    def pieces(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """{checkpoint key: tensor} for a fused matrix, in the checkpoint's layout (transformers' revert)."""
        from transformers.core_model_loading import revert_weight_conversion  # lazy: transformers >= 5 only
        return revert_weight_conversion(self.model, {name: tensor})

    def keys(self, name: str) -> list[str]:
        return [k for k, _ in self.sources.get(name, [])]


def expert_updates(tensors: dict, target_parameters: list[str], model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{experts matrix path: (A [E, r, in], B [E, out, r])} from an adapter's PEFT-layout tensors (keys without
    PEFT's prefix; qlora.lora.experts has the layout)."""
    by_module: dict[str, list[str]] = {}
    for path in target_parameters:
        module, _, name = path.rpartition(".")
        by_module.setdefault(module, []).append(name)
    modules = dict(model.named_modules())
    out = {}
    for module_path, names in by_module.items():
        experts = modules[module_path]
        for name, stem in peft_stems(module_path, experts, names).items():
            out[f"{module_path}.{name}"] = from_peft(tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"],
                                                     experts.num_experts)
    return out


def add_expert_delta_(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool,
                      chunk: int = 8) -> float:
    """weight [E, out, in] (or [E, in, out]) += s·B_e·A_e per expert, in place, `chunk` experts at a time;
    returns ||s·B·A||_F (over all experts)."""
    total = 0.0
    for start in range(0, weight.shape[0], chunk):
        delta = torch.einsum("eor,eri->eoi", b[start:start + chunk].float(), a[start:start + chunk].float()) * scaling
        weight[start:start + chunk] += delta.transpose(1, 2) if transposed else delta
        total += float(delta.double().pow(2).sum())
    return total ** 0.5
