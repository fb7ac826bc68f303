"""What a 4-bit model holds: its settings, its dequantized weights, its bytes.

    quant_settings(model)   # {'quant_type': 'nf4', 'blocksize': 64, 'double_quant': True, ...} or None
    bits_per_weight(model)  # 4.127 at blocksize 64 with double quantization
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from memprofile.tensors import unpacked_numel
from qlora.arch.quantized import four_bit_params, is_4bit
from qlora.errors import QLoRAError
from qlora.quant.bnb_fixes import import_bnb
from qlora.util.dtypes import dtype_name


def _layer_of(module: nn.Module) -> nn.Module:
    base = getattr(module, "base_layer", None)  # a qlora LoRALinear around a Linear4bit
    return base if base is not None and not is_4bit(module) else module


def quant_settings(model: nn.Module) -> dict | None:
    """The 4-bit settings of ``model``, or None when it has no 4-bit layer.

    ``{"quant_type", "blocksize", "double_quant", "compute_dtype", "quantized_from_dtype"}``
    with dtypes as strings ('bfloat16'). Raises QLoRAError if the layers disagree (one dict
    could not describe them). The adapter saver stores this under "qlora" in adapter_config.json.
    """
    found: dict[tuple, list[str]] = {}
    for name, module in model.named_modules():
        if is_4bit(module) and module.weight.quant_state is None:
            raise QLoRAError(f"4-bit layer {name!r} was never quantized (its quant_state is None)")
    for path, module, pname, p in four_bit_params(model):     # Linear4bit weights and 4-bit experts
        qs = p.quant_state
        compute = getattr(module, "compute_dtype", None)
        source = getattr(module, "qlora_quantized_from", None) or dtype_name(
            getattr(qs, "original_dtype", None) or qs.dtype)
        nested = getattr(qs, "original_nested", qs.nested)
        key = (qs.quant_type, qs.blocksize, bool(nested),
               dtype_name(compute) if compute is not None else None, source)
        found.setdefault(key, []).append(path if pname == "weight" else f"{path}.{pname}")
    if not found:
        return None
    if len(found) > 1:
        raise QLoRAError("the model's 4-bit layers use different settings "
                         "(quant_type, blocksize, double_quant, compute_dtype, quantized_from): "
                         + "; ".join(f"{k}: {v[:3]}" for k, v in found.items()))
    (quant_type, blocksize, double_quant, compute, source), = found
    return {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
            "compute_dtype": compute, "quantized_from_dtype": source}


def dequantize_weight(linear4bit: nn.Module) -> torch.Tensor:
    """The float [out, in] weight a 4-bit layer holds, in the dtype it was quantized from.

    Via ``bitsandbytes.functional.dequantize_4bit``; equal bit for bit to dequantizing a fresh
    ``quantize_4bit`` of the same input. (A weight bitsandbytes has repacked for its AVX512-BF16
    CPU kernel -- layers made by qlora never are -- is unpacked first; its absmax was rounded to
    bf16 by that repack, so it is then only approximately the original.)
    """
    F = import_bnb().functional
    layer = _layer_of(linear4bit)
    if not is_4bit(layer):
        raise QLoRAError(f"dequantize_weight needs a bitsandbytes Linear4bit; got {type(linear4bit).__name__}")
    weight, qs = layer.weight, layer.weight.quant_state
    if qs is None:
        raise QLoRAError("dequantize_weight: this Linear4bit was never quantized (quant_state is None)")
    data = weight.data
    if getattr(qs, "packing_format_for_cpu", False):
        data, qs = F._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(qs))
    return F.dequantize_4bit(data, qs)  # [out, in], dtype = qs.dtype


def _quant_tensors(module: nn.Module):
    """Every tensor that stores a 4-bit weight (Linear4bit or experts matrix): packed codes and the quant state."""
    for _, _, _, p in four_bit_params(module):
        qs = p.quant_state
        yield p, [p.data, qs.absmax, qs.code, getattr(qs, "offset", None),
                  *((qs.state2.absmax, qs.state2.code) if getattr(qs, "state2", None) is not None else ())]


def quantized_bytes(module: nn.Module) -> int:
    """Bytes held by the 4-bit layers of ``module``: packed weights + quant state.

    Counts the packed uint8 codes [out*in/2], absmax (uint8 per block with double quantization,
    else fp32), the nested absmax (fp32 per 256 blocks), nested code (256 fp32), code (16 fp32)
    and offset (one fp32). Each tensor is counted once even if layers share it. Biases and
    non-4-bit modules are not counted.
    """
    seen, total = set(), 0
    for _, tensors in _quant_tensors(module):
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            key = (t.device, t.data_ptr(), t.numel() * t.element_size())
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def quantized_numel(module: nn.Module) -> int:
    """Number of weights stored in 4-bit in ``module`` (out*in of each Linear4bit, E*out*in of each experts matrix)."""
    return sum(unpacked_numel(p) for _, _, _, p in four_bit_params(module))


def bits_per_weight(module: nn.Module) -> float:
    """8 * quantized_bytes / quantized_numel: 4.127 at blocksize 64 with double quantization."""
    n = quantized_numel(module)
    if n == 0:
        raise QLoRAError(f"{type(module).__name__} has no 4-bit layer to measure")
    return 8 * quantized_bytes(module) / n
