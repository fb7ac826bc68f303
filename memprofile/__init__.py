"""memprofile: where every byte of a training step goes, measured and predicted.

Knows nothing about how adapters are attached: it measures any `nn.Module` training step and
predicts memory from a `config.json`. The sweep over training configurations lives in
`qlora.profile` (memprofile never imports qlora).

Public API
----------
Measure (memprofile.measure):
    measure_step(model, batch, *, loss_fn=None, optimizer=None, device=None,
                 warmup_steps=1, timed_steps=1, train=True) -> StepMemory
    measure_step_or_oom(model, batch, **same) -> StepMemory      # fits=False on out of memory
    is_out_of_memory(exc) -> bool;  call_or_oom(fn, *a, **kw) -> (result, exc | None)
    StepMemory.bytes() -> {category: int}; .peak_method, .step_seconds, .trainable_params, ...
Predict (memprofile.estimate; import the function from there):
    estimate(config, configuration, batch, seq=None, rank=8, *, task=None, dtype="bf16",
             adapter_dtype=None, lora_targets="all-linear", lora_dropout=0.0, train_head=None,
             quant_blocksize=64, double_quant=True, device=None, ...) -> Estimate
    plan(config, memory_bytes, seq=None, rank=8, *, configurations=CONFIGURATIONS, **same)
        -> {configuration: {"batch", "fits", "peak", "bytes", "estimate"}}
    quantized_bytes(n, blocksize=64, double_quant=True) -> int
Report (memprofile.report):
    make_row(config, batch, seq, rank, measured=None, predicted=None) -> dict
    write_report(rows, out_dir) -> {"json", "md", "csv", "png": Path};  print_table(rows)

CATEGORIES = weights_quantized, weights_frozen, weights_trainable, gradients, optimizer,
activations, peak (bytes). CONFIGURATIONS = full, head, lora, lora-ckpt, qlora, qlora-ckpt.
"""
# `estimate` (the function) is deliberately not re-exported: it would shadow the submodule
# memprofile.estimate. Use `from memprofile.estimate import estimate`.
from memprofile.estimate import CONFIGURATIONS, Estimate, plan, quantized_bytes
from memprofile.measure import (
    StepMemory,
    call_or_oom,
    is_out_of_memory,
    measure_step,
    measure_step_or_oom,
)
from memprofile.report import make_row, markdown_table, print_table, write_report
from memprofile.tensors import CATEGORIES, param_counts, weight_bytes

__all__ = [
    "CATEGORIES", "CONFIGURATIONS", "Estimate", "StepMemory", "call_or_oom",
    "is_out_of_memory", "make_row", "markdown_table", "measure_step", "measure_step_or_oom",
    "param_counts", "plan", "print_table", "quantized_bytes", "weight_bytes", "write_report",
]
