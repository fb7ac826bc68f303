"""The LoRA of experts matrices in an export: PEFT's layout read back per expert, and s·B_e·A_e added per expert.

A mixture-of-experts checkpoint stores each layer's experts the family's way (Mixtral per expert
`block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen3-MoE per expert `gate_proj/up_proj/down_proj`, gpt-oss fused);
qlora.export.layout reads them as the fused [E, a, b] matrices the model holds (transformers' conversion) and
writes them back in the checkpoint's layout. Here:

    a, b = expert_updates(tensors, target_parameters, model)[matrix]     # A [E, r, in], B [E, out, r]
    add_expert_delta_(w, a, b, scaling, transposed)                      # w += s·B_e·A_e, a few experts at a time
"""
from __future__ import annotations

import torch

from qlora.lora.experts import from_peft, peft_stems


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
