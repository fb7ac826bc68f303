"""The optimizers qlora trains with, by name: one factory for training and the planner.

    make_optimizer("adamw8bit", params, lr=2e-4)

adamw: torch AdamW, two moments per trainable weight in its dtype. adamw8bit / paged_adamw8bit:
bitsandbytes' 8-bit AdamW (one byte per moment, block-wise scales; paged: the states in CUDA unified
memory, paged out under pressure).
"""
from __future__ import annotations

from typing import Optional

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, foreach: Optional[bool] = None):
    """A new optimizer `name` over `params`; `foreach` for torch AdamW (None: torch chooses: on CUDA)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                 **({} if foreach is None else {"foreach": foreach}))
    import bitsandbytes as bnb  # lazy: only the 8-bit optimizers need bitsandbytes (~1.8 s)
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)
