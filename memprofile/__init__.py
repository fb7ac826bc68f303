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
    is_out_of_memory(exc) -> bool;  call_or_oom(fn, *a, **kw) -> (result, exc | None)
    StepMemory.bytes() -> {category: int}; .peak_method, .step_seconds, .trainable_params, ...
Predict (memprofile.trace: the same step on fake tensors, no memory):
    trace_step(build, make_batch, *, loss_fn=None, optimizer=None) -> StepMemory (predicted)
    trace_layers(build_n_blocks, make_batch, *, layers, period=1, ...) -> StepMemory (extrapolated)
    TraceError: a step that cannot be traced (one line)
Report (memprofile.report):
    make_row(config, batch, seq, rank, measured=None, predicted=None) -> dict
    write_report(rows, out_dir) -> {"json", "md", "csv", "png": Path};  print_table(rows)

CATEGORIES = weights_quantized, weights_frozen, weights_trainable, gradients, optimizer,
activations, peak (bytes).
"""
from memprofile.measure import (
    StepMemory,
    call_or_oom,
    is_out_of_memory,
    measure_step,
    measure_step_or_oom,
)
from memprofile.report import make_row, markdown_table, print_table, write_report
from memprofile.tensors import CATEGORIES, param_counts, weight_bytes
from memprofile.trace import TraceError, trace_layers, trace_step

__all__ = [
    "CATEGORIES", "StepMemory", "TraceError", "call_or_oom", "is_out_of_memory", "make_row",
    "markdown_table", "measure_step", "measure_step_or_oom", "param_counts", "print_table",
    "trace_layers", "trace_step", "weight_bytes", "write_report",
]
