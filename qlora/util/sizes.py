"""Memory sizes: memprofile.units' `parse_size` and `human`, for qlora (no torch import).

    parse_size("24GiB") -> 25769803776     # a bad size is a QLoRAError (the CLI prints it in one line)
    human(25769803776) -> "24.00 GiB"
"""
from __future__ import annotations

from memprofile import units
from memprofile.units import human
from qlora.errors import QLoRAError

__all__ = ["human", "parse_size"]


def parse_size(text) -> int:
    """memprofile.units.parse_size, its SizeError raised as a QLoRAError."""
    try:
        return units.parse_size(text)
    except units.SizeError as e:
        raise QLoRAError(str(e)) from None
