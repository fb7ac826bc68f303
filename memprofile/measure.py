"""Measure where the memory of one training step goes, for any `nn.Module`.

    from memprofile.measure import measure_step, measure_step_or_oom
    m = measure_step(model, batch)                 # batch: dict of tensors (HF style) or tensor/tuple
    m.bytes()    # {"weights_quantized", "weights_frozen", "weights_trainable", "gradients",
                 #  "optimizer", "activations", "peak"} -> int bytes
    m.peak_method, m.step_seconds, m.trainable_params, m.total_params

    r = measure_step_or_oom(model, batch)          # same, but out-of-memory gives r.fits == False

A step is: forward, loss, backward, optimizer.step(), optimizer.zero_grad(set_to_none=True).
`warmup_steps` (default 1) such steps run first, unmeasured, so the measured step is a steady-state
one: the optimizer state already exists when the forward starts, as in every step but the first.
The measured step records:

* weights_quantized / weights_frozen / weights_trainable: storages of parameters, buffers and
  bitsandbytes quant states (see memprofile.tensors), each storage once.
* activations: what autograd keeps for backward once the loss is computed. A
  `saved_tensors_hooks` pack hook sees every tensor an op saves; we count each storage once and
  skip storages that belong to parameters, buffers, quant states or the batch (those exist anyway).
  Under non-reentrant checkpointing the hook sees what the checkpoint keeps (the block inputs).
  Model outputs other than the loss (e.g. bf16 logits) are dropped before backward, as a tight
  training loop does; they count in the peak, not here.
* gradients: `p.grad` storages after backward.  optimizer: `optimizer.state` tensors after step.
* peak: the most live tensor bytes at any moment of forward+backward+step, weights included.
  CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
  CPU: the bytes live before the step (model state, existing grads and optimizer state, batch)
  plus the maximum running sum of the CPU allocator's `[memory]` events recorded by the autograd
  profiler (`profile_memory=True`) during the step. `peak_method` names which.
* inputs (not a category): the batch tensors' bytes, live through the step, so in the peak.
* step_seconds: median wall time of `timed_steps` extra unprofiled steps (default 1); with
  `timed_steps=0`, the measured (profiled) step's own time. `step_seconds_method` says which.

`loss_fn(output, batch) -> scalar` defaults to `output.loss` (HF models given labels), else
`output[0]` / `output` reduced with `.float().mean()`. A loss_fn with the attribute
`takes_model = True` is called as `loss_fn(model, batch)` instead and runs the model itself. `optimizer` is None (AdamW over the
trainable parameters, lr 1e-5), a factory `params -> Optimizer`, or an Optimizer instance.
"""
from __future__ import annotations

import gc
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from memprofile.oom import call_or_oom, is_out_of_memory  # noqa: F401 - is_out_of_memory: part of this API
from memprofile.peak import CpuPeakTracker
from memprofile.tensors import (
    CATEGORIES,
    model_storage_keys,
    nested_tensors,
    param_counts,
    param_dtypes,
    storage_key,
    storage_nbytes,
    unique_storage_bytes,
    weight_bytes,
)
from memprofile.tracker import StorageTracker


@dataclass
class StepMemory:
    """One measured training step. Byte fields are None only when the step did not fit."""

    weights_quantized: int
    weights_frozen: int
    weights_trainable: int
    gradients: int | None
    optimizer: int | None
    activations: int | None
    peak: int | None
    inputs: int = 0  # batch tensors: live during the step, part of the peak's baseline
    peak_method: str = ""
    peak_at: str = ""  # predictions only: the phase and op at the peak
    phase_peaks: dict = field(default_factory=dict)  # predictions only: peak bytes within each phase
    at_peak: dict = field(default_factory=dict)  # bytes by category live at the peak's moment (sum = peak)
    peak_phase: str = ""  # when the peak happened: "backward of block 3 (model.layers.3): mm"
    temporary_parts: dict = field(default_factory=dict)  # at_peak["temporary"] by what made it
    phase_at_peak: dict = field(default_factory=dict)  # predictions only: phase -> at-peak bytes by category
    host: int | None = None  # predictions only: the most bytes in host memory at once (offloaded tensors)
    step_seconds: float | None = None
    step_seconds_method: str = ""
    trainable_params: int = 0
    total_params: int = 0
    dtypes: dict = field(default_factory=dict)  # parameter count per dtype ("nf4" for 4-bit)
    device: str = "cpu"
    loss: float | None = None
    fits: bool = True
    error: str | None = None

    def bytes(self) -> dict[str, int | None]:
        """The seven categories (memprofile.tensors.CATEGORIES) -> bytes."""
        return {k: getattr(self, k) for k in CATEGORIES}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- out of memory
def free_memory(device: torch.device | str | None = None) -> None:
    """Collect garbage and return cached CUDA blocks, e.g. after an out-of-memory step."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- helpers
def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def call_model(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def default_loss(output, batch) -> torch.Tensor:
    """`output.loss` if the model computed one, else the mean of its first output."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is not None:
        return loss
    if isinstance(output, (tuple, list)):
        output = output[0]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "to_tuple"):
        output = output.to_tuple()[0]
    return output.float().mean()


def make_optimizer(optimizer, params):
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if not params:
        return None
    if optimizer is None:
        return torch.optim.AdamW(params, lr=1e-5)
    return optimizer(params)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer_state_tensors(opt, params):
    """The state tensors the optimizer keeps for `params` (the step's trainable parameters: an
    optimizer may also hold parameters this model does not use, which get no gradient)."""
    if opt is None:
        return []
    return [v for p in params for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]


def _grads(params):
    return [p.grad for p in params if p.grad is not None]


class _SavedTensorCounter:
    """pack hook: remember each saved tensor's storage (weakly) unless it is excluded; tell the accountant
    (a StorageTracker with a Composition) that the storage is an activation now."""

    def __init__(self, exclude: set, accountant=None):
        self.exclude = exclude
        self.accountant = accountant
        self.saved: dict = {}  # storage key -> (nbytes, weakref to a tensor on it)

    def pack(self, t: torch.Tensor):
        k = storage_key(t)
        if self.accountant is not None:
            self.accountant.retag(t, "activations")
        if k not in self.exclude:
            entry = self.saved.get(k)
            if entry is None or not any(r() is not None for r in entry[1]):
                # a new storage; or one at the address (or StorageImpl) of a saved storage that has died since:
                # a new storage too, maybe of another size (keeping the dead one's size made the count depend on
                # where the allocator put things)
                entry = self.saved[k] = [storage_nbytes(t), []]
            entry[1].append(weakref.ref(t))
        return t

    @staticmethod
    def unpack(t):
        return t

    def live_bytes(self) -> int:
        # A storage counts if some tensor saved on it is still held (by the autograd graph).
        return sum(n for n, refs in self.saved.values() if any(r() is not None for r in refs))


def _is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


def _phase(tracker, name: str) -> None:
    if tracker is not None and hasattr(tracker, "phase"):
        tracker.phase = name


# ---------------------------------------------------------------------------- the step
def _train_step(model, batch, loss_fn, opt, params) -> float:
    loss = _forward_loss(model, batch, loss_fn)
    value = None if _is_fake(loss) else float(loss.detach())
    if loss.requires_grad:
        loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return value


def measure_step(
    model: nn.Module,
    batch,
    *,
    loss_fn: Callable | None = None,
    optimizer=None,
    device: torch.device | str | None = None,
    warmup_steps: int = 1,
    timed_steps: int = 1,
    train: bool = True,
) -> StepMemory:
    """Run `warmup_steps` + 1 measured + `timed_steps` training steps; return the measured one.

    The model is used where it is (not moved); `device` (default: the model's) is where the
    batch goes and whose peak is read. `train` puts the model in train mode for the steps
    (dropout on; bitsandbytes keeps its training kernels) and restores the old mode after.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    loss_fn = loss_fn or default_loss
    batch = _to_device(batch, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params)
    was_training = model.training
    model.train(train)
    try:
        for _ in range(warmup_steps):
            _train_step(model, batch, loss_fn, opt, params)
        result = measured_step(model, batch, loss_fn, opt, params, device)
        times = []
        for _ in range(timed_steps):
            _sync(device)
            t0 = time.perf_counter()
            _train_step(model, batch, loss_fn, opt, params)
            _sync(device)
            times.append(time.perf_counter() - t0)
        if times:
            result.step_seconds = statistics.median(times)
            result.step_seconds_method = f"median of {len(times)} unprofiled step(s)"
        return result
    finally:
        model.train(was_training)


def _forward_loss(model, batch, loss_fn):
    """loss_fn(output, batch), or loss_fn(model, batch) when it is marked `takes_model` (a loss that
    runs the model itself, e.g. a chunked head + cross-entropy)."""
    if getattr(loss_fn, "takes_model", False):
        return loss_fn(model, batch)
    return loss_fn(call_model(model, batch), batch)


def measured_step(model, batch, loss_fn, opt, params, device, tracker=None) -> StepMemory:
    """One step, measured. `tracker` (start/stop/max_increase, optional `phase` and `peak_at`)
    replaces the device's own peak counter: memprofile.trace passes its storage tracker."""
    # Everything that is live before the step begins: the baseline the peak starts from.
    seen: set = set()
    weights = weight_bytes(model, seen)
    before_grads = unique_storage_bytes(_grads(params), seen)
    before_opt = unique_storage_bytes(_optimizer_state_tensors(opt, params), seen)
    inputs = unique_storage_bytes(nested_tensors(batch), seen)
    before = sum(weights.values()) + before_grads + before_opt + inputs

    # What is live at the peak's moment, by category: the fake-tensor tracker does it itself; a real step gets a
    # StorageTracker in real mode beside the device's peak counter (memprofile.composition).
    accountant = tracker if tracker is not None else StorageTracker(real=True, device=device)
    accountant.account(model, params, {**weights, "gradients": before_grads, "optimizer": before_opt, "inputs": inputs})

    exclude = model_storage_keys(model) | {storage_key(t) for t in nested_tensors(batch)}
    counter = _SavedTensorCounter(exclude, accountant)
    on_cuda = device.type == "cuda" and tracker is None
    own_accountant = tracker is None
    if tracker is not None:
        pass
    elif on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        tracker = None
    else:
        tracker = CpuPeakTracker()

    # Garbage from earlier work must not be collected (freed) in the middle of the step: that
    # would show up as frees of memory the baseline never counted. (No gc.collect() first: in
    # a process that imported transformers it takes most of a second.)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    _sync(device)
    t0 = time.perf_counter()
    if tracker is not None:
        tracker.start()
    if own_accountant:
        accountant.start()
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            loss = _forward_loss(model, batch, loss_fn)  # the outputs besides the loss die here
        activations = counter.live_bytes()
        loss_value = None if _is_fake(loss) else float(loss.detach())
        _phase(accountant, "backward")
        if loss.requires_grad:
            loss.backward()
        del loss
        gradients = unique_storage_bytes(_grads(params))
        _phase(accountant, "optimizer step")
        if opt is not None:
            opt.step()
        _sync(device)
    finally:
        if own_accountant:
            accountant.stop()
        if tracker is not None:
            tracker.stop()
        accountant.release()
        if gc_was_enabled:
            gc.enable()
    seconds = time.perf_counter() - t0
    opt_bytes = unique_storage_bytes(_optimizer_state_tensors(opt, params))

    if on_cuda:
        peak, method = int(torch.cuda.max_memory_allocated(device)), "cuda.max_memory_allocated"
    else:
        peak, method = before + tracker.max_increase(), tracker.method
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    # a real step: what the allocator had live that no op's output accounts for is named (the trace is its own peak)
    at_peak, parts, where = accountant.composition.at_peak(peak if own_accountant else None,
                                                           "kernel scratch and allocator rounding")

    return StepMemory(
        **weights,
        gradients=gradients,
        optimizer=opt_bytes,
        activations=activations,
        peak=peak,
        inputs=inputs,
        peak_method=method,
        peak_at=getattr(tracker, "peak_at", ""),
        phase_peaks={k: before + v for k, v in getattr(tracker, "phase_peaks", {}).items()},
        at_peak=at_peak,
        peak_phase=where,
        temporary_parts=parts,
        phase_at_peak={} if own_accountant else accountant.composition.by_phase(),
        step_seconds=seconds,
        step_seconds_method="the measured step itself (profiled, hooks on)",
        loss=loss_value,
        **_model_facts(model, device),
    )


def _model_facts(model: nn.Module, device) -> dict:
    """The StepMemory fields that describe the model rather than the step."""
    trainable, total = param_counts(model)
    return {"trainable_params": trainable, "total_params": total, "dtypes": param_dtypes(model),
            "device": str(device)}


def measure_step_or_oom(model: nn.Module, batch, **kwargs) -> StepMemory:
    """`measure_step`, but out of memory returns `fits=False` (weights known, the rest None)."""
    result, exc = call_or_oom(measure_step, model, batch, **kwargs)
    if exc is None:
        return result
    for p in model.parameters():
        p.grad = None
    free_memory()
    return StepMemory(
        **weight_bytes(model),
        gradients=None,
        optimizer=None,
        activations=None,
        peak=None,
        **_model_facts(model, kwargs.get("device") or _model_device(model)),
        fits=False,
        error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
    )
