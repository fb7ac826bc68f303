"""Byte counts as people read and write them, both ways: `human(n)` formats, `parse_size(text)` parses.

    human(25769803776)        # '24.00 GiB'   (binary units; digits after the point: `digits`)
    parse_size("24GiB")       # 25769803776   ('2GB', '512MB', '1e9', '64 KiB' too)

The one home of both for memprofile, qlora (`qlora.util.sizes` re-exports them, raising QLoRAError) and
the recipes. Torch-free: the CLI parses `--memory` before it imports torch.
"""
from __future__ import annotations

UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
         "TB": 10**12, "B": 1}
"""Suffixes parse_size accepts (case-insensitive): binary KiB..TiB, decimal KB..TB, B."""


class SizeError(ValueError):
    """A size parse_size does not understand (the message says what to write instead)."""


def human(n, digits: int = 2) -> str:
    """Bytes in binary units: 512 B, 1.50 KiB, 24.00 GiB (`digits` after the point); None -> "-"."""
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"


def parse_size(text) -> int:
    """'24GiB', '2GB', '512MB', '1e9' -> bytes (a positive integer); anything else is a SizeError."""
    t = str(text).strip().upper().replace(" ", "")
    for unit, factor in UNITS.items():
        if t.endswith(unit):
            number = t[: -len(unit)]
            break
    else:
        number, factor = t, 1
    try:
        size = int(float(number) * factor)
    except (ValueError, OverflowError):
        raise SizeError(f"size {text!r} is not understood; write e.g. 24GiB, 2GB, 512MB") from None
    if size < 1:
        raise SizeError(f"size {text!r} must be positive; write e.g. 24GiB, 2GB, 512MB")
    return size
