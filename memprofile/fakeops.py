"""Replayed fake-tensor answers: the cache that makes a trace (memprofile.trace) fast, not different.

A trace is ~90 % the same ops on the same shapes (every block, forward, recompute and backward).
`FakeOps` replays FakeTensorMode's answer to an op it has seen with the same argument metadata (a new
tensor's metadata, a view of argument k, argument k itself), on a key much cheaper than FakeTensorMode's
own cache key; anything it cannot vouch for (values known as constants, data-dependent ops, in-place
metadata changes) runs through FakeTensorMode. Same bytes: a test compares traces with and without it
(`FakeOps.enabled = False`). The allocation tracker (memprofile.tracker) dispatches every op through
`fake_ops()`, the process's one instance.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily


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


def fake_ops() -> FakeOps:
    """The process's one FakeOps: its entries hold for every fake mode and every trace."""
    if not _OPS:
        _OPS.append(FakeOps())
    return _OPS[0]
