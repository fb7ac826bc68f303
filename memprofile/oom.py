"""Out of memory, recognised: the one rule for memprofile's sweeps and qlora's CLI (exit 2 with a hint).

    is_out_of_memory(exc)                 # torch.OutOfMemoryError, MemoryError, or a RuntimeError saying so
    result, exc = call_or_oom(fn, *args)  # (fn(...), None), or (None, exc) when it ran out of memory

Torch-free: torch's OutOfMemoryError is looked up only if torch is already imported (an exception of
that type cannot exist otherwise), so the CLI can ask about any error without paying for torch.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")
"""What a RuntimeError's message says when an allocator ran out (CUDA, CPU's DefaultCPUAllocator, MPS/XPU)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch.OutOfMemoryError, MemoryError, or a RuntimeError saying 'out of memory'."""
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(m in msg for m in OOM_MESSAGES)
    return False


def call_or_oom(fn: Callable, *args, **kwargs) -> tuple[Any, BaseException | None]:
    """(fn(...), None), or (None, exc) if it ran out of memory; other errors propagate."""
    try:
        return fn(*args, **kwargs), None
    except BaseException as exc:  # noqa: BLE001 - filtered right below
        if not is_out_of_memory(exc):
            raise
        return None, exc
