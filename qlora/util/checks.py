"""Field validation shared by the typed configs (LoraConfig, RunSettings, TrainConfig, recipe configs)."""
from __future__ import annotations

from typing import Optional

from qlora.errors import QLoRAError


def check_ints(obj, names, minimum: int = 1, *, null: Optional[str] = None) -> None:
    """Each field `names` of the dataclass `obj` is an integer >= `minimum` (a bool is not); with
    `null` (its meaning, "" for none), None is allowed too. A bad one is a QLoRAError naming it."""
    for name in names:
        v = getattr(obj, name)
        if v is None and null is not None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            what = f"an integer >= {minimum}"
            if null is not None:
                what = f"null{f' ({null})' if null else ''} or {what}"
            raise QLoRAError(f"{name}={v!r}: must be {what}")
