"""LoRA layers: a frozen base layer plus a trainable low-rank update.

    y = base_layer(x) + s · B(A(dropout(x)))        s = alpha / r   (rsLoRA: alpha / sqrt(r))

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685
rsLoRA: Kalajdzievski 2023, https://arxiv.org/abs/2312.03732

Each class wraps the original module unchanged as `base_layer` (a plain `nn.Linear`, transformers'
`Conv1D`, a bitsandbytes `Linear4bit`, `nn.Embedding` or `nn.Conv2d`), so removing the adapter gives the
original model back. Memory: the adapter adds r·(in+out) parameters per Linear; during training
it also keeps A's output [..., r] for backward, which is small next to the layer input.

Attach them with `qlora.add_lora`; this file only defines the layers.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from qlora.arch.quantized import is_4bit, is_conv1d, is_transposed, linear_features
from qlora.errors import QLoRAError


class LoRALayer(nn.Module):
    """What every LoRA layer shares: the scale, the merged/disabled flags, merge and unmerge."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, use_rslora: bool):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self.disabled = False

    def __getattr__(self, name):
        # Code that reads `layer.weight`, `layer.in_features`, ... keeps working on the wrapper.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in fp32, shaped like the base weight as its checkpoint stores it."""
        raise NotImplementedError

    def merge(self) -> None:
        """W <- W + s·B·A (in fp32, then cast back). Idempotent."""
        if self.merged:
            return
        self._add_to_base(self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - s·B·A. Idempotent."""
        if not self.merged:
            return
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def check_merge(self) -> None:
        """Raise QLoRAError if `merge()` would fail (4-bit base, non-finite result); changes nothing."""
        if not self.merged:
            self._new_weight(self.delta_weight())

    def _add_to_base(self, delta: torch.Tensor) -> None:
        self.base_layer.weight.data.copy_(self._new_weight(delta))

    def _new_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """W + delta in fp32, cast to W's dtype; refused when not finite (also after the cast to fp16)."""
        if is_4bit(self.base_layer):
            raise QLoRAError(
                "cannot merge a LoRA adapter into a 4-bit base in place: re-quantizing the sum changes the "
                "outputs. Export a merged bf16/fp16 model instead: qlora.export_merged(model, out_folder) or "
                "`qlora export --base ... --adapter ... --out ...`")
        weight = self.base_layer.weight
        new = (weight.data.float() + delta.to(weight.device)).to(weight.dtype)
        if not torch.isfinite(new).all():
            raise QLoRAError(f"merging the adapter into {type(self.base_layer).__name__} gives non-finite "
                             "weights (the adapter has inf/NaN or huge values); nothing was changed")
        return new

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


def dropout_layer(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LoRALinear(LoRALayer):
    """y = base_layer(x) + s · B(A(dropout(x))) with A: r × in, B: out × r.

    Works on `nn.Linear`, on transformers' `Conv1D` (weight [in, out]: A and B are the same, PEFT's
    fan_in_fan_out layout, and merging adds (s·B·A)ᵀ) and on a bitsandbytes `Linear4bit` (QLoRA,
    Dettmers et al. 2023, https://arxiv.org/abs/2305.14314), whose packed weight is never touched. Trainable
    parameters: r·(in + out). Paper: Hu et al. 2021; rsLoRA scaling alpha/sqrt(r): Kalajdzievski 2023.
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, *, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, dtype: torch.dtype | None = None):
        super().__init__(base_layer, r, lora_alpha, use_rslora)
        dtype = dtype or adapter_dtype(base_layer)
        device = base_layer.weight.device
        in_features, out_features = linear_features(base_layer)
        self.lora_dropout = dropout_layer(lora_dropout)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        init_pair(self.lora_A.weight, self.lora_B.weight, init_lora_weights, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)                       # [..., out]
        if self.merged or self.disabled:
            return y
        x = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(x))         # [..., in] -> [..., r] -> [..., out]
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        # [out, r] @ [r, in] -> [out, in]; a Conv1D (or a 4-bit layer made from one) stores [in, out]
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.T if is_transposed(self.base_layer) else delta


class LoRAEmbedding(LoRALayer):
    """y = base_layer(ids) + s · B(A[:, ids]) with A: r × num_embeddings, B: embedding_dim × r.

    A is looked up by the token ids like an embedding table (so only the rows of tokens in the
    batch get gradients); dropout on integer ids has no meaning and is not applied.
    Trainable parameters: r·(num_embeddings + embedding_dim). Paper: Hu et al. 2021.
    """

    def __init__(self, base_layer: nn.Embedding, r: int, lora_alpha: float, *, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, dtype: torch.dtype | None = None):
        super().__init__(base_layer, r, lora_alpha, use_rslora)
        dtype = dtype or adapter_dtype(base_layer)
        device = base_layer.weight.device
        n, d = base_layer.num_embeddings, base_layer.embedding_dim
        # Parameters (not Linear modules) so the keys are PEFT's `lora_embedding_A` / `_B`.
        self.lora_embedding_A = nn.Parameter(torch.empty(r, n, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(d, r, device=device, dtype=dtype))
        # A = 0, B ~ N(0, 1) (as in Hu et al.'s loralib and PEFT), the reverse of LoRALinear: A is
        # per token, so a token never seen in training keeps a zero update. With B = 0 and a random A
        # instead, B's updates (shared by all tokens) move every token, unseen ones included, by
        # s·B·A[:, t], random in direction: on MiniLM that noise cost LoRA points of test accuracy.
        with torch.no_grad():
            nn.init.normal_(self.lora_embedding_B)
            if init_lora_weights is False:
                nn.init.normal_(self.lora_embedding_A)
            else:
                nn.init.zeros_(self.lora_embedding_A)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)                     # [..., d]
        if self.merged or self.disabled:
            return y
        base = self.base_layer
        a = F.embedding(ids, self.lora_embedding_A.T, base.padding_idx, base.max_norm,
                        base.norm_type, base.scale_grad_by_freq, base.sparse)   # [..., r]
        return y + ((a @ self.lora_embedding_B.T) * self.scaling).to(y.dtype)   # [..., d]

    def delta_weight(self) -> torch.Tensor:
        # ([d, r] @ [r, n]).T -> [n, d], the layout of the embedding table
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling


class LoRAConv2d(LoRALayer):
    """y = base_layer(x) + s · B(A(dropout(x))) for images.

    A is a conv from `in` to `r` channels with the base's kernel, stride, padding and dilation;
    B is a 1×1 conv from `r` to `out`. Trainable parameters: r·(in·kh·kw + out). Paper: Hu et al. 2021.
    """

    def __init__(self, base_layer: nn.Conv2d, r: int, lora_alpha: float, *, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, dtype: torch.dtype | None = None):
        super().__init__(base_layer, r, lora_alpha, use_rslora)
        if base_layer.groups != 1:
            raise QLoRAError(f"LoRA on a grouped Conv2d (groups={base_layer.groups}) is not supported; "
                             "exclude it with exclude_modules")
        dtype = dtype or adapter_dtype(base_layer)
        device = base_layer.weight.device
        b = base_layer
        self.lora_dropout = dropout_layer(lora_dropout)
        self.lora_A = nn.Conv2d(b.in_channels, r, b.kernel_size, b.stride, b.padding, b.dilation,
                                bias=False, padding_mode=b.padding_mode, device=device, dtype=dtype)
        self.lora_B = nn.Conv2d(r, b.out_channels, 1, 1, bias=False, device=device, dtype=dtype)
        init_pair(self.lora_A.weight, self.lora_B.weight, init_lora_weights, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)                       # [b, out, h', w']
        if self.merged or self.disabled:
            return y
        x = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(x))         # [b, in, h, w] -> [b, r, h', w'] -> [b, out, h', w']
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        a = self.lora_A.weight.float()               # [r, in, kh, kw]
        b = self.lora_B.weight.float().flatten(1)    # [out, r]
        return (b @ a.flatten(1)).view(b.shape[0], *a.shape[1:]) * self.scaling


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """Default adapter dtype: the base's float dtype; on a 4-bit base (packed uint8) its compute dtype,
    bf16 by default. (With fp32 compute, as on CPUs without fast bf16, bf16 adapters would make the
    adapter matmuls ~7x slower for no memory worth having.)"""
    if is_4bit(base_layer):
        compute = getattr(base_layer, "compute_dtype", None)
        return compute if isinstance(compute, torch.dtype) and compute.is_floating_point else torch.bfloat16
    return base_layer.weight.dtype


def init_pair(a: torch.Tensor, b: torch.Tensor, init, r: int) -> None:
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))   # nn.Linear's own default init
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)                              # fresh adapter: output unchanged


class ModulesToSave(nn.Module):
    """A module trained in full (e.g. a new classification head) beside its frozen original.

    `modules_to_save` is the trainable copy used in forward; `original_module` is kept so the
    adapter can be removed. Memory: one extra copy of the module's weights.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        self.use_original = False  # set by qlora.disable_adapters
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.modules_to_save.parameters():
            p.requires_grad_(True)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("modules_to_save", "original_module"):
                raise
            return getattr(self.modules_to_save, name)

    def forward(self, *args, **kwargs):
        module = self.original_module if self.use_original else self.modules_to_save
        return module(*args, **kwargs)


LORA_CLASSES = {nn.Linear: LoRALinear, nn.Embedding: LoRAEmbedding, nn.Conv2d: LoRAConv2d}


def lora_class_for(module: nn.Module):
    """The LoRA class for a module, or None when LoRA doesn't support its type."""
    if is_4bit(module) or is_conv1d(module):
        return LoRALinear
    for base_type, cls in LORA_CLASSES.items():
        if type(module) is base_type:
            return cls
    # subclasses of the supported types (e.g. transformers' own Linear subclasses)
    for base_type, cls in LORA_CLASSES.items():
        if isinstance(module, base_type):
            return cls
    return None
