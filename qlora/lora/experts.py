"""LoRA on every expert of a fused 3-D experts matrix, applied on each expert's routed tokens.

    delta_e(x_e) = s · (dropout(x_e) A_eᵀ) B_eᵀ        A: [E, r, in], B: [E, out, r], s = alpha / r (rsLoRA: / sqrt r)

x_e are the rows the router sent to expert e (qlora.quant.experts sorts them); the update costs rows x r of
activations, never an [E, out, in] delta weight. The layer lives in the experts module's
`expert_deltas[name]` (a ModuleDict), which qlora.quant.experts' forward adds to that matrix's output; it
keeps a reference to its experts module without owning it (the module owns the layer). Trainable
parameters per matrix: E·r·(in + out). Merging (a float base only) adds s·B_e·A_e to each expert's matrix.
PEFT's layout (`target_parameters`) is qlora.lora.files' business: A as [E·r, in] (expert-major), B as
[out, r·E] (rank-major).
"""
from __future__ import annotations

import torch
from torch import nn

from memprofile.tensors import unpacked_shape
from qlora.arch.experts import expert_features, expert_weight_names
from qlora.arch.quantized import is_4bit_param
from qlora.errors import QLoRAError
from qlora.lora.layers import LoRALayer, dropout_layer, init_pair
from qlora.quant.experts import use_qlora_forward
from qlora.quant.grouped import grouped_mm


class LoRAExperts(LoRALayer):
    """Per-expert low-rank updates of one experts matrix (see the module docstring)."""

    def __init__(self, experts: nn.Module, name: str, r: int, lora_alpha: float, *, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        self.__dict__["_experts"] = experts          # not a child: the experts module owns this layer
        self.weight_name = name
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_alpha / (r ** 0.5 if use_rslora else r)
        self.merged = self.disabled = False
        weight = experts.get_parameter(name)
        shape = tuple(unpacked_shape(weight))
        E = shape[0]
        in_features, out_features = expert_features(experts, name, shape)
        if dtype is None:
            dtype = experts.compute_dtype if is_4bit_param(weight) else weight.dtype
        self.lora_dropout = dropout_layer(lora_dropout)
        self.lora_A = nn.Parameter(torch.empty(E, r, in_features, device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(E, out_features, r, device=weight.device, dtype=dtype))
        for e in range(E):          # each expert's pair as a Linear pair would be initialised (B = 0: no change)
            init_pair(self.lora_A[e], self.lora_B[e], init_lora_weights, r)

    @property
    def base_layer(self) -> nn.Module:
        """The experts module whose matrix this adapts."""
        return self.__dict__["_experts"]

    def forward(self, x: torch.Tensor, lo: int, hi: int, offs: torch.Tensor):
        """x [rows, in] sorted by expert, experts lo..hi-1 (rows split by offs) -> s·(x A_eᵀ) B_eᵀ [rows, out]:
        two grouped matmuls through rank r (qlora.quant.grouped), never an [E, out, in] weight."""
        if self.merged or self.disabled:
            return None
        A, B = self.lora_A[lo:hi], self.lora_B[lo:hi]                   # [k, r, in], [k, out, r] (views)
        h = grouped_mm(self.lora_dropout(x), A.transpose(1, 2), offs)    # [rows, r]
        return grouped_mm(h, B.transpose(1, 2), offs) * self.scaling      # [rows, out]

    def delta_weight(self) -> torch.Tensor:
        """s·B_e·A_e for every expert, fp32, laid out as the matrix is stored ([E, out, in] or transposed)."""
        delta = torch.einsum("eor,eri->eoi", self.lora_B.float(), self.lora_A.float()) * self.scaling
        return delta.transpose(1, 2) if self.base_layer.is_transposed else delta

    def _add_to_base(self, delta: torch.Tensor) -> None:
        self.base_layer.get_parameter(self.weight_name).data.copy_(self._new_weight(delta))

    def _new_weight(self, delta: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.get_parameter(self.weight_name)
        if is_4bit_param(weight):
            raise QLoRAError(
                "cannot merge a LoRA adapter into 4-bit experts in place: re-quantizing the sum changes the "
                "outputs. Export a merged bf16/fp16 model instead: qlora.export_merged(model, out_folder) or "
                "`qlora export --base ... --adapter ... --out ...`")
        new = (weight.data.float() + delta.to(weight.device)).to(weight.dtype)
        if not torch.isfinite(new).all():
            raise QLoRAError(f"merging the adapter into {self.weight_name} gives non-finite weights; nothing was changed")
        return new

    def extra_repr(self) -> str:
        E, r, i = self.lora_A.shape
        return f"{self.weight_name}: {E} experts, r={r}, in={i}, out={self.lora_B.shape[1]}, scaling={self.scaling:.4g}"


def attach(experts: nn.Module, name: str, layer: LoRAExperts) -> None:
    """Put `layer` where the experts forward reads it (and bind that forward to float experts too)."""
    if "expert_deltas" not in experts._modules:
        experts.expert_deltas = nn.ModuleDict()
    experts.expert_deltas[name] = layer
    use_qlora_forward(experts)


def detach(experts: nn.Module, name: str) -> None:
    """Remove the layer of matrix `name`; float experts without adapters get transformers' forward back."""
    del experts.expert_deltas[name]
    if not len(experts.expert_deltas):
        del experts.expert_deltas
        if not any(is_4bit_param(p) for p in experts.parameters(recurse=False)):
            experts.__dict__.pop("forward", None)


# --------------------------------------------------------------------------------------------- PEFT's layout
def peft_stems(module_path: str, experts: nn.Module, names: list[str]) -> dict[str, str]:
    """{matrix name: PEFT's key stem} for the adapted matrices `names` of the experts module at `module_path`
    (keys are stem + ".lora_A.weight" / ".lora_B.weight").

    PEFT (`target_parameters`) wraps each targeted parameter in a ParamWrapper, nesting several on one
    module in the module's registration order: the first wrapped is the innermost, so its keys carry one
    `base_layer` per wrapper outside it; the keys do not name the parameter."""
    ordered = [n for n in expert_weight_names(experts) if n in names]
    return {n: ".".join([module_path] + ["base_layer"] * (len(ordered) - 1 - i)) for i, n in enumerate(ordered)}


def to_peft(layer: LoRAExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A [E·r, in], lora_B [out, r·E]) as PEFT stores them: A expert-major (row e·r + j),
    B rank-major (column j·E + e)."""
    E, r, i = layer.lora_A.shape
    return layer.lora_A.reshape(E * r, i), layer.lora_B.permute(1, 2, 0).reshape(layer.lora_B.shape[1], r * E)


def from_peft(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A [E·r, in], lora_B [out, r·E]) -> ours (A [E, r, in], B [E, out, r])."""
    r = a.shape[0] // num_experts
    return a.reshape(num_experts, r, -1), b.reshape(b.shape[0], r, num_experts).permute(2, 0, 1)
