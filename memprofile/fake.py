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
* Values that are known: `constant(t)` makes a fake whose values are t's (FakeTensorMode's constants: an op whose
  inputs are all constants runs for real, so its output shape and values are known); `constants_up_to(n)` lets
  such outputs of up to n elements stay constants (torch's default: 1), for small integer inputs whose values
  decide shapes (an image's patch grid); `on_constants(fn)` runs fn for real when every tensor it is given is a
  constant (a function that builds its result from Python lists of values, e.g. M-RoPE position ids, or from
  factories, e.g. one_hot or a window index made with arange), its outputs counted as allocations of the traced step;
  `outside_trace()` runs ops for real inside a trace (values to make constants of).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
from typing import Any

import torch
import torch._subclasses.fake_tensor as _fake_module
import torch.utils._pytree as pytree
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


def outside_trace():
    """A context in which ops run for real: neither the fake mode nor a tracker sees them."""
    from torch.utils._python_dispatch import _disable_current_modes  # lazy: private to torch
    return _disable_current_modes()


def _active_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack  # lazy: private to torch
    modes = [m for m in _get_current_dispatch_mode_stack() if isinstance(m, FakeTensorMode)]
    return modes[-1] if modes else None


def constant(t: torch.Tensor) -> torch.Tensor:
    """A fake tensor of the running fake mode whose values are `t`'s (a copy; `t` itself outside a fake mode)."""
    mode = _active_mode()
    if mode is None:
        return t
    with outside_trace():
        real = t.constant.clone() if isinstance(t, FakeTensor) and t.constant is not None else t.clone()
    return mode.fake_tensor_converter.from_real_tensor(mode, real, make_constant=True)


@contextlib.contextmanager
def constants_up_to(numel: int):
    """Outputs of ops on constants stay constants up to `numel` elements (torch's CONSTANT_NUMEL_LIMIT). (FakeTensorMode
    computes an op whose inputs are all constants for real whatever its size, and keeps the result only up to the
    limit: factories are left fake, or an `arange` of positions would make a [seq, seq] mask real.)"""
    before = _fake_module.CONSTANT_NUMEL_LIMIT
    _fake_module.CONSTANT_NUMEL_LIMIT = max(before, numel)
    try:
        yield
    finally:
        _fake_module.CONSTANT_NUMEL_LIMIT = before


def on_constants(fn):
    """fn, run for real when every fake tensor among its arguments is a constant (their values are known), its
    tensors returned as constants; otherwise fn as it is."""
    def run(*args, **kwargs):
        mode = _active_mode()
        fakes = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, FakeTensor)]
        if mode is None or any(x.constant is None for x in fakes):
            return fn(*args, **kwargs)
        real_args, real_kwargs = pytree.tree_map_only(FakeTensor, lambda x: x.constant, (args, kwargs))
        with outside_trace():                         # neither the fake mode nor a tracker sees the real ops
            out = fn(*real_args, **real_kwargs)
        return pytree.tree_map_only(torch.Tensor, _made_constant, out)
    run.__wrapped__ = fn
    return run


def _made_constant(t: torch.Tensor) -> torch.Tensor:
    """A fake of the running mode holding `t`'s values, made through the dispatcher, so that a tracker counts it as
    the real run's allocation of that output (a [batch, patches, tokens] one-hot is megabytes)."""
    fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    fake.constant = t
    return fake
