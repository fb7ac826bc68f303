"""Predict the memory of one training step by running it on fake tensors: any model, no weights.

    from memprofile.trace import trace_step, trace_layers
    m = trace_step(build, make_batch, loss_fn=..., optimizer=...)   # StepMemory, predicted
    m = trace_layers(build, make_batch, layers=80, period=1)         # 2 and 3 blocks, extrapolated

`build()` returns the model exactly as it will train (any nn.Module: 4-bit layers, adapters,
checkpointing attached), `make_batch()` the inputs; both are called under torch's
`FakeTensorMode`, so every tensor has shapes, dtypes and a storage size but no memory. The step is
then memprofile.measure's own step (forward, loss, backward, optimizer.step()), with the same
saved-tensor hook for `activations` and the same byte accounting for weights, gradients and
optimizer state; only the peak counter differs:

* `StorageTracker` (a TorchDispatchMode) sees every op's outputs. An output whose storage is
  neither one of the op's inputs' storages (a view, an in-place or out= result) nor already known
  is a new allocation: its `nbytes()` are added, and a weakref finalizer on the storage subtracts
  them when the last tensor or view on it dies (what autograd saves keeps it alive; a checkpointed
  block's recomputed tensors die after their backward). The peak is the baseline live before the
  step (weights, optimizer state, batch) plus the highest running sum: the same definition as
  memprofile.peak's allocator events on CPU.
* Kernel scratch the dispatcher never sees (a kernel's internal buffers) is not counted, except
  the one correction in `SCRATCH` (a convolution's weight gradient unfolds its input); the others
  measured on CPU stay within the bounds of docs/memory.md ("qlora plan").
  Ops with data-dependent output shapes (`nonzero`, `.item()`) cannot be traced: such a
  model gets TraceError, one line naming the op.
* Tensor subclasses built by `torch.Tensor._make_subclass` (bitsandbytes' Params4bit) cannot wrap
  a FakeTensor; during a trace they get a class deriving from both, and deep copies of fakes are
  clones (`_fake_subclasses`). Meta kernels stricter than the CPU kernels get a shape rule
  (`SHAPE_RULES`: grouped_mm's meta accepts only bf16; the output shape is the same).
* Host memory: storages allocated inside `host_memory()` (e.g. what an activation offloader copies
  to pinned CPU memory) are counted in `host` (StepMemory.host: the most host bytes live at once),
  not in the peak. `mark_phase(name)` lets a model hook name a sub-phase (e.g. the recompute of
  checkpointed blocks inside backward), whose peak is then extrapolated on its own line.

* Speed: a trace is ~90 % the same ops on the same shapes (every block, forward, recompute and
  backward). `FakeOps` replays FakeTensorMode's answer to an op it has seen with the same argument
  metadata (a new tensor's metadata, a view of argument k, argument k itself), on a key much
  cheaper than FakeTensorMode's own cache key; anything it cannot vouch for (values known as
  constants, data-dependent ops, in-place metadata changes) runs through FakeTensorMode. Same bytes:
  a test compares traces with and without it.

`trace_layers` builds the model with `2 * period` and `3 * period` blocks (period: the shortest
repeating pattern of its layer types, e.g. 2 for Gemma 2's sliding/full alternation) and
extrapolates every byte count linearly to `layers`: from the second block on, each adds the same
weights, gradients, optimizer state, saved activations and peak (the first block's increment
differs: measured on CPU, a 1-block model's peak moment is not the n-block one's).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import weakref
from dataclasses import fields
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from memprofile.measure import StepMemory, _make_optimizer, _measured_step, default_loss


class TraceError(ValueError):
    """A model's step could not be traced on fake tensors (the message is one line)."""


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
    depends on the ISA and thread count instead, and is not modelled (docs/memory.md: "Not included")."""
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


class _Uncacheable(Exception):
    pass


class FakeOps:
    """FakeTensorMode's answers, replayed: one trace dispatches the same ops on the same shapes
    again and again (every block, forward, recompute and backward), and FakeTensorMode computes
    each answer's cache key from ~17 metadata fields per tensor argument (~60 % of a trace's time,
    py-spy). This cache's key is the op and, per argument, (dtype, shape, strides, offset, device)
    or the value; its entries are what the first call returned: a new tensor (its metadata), a view
    of argument k (same storage, its metadata), or argument k itself (in-place). Only answers that
    cannot depend on anything else are kept: every tensor argument a FakeTensor of one mode without
    a known constant value (or a real tensor, by metadata), every output a plain FakeTensor, no op
    whose output shape depends on values, no in-place metadata change; the rest runs through
    FakeTensorMode as before. `enabled = False` runs every op through FakeTensorMode (the reference
    a test compares with)."""

    enabled = True

    def __init__(self):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
        self._fake, self._unset = FakeTensor, unset_fake_temporarily
        self.entries: dict = {}
        self.skip: set = set()         # ops never cached (data-dependent, in-place metadata changes)
        self._skip_tags = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape, torch.Tag.inplace_view,
                           torch.Tag.nondeterministic_seeded)

    def _key(self, func, args, kwargs):
        """(key, flat tensor arguments, their fake mode), or None when the op is not cacheable."""
        if func in self.skip:
            return None
        parts = [func, torch.get_default_dtype(), torch.is_inference_mode_enabled()]
        tensors: list = []
        modes: list = []
        try:
            _describe(args, parts, tensors, modes, self._fake)
            for k, x in kwargs.items():
                parts.append(k)
                _describe(x, parts, tensors, modes, self._fake)
        except _Uncacheable:
            return None
        if not modes:      # no fake tensor in: a factory op (its device comes from the mode)
            return None
        return tuple(parts), tensors, modes[0]

    def __call__(self, func, args, kwargs):
        if not self.enabled:
            return func(*args, **kwargs)
        keyed = self._key(func, args, kwargs)
        if keyed is None:
            return func(*args, **kwargs)
        key, tensors, mode = keyed
        entry = self.entries.get(key)
        if entry is not None:
            return self._replay(entry, tensors, mode)
        mutable = func._schema.is_mutable
        before = [_layout(t) for t in tensors] if mutable else None
        out = func(*args, **kwargs)
        if key not in self.entries:
            try:
                if mutable and [_layout(t) for t in tensors] != before:
                    raise _Uncacheable     # an in-place change of shape, strides or storage (t_, resize_, set_)
                self.entries[key] = self._record(func, out, tensors, mode)
            except _Uncacheable:
                self.entries[key] = None
                if mutable or any(t in func.tags for t in self._skip_tags):
                    self.skip.add(func)    # an in-place op that failed once, or one whose answer depends on values
        return out

    def _record(self, func, out, tensors, mode):
        if any(t in func.tags for t in self._skip_tags):
            raise _Uncacheable
        if out is None and func._schema.is_mutable:
            return None, []               # in place on its arguments, nothing returned (_foreach_mul_)
        single = isinstance(out, torch.Tensor)
        outs = (out,) if single else out
        if not isinstance(outs, (tuple, list)):
            raise _Uncacheable
        storages = [t.untyped_storage()._cdata for t in tensors]
        fresh: set = set()
        infos = []
        for o in outs:
            if o is None:
                infos.append(None)
                continue
            if type(o) is not self._fake or o.fake_mode is not mode or o.constant is not None or o.is_conj() \
                    or o.is_neg() or o.layout is not torch.strided:
                raise _Uncacheable
            meta = _meta(o)
            same = next((k for k, t in enumerate(tensors) if t is o), None)
            if same is not None:          # in place: argument `same` itself
                infos.append(("self", same))
                continue
            s = o.untyped_storage()
            if s._cdata in storages:       # a view of (or a tensor sharing the storage of) an argument
                infos.append(("view", storages.index(s._cdata), meta))
                continue
            if s._cdata in fresh or meta[3] != 0:
                raise _Uncacheable
            fresh.add(s._cdata)
            if self._new(mode, meta).untyped_storage().nbytes() != s.nbytes():
                raise _Uncacheable
            infos.append(("new", meta))
        if func._schema.is_mutable and any(i is not None and i[0] != "self" for i in infos):
            raise _Uncacheable            # out= variants and the like: FakeTensorMode's job
        return single, infos

    def _new(self, mode, meta, storage=None):
        dtype, shape, stride, offset, device, requires_grad = meta
        with self._unset():
            elem = torch.empty_strided(shape, stride, dtype=dtype, device="meta", requires_grad=requires_grad)
            if storage is not None:
                elem.set_(storage, offset, shape, stride)
        return self._fake(mode, elem, device)

    def _replay(self, entry, tensors, mode):
        single, infos = entry
        if single is None:
            return None
        outs = []
        for info in infos:
            if info is None:
                outs.append(None)
            elif info[0] == "self":
                outs.append(tensors[info[1]])
            elif info[0] == "view":
                outs.append(self._new(mode, info[2], tensors[info[1]].untyped_storage()))
            else:
                outs.append(self._new(mode, info[1]))
        return outs[0] if single else tuple(outs)


def _meta(t) -> tuple:
    """What a fake tensor's answer depends on and is made from (FakeOps._new takes it back)."""
    return t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t.fake_device, t.requires_grad


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.storage_offset(), t.untyped_storage().nbytes()


def _describe(x, parts: list, tensors: list, modes: list, fake: type) -> None:
    """Append what decides an op's answer about argument `x` to `parts` (its tensors to `tensors`,
    their fake mode to `modes`); _Uncacheable when it is not a plain value. (A module function, not a
    closure calling itself: that would be a reference cycle holding every op's inputs alive while a
    trace runs with the cyclic collector off.)"""
    if isinstance(x, torch.Tensor):
        if isinstance(x, fake):
            if x.constant is not None or (modes and x.fake_mode is not modes[0]):
                raise _Uncacheable
            if not modes:
                modes.append(x.fake_mode)
            parts.append(_meta(x))
        elif x.layout is torch.strided:
            parts.append(("real", x.dtype, tuple(x.shape), x.stride(), x.device.type))
        else:
            raise _Uncacheable
        tensors.append(x)
    elif isinstance(x, (list, tuple)):
        parts.append(len(x))
        for y in x:
            _describe(y, parts, tensors, modes, fake)
    elif x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                     torch.memory_format)):
        parts.append((type(x), x))     # 1, 1.0 and True are equal keys, not equal arguments
    else:
        raise _Uncacheable


_OPS: list = []      # the process's one FakeOps (its entries hold for every fake mode and trace)


def _fake_ops() -> FakeOps:
    if not _OPS:
        _OPS.append(FakeOps())
    return _OPS[0]


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

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.keys: set[int] = set()
        self.finalizers: list = []
        self.phase = "forward"
        self.peak_at = ""
        self.phase_peaks: dict[str, int] = {}   # the most live bytes within each phase (forward, backward, ...)
        self.host_live = self.host_peak = 0     # storages made inside host_memory()
        self.ops = _fake_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE:  # C++ asking a fake tensor its device (~60 % of a step's dispatches): nothing to count
            device = getattr(args[0], "fake_device", None)
            return device if device is not None else func(*args, **(kwargs or {}))
        rule, scratch = SHAPE_RULES.get(func.__name__), SCRATCH.get(func.__name__)
        if scratch:
            self._note(self.live + scratch(args), f"{func.__name__} (scratch)")
        out = rule(func, args, kwargs or {}) if rule else self.ops(func, args, kwargs or {})
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            s = t.untyped_storage()
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
            self.live += n
            self.finalizers.append(weakref.finalize(s, self._free, key, n))
            self._note(self.live, func.__name__)
        return out

    def _note(self, live: int, what: str) -> None:
        """Record `live` bytes at this moment: the overall peak and the current phase's."""
        if live > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = live
        if live > self.peak:
            self.peak, self.peak_at = live, f"{self.phase}: {what}"

    def track(self, t: torch.Tensor) -> torch.Tensor:
        """Count a tensor made outside the dispatcher (e.g. torch.get_rng_state()) until it dies."""
        s = t.untyped_storage()
        if s._cdata not in self.keys:
            self.keys.add(s._cdata)
            self.live += s.nbytes()
            self.finalizers.append(weakref.finalize(s, self._free, s._cdata, s.nbytes()))
            self._note(self.live, getattr(t, "_memprofile_what", "host tensor"))
        return t

    def _free(self, key: int, n: int) -> None:
        self.keys.discard(key)
        self.live -= n

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


@contextlib.contextmanager
def _fake_subclasses():
    """Let `torch.Tensor._make_subclass(cls, fake)` (Params4bit.__new__ calls it) return the fake
    tensor itself with a class deriving from FakeTensor and `cls`."""
    from torch._subclasses.fake_tensor import FakeTensor

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
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def _replaced(functions, replacements):
    """Each (module, name) in `functions` runs with fake tensors off: constants a library computes
    with data-dependent ops (bitsandbytes' 8-bit code book) are computed for real (they are tiny).
    Each (module, name, fn) in `replacements` is replaced by fn: a decision a library takes from
    tensor values, answered for the inputs the trace stands for."""
    import importlib

    from torch._subclasses.fake_tensor import unset_fake_temporarily

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
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
    )

    try:
        with (mode or new_fake_mode()), _fake_subclasses(), _replaced(real_functions, replacements):
            yield
    except (DataDependentOutputException, DynamicOutputShapeException) as e:
        raise TraceError(f"{e.func if hasattr(e, 'func') else e} depends on tensor values "
                         "(data-dependent shape or .item()), which a fake-tensor trace cannot know") from None
    except UnsupportedOperatorException as e:
        raise TraceError(f"operator {e.func} has no fake-tensor (meta) implementation") from None


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
    opt = _make_optimizer(optimizer, params)
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
            result = _measured_step(model, batch, loss_fn or default_loss, opt, params, torch.device("cpu"),
                                    tracker=tracker)
    finally:
        model.train(was_training)
        if gc_was_enabled:
            gc.enable()
    result.step_seconds, result.step_seconds_method = None, ""
    result.device = "predicted"
    result.host = tracker.host_peak
    return result


_EXTRAPOLATED = ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer",
                 "activations", "peak", "inputs", "trainable_params", "total_params", "host")


def extrapolate(a: StepMemory, b: StepMemory, la: int, lb: int, layers: int) -> StepMemory:
    """Byte counts at `layers` blocks from traces at `la` and `lb` blocks (linear in the count).

    The peak is the largest of the phases' peaks, each extrapolated on its own: the peak of a whole
    step is a maximum of lines, not a line (a full fine-tune of MiniLM peaks in backward at 2-3
    blocks, in the optimizer step at 6: one line through the step peaks was 10.6 % low)."""
    line = lambda va, vb: int(round(vb + (vb - va) * (layers - lb) / (lb - la)))  # noqa: E731
    values = {f.name: getattr(b, f.name) for f in fields(StepMemory)}
    for k in _EXTRAPOLATED:
        va, vb = getattr(a, k), getattr(b, k)
        if va is not None and vb is not None:
            values[k] = line(va, vb)
    phases = {k: line(a.phase_peaks[k], v) for k, v in b.phase_peaks.items() if k in a.phase_peaks}
    values["phase_peaks"] = phases
    if phases and values["peak"] is not None:
        at = max(phases, key=phases.get)
        values["peak"], values["peak_at"] = phases[at], f"{at} (extrapolated per phase)"
    values["dtypes"] = {k: int(round(v + (v - a.dtypes.get(k, 0)) * (layers - lb) / (lb - la)))
                        for k, v in b.dtypes.items()}
    return StepMemory(**values)


def extrapolate_increments(base: StepMemory, increments: list) -> StepMemory:
    """Byte counts of a model with blocks of several kinds, from a `base` trace and, per kind, a
    trace with one block of that kind more: `increments` = [(trace, count), ...] adds `count` blocks
    of each kind to the base (value = base + sum of count x (trace - base), per category and per
    phase; the peak is the largest phase, as in `extrapolate`). E.g. checkpointing only the first k
    of L blocks: base (1 checkpointed + 1 not), +1 checkpointed (k - 1 times), +1 not (L - k - 1)."""
    def line(vb, vs):
        return int(round(vb + sum(n * (v - vb) for v, n in zip(vs, counts))))
    traces, counts = [t for t, _ in increments], [n for _, n in increments]
    values = {f.name: getattr(base, f.name) for f in fields(StepMemory)}
    for k in _EXTRAPOLATED:
        vs = [getattr(t, k) for t in traces]
        if getattr(base, k) is not None and all(v is not None for v in vs):
            values[k] = line(getattr(base, k), vs)
    phases = {k: line(v, [t.phase_peaks[k] for t in traces]) for k, v in base.phase_peaks.items()
              if all(k in t.phase_peaks for t in traces)}
    values["phase_peaks"] = phases
    if phases and values["peak"] is not None:
        at = max(phases, key=phases.get)
        values["peak"], values["peak_at"] = phases[at], f"{at} (extrapolated per phase)"
    values["dtypes"] = {k: line(v, [t.dtypes.get(k, 0) for t in traces]) for k, v in base.dtypes.items()}
    return StepMemory(**values)


def trace_layers(build: Callable[[int], nn.Module], make_batch: Callable[[], Any], *, layers: int, period: int = 1,
                 **kwargs) -> StepMemory:
    """trace_step of a model with `layers` repeated blocks, from `build(n)` at n = 2 * period and
    3 * period blocks (or the whole model when it has no more than that)."""
    if layers <= 3 * period:
        return trace_step(lambda: build(layers), make_batch, **kwargs)
    a = trace_step(lambda: build(2 * period), make_batch, **kwargs)
    b = trace_step(lambda: build(3 * period), make_batch, **kwargs)
    return extrapolate(a, b, 2 * period, 3 * period, layers)
