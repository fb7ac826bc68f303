"""Predict the memory of one training step by running it on fake tensors: any model, no weights.

    from memprofile.trace import trace_step, trace_layers
    m = trace_step(build, make_batch, loss_fn=..., optimizer=...)   # StepMemory, predicted
    m = trace_layers(build, make_batch, layers=80, period=1)         # 2 and 3 blocks, extrapolated

`build()` returns the model exactly as it will train (any nn.Module: 4-bit layers, adapters,
checkpointing attached), `make_batch()` the inputs; both are called under torch's
`FakeTensorMode`, so every tensor has shapes, dtypes and a storage size but no memory. The step is
then memprofile.measure's own step (forward, loss, backward, optimizer.step()), with the same
saved-tensor hook for `activations` and the same byte accounting for weights, gradients and
optimizer state; only the peak counter differs. The parts, each in its module:

* memprofile.fake: the fake-tensor context (`fake_tensors`, `new_fake_mode`, TraceError), with
  bitsandbytes' Params4bit and deep copies supported;
* memprofile.tracker: the allocation tracker (`StorageTracker`), `host_memory()` and `mark_phase()`;
* memprofile.fakeops: the replay of FakeTensorMode's answers (`FakeOps`) that makes a trace fast;
* memprofile.extrapolate: a model's numbers at any block count from traces of a few blocks.

This module steps a built model (`trace_built`, `trace_step`) and traces a deep one by its first blocks
(`trace_layers`): `2 * period` and `3 * period` blocks (period: the shortest repeating pattern of its
layer types, e.g. 2 for Gemma 2's sliding/full alternation), extrapolated to `layers`. The names above
are importable from here too.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable

import torch
from torch import nn

from memprofile.extrapolate import extrapolate, extrapolate_increments
from memprofile.fake import TraceError, fake_tensors, new_fake_mode
from memprofile.fakeops import FakeOps, fake_ops
from memprofile.measure import StepMemory, default_loss, make_optimizer, measured_step
from memprofile.tracker import StorageTracker, host_memory, mark_phase

__all__ = ["FakeOps", "StorageTracker", "TraceError", "extrapolate", "extrapolate_increments", "fake_ops",
           "fake_tensors", "host_memory", "mark_phase", "new_fake_mode", "trace_built", "trace_layers", "trace_step"]


def trace_step(build: Callable[[], nn.Module], make_batch: Callable[[], Any], *, loss_fn: Callable | None = None,
               optimizer=None, train: bool = True, host_is_device: bool = True) -> StepMemory:
    """Predicted StepMemory of one steady-state step (optimizer state already allocated, as in
    every step but the first), `loss_fn(output, batch)` and `optimizer` as in measure_step."""
    with fake_tensors():
        model = build()
        return trace_built(model, make_batch, loss_fn=loss_fn, optimizer=optimizer, train=train,
                           host_is_device=host_is_device)


@contextlib.contextmanager
def _count_rng_stash(tracker: StorageTracker):
    """Checkpointing stashes the CPU RNG state (torch.get_rng_state(): 5056 bytes of host memory)
    per checkpointed block, made in C++ where no dispatch mode sees it: counted here."""
    original = torch.get_rng_state

    def get_rng_state():
        return tracker.track(original())
    torch.get_rng_state = get_rng_state
    try:
        yield
    finally:
        torch.get_rng_state = original


def trace_built(model: nn.Module, make_batch: Callable[[], Any], *, loss_fn: Callable | None = None,
                optimizer=None, train: bool = True, host_is_device: bool = True) -> StepMemory:
    """trace_step for a model already built under `fake_tensors()` (call inside that context):
    one fake model can be stepped at several batch shapes. `host_is_device`: the run is on CPU,
    so host tensors (checkpointing's CPU RNG stash) take the same memory (False for CUDA)."""
    batch = make_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params)
    missing = [p for p in params if p not in opt.state] if opt is not None else []
    if missing:
        # their optimizer state, as a first step creates it, without the forward/backward (an
        # optimizer shared by several fake models has the others' already)
        for p in missing:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    was_training = model.training
    model.train(train)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # storages die by reference counts; the cyclic collector would only slow the trace
    tracker = StorageTracker()
    try:
        with _count_rng_stash(tracker) if host_is_device else contextlib.nullcontext():
            result = measured_step(model, batch, loss_fn or default_loss, opt, params, torch.device("cpu"),
                                   tracker=tracker)
    finally:
        model.train(was_training)
        if gc_was_enabled:
            gc.enable()
    result.step_seconds, result.step_seconds_method = None, ""
    result.device = "predicted"
    result.host = tracker.host_peak
    return result


def trace_layers(build: Callable[[int], nn.Module], make_batch: Callable[[], Any], *, layers: int, period: int = 1,
                 **kwargs) -> StepMemory:
    """trace_step of a model with `layers` repeated blocks, from `build(n)` at n = 2 * period and
    3 * period blocks (or the whole model when it has no more than that)."""
    if layers <= 3 * period:
        return trace_step(lambda: build(layers), make_batch, **kwargs)
    a = trace_step(lambda: build(2 * period), make_batch, **kwargs)
    b = trace_step(lambda: build(3 * period), make_batch, **kwargs)
    return extrapolate(a, b, 2 * period, 3 * period, layers)
