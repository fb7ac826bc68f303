"""The float dtypes qlora trains in, by name: one alias table for the library and the CLI.

    parse_dtype("bf16") -> torch.bfloat16;  dtype_name(torch.bfloat16) -> "bfloat16"
    canonical_dtype("fp16") -> "float16"    # torch-free: the CLI checks names before importing torch
    resolve_dtype("auto") -> torch.bfloat16 on CUDA, torch.float32 on CPU   # the one "auto" compute dtype
"""
from __future__ import annotations

from qlora.errors import QLoRAError

DTYPE_NAMES = ("bfloat16", "float16", "float32")
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def canonical_dtype(text) -> str | None:
    """'bf16', 'torch.float16', 'FP32', ... -> the full name; None when it is not one of ours."""
    if not isinstance(text, str):
        return None
    name = text.lower().removeprefix("torch.")
    name = ALIASES.get(name, name)
    return name if name in DTYPE_NAMES else None


def parse_dtype(dtype):
    """`None`, a float `torch.dtype`, or one of the names above -> a float torch.dtype."""
    import torch  # lazy: qlora --help imports no torch (qlora.cli.args imports this module)
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    name = canonical_dtype(dtype)
    if name is not None:
        return getattr(torch, name)
    raise QLoRAError(f"dtype {dtype!r} is not a float dtype; use one of float32, bfloat16, float16")


def resolve_dtype(dtype, device=None):
    """The compute dtype `dtype` stands for: "auto" is bfloat16 on CUDA and float32 elsewhere (bf16 matmuls
    are slow on most CPUs); anything else as parse_dtype reads it. `device` ("cuda", "cpu", a torch.device):
    where the run computes; None: CUDA when it is available."""
    if isinstance(dtype, str) and dtype == "auto":
        import torch  # lazy: qlora --help imports no torch (qlora.cli.args imports this module)
        on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda else torch.float32
    return parse_dtype(dtype)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
