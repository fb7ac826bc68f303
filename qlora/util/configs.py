"""Typed configs from a YAML file and `key=value` overrides from the command line (the recipes' configs).

    cfg = load_config("recipes/configs/seq_cls.yaml", ["lora.r=16", "train.epochs=1"], SeqClsConfig)

Overrides are parsed as YAML values (`train.lr=3e-4` is a float, `lora.target_modules=[q_proj,v_proj]` a
list), except that a string-typed field takes the text exactly as typed (`prompt=Q: {text} A:`; for an
Optional[str] field `null` still means None). Every key is checked against the dataclass: an unknown
key, a value YAML cannot read, or a mapping given to a scalar field names the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import yaml

from qlora.errors import QLoRAError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 3e-4 / 1e3 as floats (YAML 1.1 wants a dot: 3.0e-4)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def field_hint(cls, parts: list[str]):
    """The type annotation of the dotted field `parts` in dataclass `cls` (None when unknown)."""
    hint = cls
    for part in parts:
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return hint


def _is_str_field(hint) -> tuple[bool, bool]:
    """(a string field, None allowed): str or Optional[str]."""
    if hint is str:
        return True, False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and set(args) == {str, type(None)}:
        return True, True
    return False, False


def parse_override(assignment: str, cls=None) -> tuple[list[str], object]:
    """'key.sub=value' -> (['key', 'sub'], value), the value typed for the field of `cls` it sets."""
    if "=" not in assignment:
        raise QLoRAError(f"override {assignment!r} is not key=value (e.g. lora.r=16 train.epochs=1)")
    key, _, raw = assignment.partition("=")
    parts = key.strip().split(".")
    hint = field_hint(cls, parts) if cls is not None else None
    is_str, nullable = _is_str_field(hint)
    if is_str:                          # the text as typed: prompt=Q: {text} A: needs no quoting
        if nullable and raw.strip() in ("", "null", "~", "None"):
            return parts, None
        return parts, raw
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise QLoRAError(f"override {key}={raw!r}: YAML cannot read the value ({problem}); quote it, "
                         f"e.g. {key}='\"{raw}\"'") from None
    scalar = hint is not None and hint is not typing.Any and not dataclasses.is_dataclass(hint) and not (
        hint is dict or typing.get_origin(hint) is dict or _allows_dict(hint))
    if isinstance(value, dict) and scalar:
        raise QLoRAError(f"override {key}={raw!r}: YAML reads this as a mapping {value!r}, but {key} takes a single "
                         f"value; quote it if you meant the text, e.g. {key}='\"{raw}\"'")
    return parts, value


def _allows_dict(hint) -> bool:
    return any(a is dict or typing.get_origin(a) is dict for a in typing.get_args(hint))


def apply_override(tree: dict, assignment: str, cls=None) -> None:
    parts, value = parse_override(assignment, cls)
    key = ".".join(parts)
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise QLoRAError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from `data`, recursing into dataclass-typed fields; unknown keys fail."""
    if not isinstance(data, dict):
        raise QLoRAError(f"{where or 'config'} must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise QLoRAError(f"unknown config key {where + unknown[0]!r}; allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}{name}.")
        elif dataclasses.is_dataclass(hint) and not isinstance(value, hint):
            keys = ", ".join(f.name for f in dataclasses.fields(hint))
            raise QLoRAError(f"{where}{name} must be a section with keys {keys}; got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except QLoRAError as e:
        raise QLoRAError(f"{where.rstrip('.') or 'config'}: {e}") from None
    except TypeError as e:
        raise QLoRAError(f"{where.rstrip('.') or 'config'}: {e}") from None


def load_config(path, overrides: list[str], cls):
    """Dataclass `cls` from the YAML file `path` (its `recipe:` key ignored) with `overrides` applied."""
    path = Path(path)
    if not path.is_file():
        raise QLoRAError(f"config file {str(path)!r} not found (see recipes/configs/)")
    try:
        tree = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise QLoRAError(f"{path} is not valid YAML: {e}") from None
    for assignment in overrides:
        apply_override(tree, assignment, cls)
    tree.pop("recipe", None)
    return from_dict(cls, tree)
