"""Memory sizes as people write them: '24GiB', '2GB', '512MB', '1e9' -> bytes (no torch import)."""
from __future__ import annotations

from qlora.errors import QLoRAError


def parse_size(text: str) -> int:
    """'24GiB', '2GB', '512MB', '1e9' -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    t = str(text).strip().upper().replace(" ", "")
    for unit, factor in units.items():
        if t.endswith(unit):
            number = t[: -len(unit)]
            break
    else:
        number, factor = t, 1
    try:
        size = int(float(number) * factor)
    except (ValueError, OverflowError):
        raise QLoRAError(f"size {text!r} is not understood; write e.g. 24GiB, 2GB, 512MB") from None
    if size < 1:
        raise QLoRAError(f"size {text!r} must be positive; write e.g. 24GiB, 2GB, 512MB")
    return size
