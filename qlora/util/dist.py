"""Which process this is, under torchrun / accelerate launch: the one rank rule (torch-free).

    rank()              # torch.distributed's rank once its process group is up, else the launcher's RANK (0 alone)
    is_main_process()   # rank() == 0: the process that writes a run's files

Before the process group exists (loading the model, a recipe's first files) the launcher's RANK is the
answer; accelerate's state is not asked (creating it before train()'s Accelerator(cpu=...) would fix the
run as a single process). torch.distributed is looked at only if something imported it already.
"""
from __future__ import annotations

import os
import sys


def rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0
