"""memprofile: where every byte of a training step goes, measured and predicted.

Knows nothing about how adapters are attached: it measures any `nn.Module` training step, and
predicts one by running the same step on fake tensors. Building the model from a `config.json` as
`qlora train` would and the sweep over training configurations live in `qlora.plan` and
`qlora.plan.sweep` (memprofile never imports qlora).

Public API
----------
Measure (memprofile.measure):
    measure_step(model, batch, *, loss_fn=None, optimizer=None, device=None,
                 warmup_steps=1, timed_steps=1, train=True) -> StepMemory
    measure_step_or_oom(model, batch, **same) -> StepMemory      # fits=False on out of memory
    is_out_of_memory(exc) -> bool;  call_or_oom(fn, *a, **kw) -> (result, exc | None)   # memprofile.oom
    StepMemory.bytes() -> {category: int}; .peak_method, .step_seconds, .trainable_params, ...
    StepMemory.at_peak -> {category: int} live at the peak's moment (sum = peak), .peak_phase, .temporary_parts
At the peak (memprofile.composition): AT_PEAK (the six categories, inputs, temporary), Composition (the bytes
    by category while a step runs), Blocks (which block a moment belongs to), describe(at_peak, where) -> one line
Predict (memprofile.trace: the same step on fake tensors, no memory):
    trace_step(build, make_batch, *, loss_fn=None, optimizer=None) -> StepMemory (predicted)
    trace_layers(build_n_blocks, make_batch, *, layers, period=1, ...) -> StepMemory (extrapolated)
    TraceError: a step that cannot be traced (one line)
Units (memprofile.units, torch-free):
    human(n) -> "24.00 GiB";  parse_size("24GiB") -> 25769803776
Report (memprofile.report):
    make_row(config, batch, seq, rank, measured=None, predicted=None) -> dict
    write_report(rows, out_dir) -> {"json", "md", "csv", "png": Path};  print_table(rows)

Inside a trace: memprofile.fakeops (replayed fake-op answers: what makes a trace fast), memprofile.tracker
(live bytes of every storage and their peak), memprofile.extrapolate (a StepMemory at any number of blocks
from the traces of a few).

CATEGORIES = weights_quantized, weights_frozen, weights_trainable, gradients, optimizer,
activations, peak (bytes).

The names above are imported from their modules on first use: importing memprofile (or its
torch-free memprofile.units) does not import torch.
"""
from __future__ import annotations

import importlib

# name -> its home; imported on first use, so that `import memprofile.units` (torch-free) stays light
_HOMES = {
    "StepMemory": "memprofile.measure", "call_or_oom": "memprofile.oom", "is_out_of_memory": "memprofile.oom",
    "measure_step": "memprofile.measure", "measure_step_or_oom": "memprofile.measure",
    "make_row": "memprofile.report", "markdown_table": "memprofile.report", "print_table": "memprofile.report",
    "write_report": "memprofile.report",
    "CATEGORIES": "memprofile.tensors", "param_counts": "memprofile.tensors", "weight_bytes": "memprofile.tensors",
    "TraceError": "memprofile.fake", "trace_layers": "memprofile.trace", "trace_step": "memprofile.trace",
    "human": "memprofile.units", "parse_size": "memprofile.units",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'memprofile' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
