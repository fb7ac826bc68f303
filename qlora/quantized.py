"""Is this layer quantized? The one check, without importing bitsandbytes.

    is_4bit(module)          # a bitsandbytes Linear4bit (LinearNF4 / LinearFP4 included)
    is_quantized(module)     # 4-bit or bitsandbytes' 8-bit Linear8bitLt

A model can only hold bitsandbytes layers once bitsandbytes has been imported, so when it is not in
`sys.modules` the answer is False and the ~1 s import is never paid for the question.
"""
from __future__ import annotations

import sys


def _bnb_nn():
    bnb = sys.modules.get("bitsandbytes")
    return getattr(bnb, "nn", None) if bnb is not None else None


def is_4bit(module) -> bool:
    """True for a bitsandbytes Linear4bit (its weight a packed Params4bit)."""
    nn = _bnb_nn()
    return nn is not None and isinstance(module, nn.Linear4bit)


def is_quantized(module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit layer: a Linear4bit / Linear8bitLt, or any module holding
    a packed Params4bit / Int8Params of its own (bitsandbytes' Embedding4bit, ...)."""
    nn = _bnb_nn()
    if nn is None:
        return False
    return isinstance(module, (nn.Linear4bit, nn.Linear8bitLt)) or any(
        isinstance(p, (nn.Params4bit, nn.Int8Params)) for p in module.parameters(recurse=False))
