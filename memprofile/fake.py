"""Fake tensors for a whole model: build and step any nn.Module under FakeTensorMode, no memory used.

    with fake_tensors():            # a new FakeTensorMode (real constants allowed), subclasses supported
        model = build()             # every tensor has shapes, dtypes and a storage size, no data

* Tensor subclasses built by `torch.Tensor._make_subclass` (bitsandbytes' Params4bit) cannot wrap
  a FakeTensor; inside `fake_tensors` they get a class deriving from both, and deep copies of fakes
  are clones (a modules_to_save copy is a deepcopy).
* `real_functions` run with fake tensors off (constants a library computes with data-dependent ops,
  e.g. bitsandbytes' 8-bit code book); `replacements` answer a library's decisions taken from values.
* Ops with data-dependent output shapes (`nonzero`, `.item()`) or without a meta kernel cannot run
  on fake tensors: such a model gets TraceError, one line naming the op.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    UnsupportedOperatorException,
    unset_fake_temporarily,
)


class TraceError(ValueError):
    """A model's step could not be traced on fake tensors (the message is one line)."""


@contextlib.contextmanager
def _fake_subclasses():
    """Let `torch.Tensor._make_subclass(cls, fake)` (Params4bit.__new__ calls it) return the fake
    tensor itself with a class deriving from FakeTensor and `cls`."""
    original = torch.Tensor._make_subclass
    made: dict[type, type] = {}
    # Tensor.__deepcopy__ gives a fake tensor whose views report another storage than itself
    # (qlora's modules_to_save copy is a deepcopy): copy fakes by clone() instead
    had_deepcopy = "__deepcopy__" in FakeTensor.__dict__
    old_deepcopy = FakeTensor.__dict__.get("__deepcopy__")

    def fake_deepcopy(self, memo):
        if id(self) not in memo:
            with torch.no_grad():
                new = self.clone()
            new.requires_grad_(self.requires_grad)
            for k, v in self.__dict__.items():
                if k not in new.__dict__:  # _is_param and other user attributes, not the fake's own
                    setattr(new, k, copy.deepcopy(v, memo))
            memo[id(self)] = new
        return memo[id(self)]

    def make_subclass(cls: type[Any], data: torch.Tensor, requires_grad: bool = False, **kwargs: Any) -> Any:
        if not isinstance(data, FakeTensor) or issubclass(cls, FakeTensor):
            return original(cls, data, requires_grad, **kwargs)
        if cls not in made:  # the subclass's own deepcopy (Params4bit's keeps its quant_state)
            made[cls] = type(f"Fake{cls.__name__}", (FakeTensor, cls), {"__deepcopy__": cls.__deepcopy__})
        t = data.detach().requires_grad_(requires_grad)
        t.__class__ = made[cls]
        return t

    torch.Tensor._make_subclass = staticmethod(make_subclass)
    FakeTensor.__deepcopy__ = fake_deepcopy
    try:
        yield
    finally:
        torch.Tensor._make_subclass = original
        if had_deepcopy:
            FakeTensor.__deepcopy__ = old_deepcopy
        else:
            del FakeTensor.__deepcopy__


def new_fake_mode():
    """A FakeTensorMode for fake_tensors(mode): real constants (bitsandbytes' code books) allowed."""
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def _replaced(functions, replacements):
    """Each (module, name) in `functions` runs with fake tensors off: constants a library computes
    with data-dependent ops (bitsandbytes' 8-bit code book) are computed for real (they are tiny).
    Each (module, name, fn) in `replacements` is replaced by fn: a decision a library takes from
    tensor values, answered for the inputs the trace stands for."""
    saved = []
    for module_name, name in functions:
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def real(*args, _original=original, **kwargs):
            with unset_fake_temporarily():
                return _original(*args, **kwargs)
        saved.append((module, name, original))
        setattr(module, name, real)
    for module_name, name, fn in replacements:
        module = importlib.import_module(module_name)
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, fn)
    try:
        yield
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)


@contextlib.contextmanager
def fake_tensors(mode=None, real_functions=(), replacements=()):
    """Run under `mode` (default: a new_fake_mode()) with Tensor subclasses supported; errors
    become one-line TraceErrors. Re-enter the same mode to keep using tensors made under it.
    `real_functions` / `replacements`: see _replaced."""
    try:
        with (mode or new_fake_mode()), _fake_subclasses(), _replaced(real_functions, replacements):
            yield
    except (DataDependentOutputException, DynamicOutputShapeException) as e:
        raise TraceError(f"{e.func if hasattr(e, 'func') else e} depends on tensor values "
                         "(data-dependent shape or .item()), which a fake-tensor trace cannot know") from None
    except UnsupportedOperatorException as e:
        raise TraceError(f"operator {e.func} has no fake-tensor (meta) implementation") from None
