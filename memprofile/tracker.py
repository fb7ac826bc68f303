"""The allocation tracker: live bytes of every storage a step allocates, their peak, and by category (a
fake-tensor trace's own peak counter; in real mode, beside the device's counter, the composition at its peak).

* `StorageTracker` (a TorchDispatchMode) sees every op's outputs. An output whose storage is
  neither one of the op's inputs' storages (a view, an in-place or out= result) nor already known
  is a new allocation: its `nbytes()` are added, and a weakref finalizer on the storage subtracts
  them when the last tensor or view on it dies (what autograd saves keeps it alive; a checkpointed
  block's recomputed tensors die after their backward). The peak is the baseline live before the
  step (weights, optimizer state, batch) plus the highest running sum: the same definition as
  memprofile.peak's allocator events on CPU. It has memprofile.peak.CpuPeakTracker's
  start / stop / max_increase, so memprofile.measure's step runs with either.
* Kernel scratch the dispatcher never sees (a kernel's internal buffers) is not counted, except
  the one correction in `SCRATCH` (a convolution's weight gradient unfolds its input); the others
  measured on CPU stay within the README's bounds ("Where does the memory go?"). Meta kernels
  stricter than the CPU kernels get a shape rule (`SHAPE_RULES`: grouped_mm's meta accepts only
  bf16; the output shape is the same).
* Host memory: storages allocated inside `host_memory()` (e.g. what an activation offloader copies
  to pinned CPU memory) are counted in `host_peak` (StepMemory.host), not in the peak.
  `mark_phase(name)` lets a model hook name a sub-phase (e.g. the recompute of checkpointed blocks
  inside backward), whose peak is then extrapolated on its own line (memprofile.extrapolate).

Every op goes through memprofile.fakeops' cache of FakeTensorMode's answers.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memprofile.composition import Blocks, Composition, temporary_kind
from memprofile.fakeops import fake_ops


def _grouped_mm(func, args, kwargs):
    """aten._grouped_mm's meta kernel accepts only bf16 (CUDA's rule), the CPU kernel any float:
    take the shape from bf16 copies, the dtype from the inputs (the copies are not counted)."""
    a, b = args[0], args[1]
    if a.dtype == torch.bfloat16:
        return func(*args, **kwargs)
    out = func(a.to(torch.bfloat16), b.to(torch.bfloat16), *args[2:], **kwargs)
    return torch.empty_like(out, dtype=kwargs.get("out_dtype") or a.dtype)


SHAPE_RULES = {"_grouped_mm.default": _grouped_mm}


def _conv_weight_grad_scratch(args) -> int:
    """convolution_backward computing a weight gradient unfolds its input (im2col) into a
    buffer of the input's size inside the kernel, on CPU (measured: ViT's patch embedding). That is
    torch's own kernel; where oneDNN takes the convolution (bf16 on AVX512-BF16 CPUs) its scratchpad
    depends on the ISA and thread count instead, and is not modelled (README: "Not included")."""
    mask = args[-1] if len(args) >= 11 else (True, True, True)
    return args[1].untyped_storage().nbytes() if mask[1] else 0


# kernel scratch the dispatcher never sees: op name -> bytes live during that op only
SCRATCH = {"convolution_backward.default": _conv_weight_grad_scratch}


_DEVICE = torch.ops.prim.device.default


def _tensors(obj):
    """The tensors in an op's arguments or outputs (tuples, lists, dicts of them; pytree's
    tree_leaves, without its cost on every dispatch)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


_ACTIVE: list = []   # the StorageTracker(s) running now (innermost last)
_HOST = [0]          # > 0 inside host_memory()


@contextlib.contextmanager
def host_memory():
    """Storages allocated inside this context are host memory (counted in `host`, not in the peak).
    Outside a trace it does nothing: a real allocation is where it is."""
    _HOST[0] += 1
    try:
        yield
    finally:
        _HOST[0] -= 1


def mark_phase(name: str) -> None:
    """Name the phase of the running trace from here on (no-op outside a trace)."""
    if _ACTIVE:
        _ACTIVE[-1].phase = name


class StorageTracker(TorchDispatchMode):
    """Live bytes of the storages allocated while active; start/stop/max_increase like
    memprofile.peak.CpuPeakTracker, plus `peak_at` ("backward: aten.mm")."""

    method = "fake-tensor trace (memprofile.trace)"

    def __init__(self, real: bool = False, device=None):
        """`real`: the step runs on real tensors (the op runs as it is; the tracker only accounts what is live
        at the peak, beside the device's own peak counter), not on fake ones. `device`: count only storages on
        this device type (a CUDA step's pinned host buffers are not GPU memory)."""
        super().__init__()
        self.real = real
        self.device_type = torch.device(device).type if device is not None else None
        self.composition = None   # a memprofile.composition.Composition: bytes by category at the peak
        self.blocks = None        # a memprofile.composition.Blocks: which block a moment belongs to
        self.live = self.peak = 0
        self.keys: set[int] = set()
        self.finalizers: list = []
        self.phase = "forward"
        self.peak_at = ""
        self.phase_peaks: dict[str, int] = {}   # the most live bytes within each phase (forward, backward, ...)
        self.host_live = self.host_peak = 0     # storages made inside host_memory()
        self.ops = None if real else fake_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE:  # C++ asking a fake tensor its device (~60 % of a step's dispatches): nothing to count
            device = getattr(args[0], "fake_device", None)
            return device if device is not None else func(*args, **(kwargs or {}))
        if self.real:
            out = func(*args, **(kwargs or {}))
        else:
            rule, scratch = SHAPE_RULES.get(func.__name__), SCRATCH.get(func.__name__)
            if scratch:
                self._note(self.live, func.__name__, extra=scratch(args))
            out = rule(func, args, kwargs or {}) if rule else self.ops(func, args, kwargs or {})
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs)) if t.layout == torch.strided}
        for t in _tensors(out):
            if t.layout != torch.strided:
                continue      # sparse / nested tensors have no single storage to count
            s = t.untyped_storage()
            if self.device_type is not None and s.device.type != self.device_type:
                continue
            key = s._cdata
            if key in inputs or key in self.keys:
                continue  # a view / in-place result, or a storage already counted
            n = s.nbytes()
            self.keys.add(key)
            if _HOST[0]:
                self.host_live += n
                self.host_peak = max(self.host_peak, self.host_live)
                self.finalizers.append(weakref.finalize(s, self._free_host, key, n))
                continue
            self._allocated(s, key, n, func.__name__)
        return out

    def _allocated(self, s, key: int, n: int, what: str) -> None:
        self.live += n
        self.finalizers.append(weakref.finalize(s, self._free, key, n))
        if self.composition is not None:
            recompute = self.phase.startswith("backward") and self.blocks is not None and self.blocks.recomputing
            self.composition.allocated(key, n, temporary_kind(self.phase + (" (recompute)" if recompute else ""),
                                                              what))
        self._note(self.live, what)

    def _note(self, live: int, what: str, extra: int = 0) -> None:
        """Record `live` (+ `extra` scratch) bytes at this moment: the overall peak and the current phase's."""
        total = live + extra
        if total > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = total
            if self.composition is not None:
                self.composition.snapshot(self.phase, lambda: self.where(what), extra, "kernel scratch (modelled)")
        if total > self.peak:
            self.peak, self.peak_at = total, f"{self.phase}: {what}" + (" (scratch)" if extra else "")

    def where(self, what: str = "") -> str:
        """The moment now in words: "backward of block 3 (model.layers.3): mm"."""
        blocks = self.blocks.where(self.phase) if self.blocks is not None else ""
        return f"{self.phase}{blocks}" + (f": {what}" if what else "")

    def track(self, t: torch.Tensor) -> torch.Tensor:
        """Count a tensor made outside the dispatcher (e.g. torch.get_rng_state()) until it dies."""
        s = t.untyped_storage()
        if s._cdata not in self.keys:
            self.keys.add(s._cdata)
            self._allocated(s, s._cdata, s.nbytes(), getattr(t, "_memprofile_what", "host tensor"))
        return t

    def account(self, model, params, baseline: dict[str, int]) -> None:
        """Keep the composition of what is live, by category (memprofile.composition), for a step of `model`:
        `baseline` the bytes by category live before it; the gradients of `params` are retagged as they are
        accumulated, the blocks of the model name the moments. `release()` undoes the hooks."""
        self.composition, self.blocks = Composition(baseline), Blocks(model)
        self.hooks = [p.register_post_accumulate_grad_hook(lambda p: self.retag(p.grad, "gradients")) for p in params]

    def release(self) -> None:
        for h in getattr(self, "hooks", ()):
            h.remove()
        if self.blocks is not None:
            self.blocks.remove()

    def saved_tensors(self):
        """A saved_tensors_hooks context that retags what autograd saves as activations (measured steps have
        their own pack hook, which calls retag)."""
        def pack(t):
            self.retag(t, "activations")
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def retag(self, t: torch.Tensor, category: str) -> None:
        """The storage of `t`, made in this step, is now `category` (activations, gradients)."""
        if self.composition is not None and t is not None and t.layout == torch.strided:
            self.composition.retag(t.untyped_storage()._cdata, category)

    def _free(self, key: int, n: int) -> None:
        self.keys.discard(key)
        self.live -= n
        if self.composition is not None:
            self.composition.freed(key)

    def _free_host(self, key: int, n: int) -> None:
        self.keys.discard(key)
        self.host_live -= n

    def start(self) -> None:
        self.__enter__()
        _ACTIVE.append(self)

    def stop(self) -> None:
        if _ACTIVE and _ACTIVE[-1] is self:
            _ACTIVE.pop()
        self.__exit__(None, None, None)
        for f in self.finalizers:
            f.detach()

    def max_increase(self) -> int:
        return self.peak
