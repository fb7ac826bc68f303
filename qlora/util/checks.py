"""Field validation shared by the typed configs (LoraConfig, RunSettings, TrainConfig, recipe configs).

    check_ints(cfg, ("epochs", "batch_size"))                 # integers >= 1 (a bool is not one)
    check_ints(cfg, ("max_steps",), null="off")               # None allowed too (and named in the message)
    check_numbers(cfg, ("lr",), above=0)                      # ints or floats > 0 (a bool is not one)
    check_numbers(cfg, ("warmup_ratio",), at_least=0, below=1)
    check_bools(cfg, ("resume", "fsdp"))                      # True or False
    need = must_be_int(tile)                                  # None, or what it must be: "an integer >= 1"

A bad field is a QLoRAError "NAME=VALUE: must be WHAT" (WHAT as must_be_int / must_be_number word it).
"""
from __future__ import annotations

from typing import Optional

from qlora.errors import QLoRAError


def _nullable(what: str, null: Optional[str]) -> str:
    return what if null is None else f"null{f' ({null})' if null else ''} or {what}"


def must_be_int(v, minimum: Optional[int] = 1, *, null: Optional[str] = None) -> Optional[str]:
    """None when `v` is an integer >= `minimum` (any integer when `minimum` is None; a bool is not one) or,
    with `null` (its meaning, "" for none), None; else what it must be, e.g. "an integer >= 1"."""
    if v is None and null is not None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
        return _nullable("an integer" + (f" >= {minimum}" if minimum is not None else ""), null)
    return None


def must_be_number(v, *, above=None, at_least=None, below=None, null: Optional[str] = None) -> Optional[str]:
    """None when `v` is an int or float (not a bool) with `v > above`, `v >= at_least` and `v < below` (the
    bounds given) or, with `null`, None; else what it must be, e.g. "a number > 0", "a number in [0, 1)"."""
    if v is None and null is not None:
        return None
    ok = not isinstance(v, bool) and isinstance(v, (int, float))
    ok = ok and (above is None or v > above) and (at_least is None or v >= at_least) and (below is None or v < below)
    if ok:
        return None
    if above is not None and below is not None:
        what = f"a number in ({above:g}, {below:g})"
    elif at_least is not None and below is not None:
        what = f"a number in [{at_least:g}, {below:g})"
    elif above is not None:
        what = f"a number > {above:g}"
    elif at_least is not None:
        what = f"a number >= {at_least:g}"
    else:
        what = "a number" + (f" < {below:g}" if below is not None else "")
    return _nullable(what, null)


def _raise_for(obj, names, rule, hint: str = "") -> None:
    for name in names:
        v = getattr(obj, name)
        what = rule(v)
        if what is not None:
            raise QLoRAError(f"{name}={v!r}: must be {what}{f' ({hint})' if hint else ''}")


def check_ints(obj, names, minimum: Optional[int] = 1, *, null: Optional[str] = None) -> None:
    """Each field `names` of the dataclass `obj` is an integer >= `minimum` (any integer when None; a bool is
    not one); with `null` (its meaning, "" for none), None is allowed too. A bad one is a QLoRAError naming it."""
    _raise_for(obj, names, lambda v: must_be_int(v, minimum, null=null))


def check_numbers(obj, names, *, above=None, at_least=None, below=None, null: Optional[str] = None,
                  hint: str = "") -> None:
    """Each field `names` of `obj` is a number (int or float, not a bool) within the bounds given (see
    must_be_number); with `null`, None is allowed too. `hint` ends the message in parentheses ("typical: ...")."""
    _raise_for(obj, names, lambda v: must_be_number(v, above=above, at_least=at_least, below=below, null=null), hint)


def check_bools(obj, names) -> None:
    """Each field `names` of `obj` is True or False (not 0, 1 or "yes"): "NAME=VALUE: must be true or false"."""
    _raise_for(obj, names, lambda v: None if isinstance(v, bool) else "true or false")
