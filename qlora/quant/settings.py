"""The 4-bit settings and their checks: quant type, block size, compute dtype, double quantization, skips.

Each check returns the normalised value or raises one QLoRAError line naming the accepted values.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from qlora.errors import QLoRAError
from qlora.util.checks import must_be_int
from qlora.util.dtypes import canonical_dtype

QUANT_TYPES = ("nf4", "fp4")
# What bitsandbytes.functional.quantize_4bit accepts (CPU and CUDA alike; 32 is CUDA/CPU only,
# not ROCm with 64-wide warps).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def check_quant_type(quant_type: Any) -> str:
    if not isinstance(quant_type, str) or quant_type.lower() not in QUANT_TYPES:
        raise QLoRAError(f"quant_type={quant_type!r} is not supported; accepted: 'nf4' (QLoRA's "
                         f"NormalFloat4, the default) or 'fp4'")
    return quant_type.lower()


def check_blocksize(blocksize: Any) -> int:
    if must_be_int(blocksize) is not None or blocksize not in BLOCKSIZES:
        raise QLoRAError(f"blocksize={blocksize!r} is not supported by bitsandbytes 4-bit "
                         f"quantization; accepted: {', '.join(map(str, BLOCKSIZES))} (64 is QLoRA's)")
    return blocksize


def check_compute_dtype(compute_dtype: Any) -> torch.dtype:
    if canonical_dtype(compute_dtype) is not None:
        return getattr(torch, canonical_dtype(compute_dtype))
    if isinstance(compute_dtype, torch.dtype) and compute_dtype in (torch.float32, torch.bfloat16, torch.float16):
        return compute_dtype
    raise QLoRAError(f"compute_dtype={compute_dtype!r} is not a float type 4-bit layers can compute in; "
                     f"accepted: torch.bfloat16 (default), torch.float16, torch.float32 "
                     f"(or the strings 'bfloat16'/'bf16', 'float16'/'fp16', 'float32'/'fp32')")


def check_double_quant(double_quant: Any) -> bool:
    if not isinstance(double_quant, bool):
        raise QLoRAError(f"double_quant={double_quant!r} must be True (quantize the block constants "
                         f"too, ~0.37 bits/weight saved) or False")
    return double_quant


def check_skip_modules(skip_modules: Any) -> list[str]:
    if skip_modules is None:
        return []
    if isinstance(skip_modules, str):
        skip_modules = [skip_modules]
    if not isinstance(skip_modules, Iterable) or not all(isinstance(s, str) and s for s in skip_modules):
        raise QLoRAError(f"skip_modules={skip_modules!r} must be a list of module names such as "
                         f"['lm_head', 'mlp.down_proj', 'layers.0'] (a name matches whole dotted "
                         f"parts of a module path)")
    return list(skip_modules)
