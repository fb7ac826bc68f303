"""What autograd saves for backward, held in (pinned) host memory, the copies overlapped with compute.

    from qlora.levers.offload import offload_saved_tensors
    with offload_saved_tensors(model):          # around forward + loss; backward runs outside
        loss = loss_fn(model, batch)
    loss.backward()

With qlora's non-reentrant checkpointing (`qlora.prepare_for_training`) a block saves nothing of its
insides, only its positional inputs (the hidden states [B, S, H]); the block's own saved tensors are
placeholders of torch's checkpoint, whose hooks take precedence inside the block. So under this context
the tensors that leave the device are exactly the checkpointed block inputs, plus what the ops outside
the blocks save (the final norm's input, the chunked loss's [N, H] gradient): layers x B x S x H x 2
bytes in bf16, ~20 GiB for Llama-3.1-8B at 78k tokens, which is what dominates a long-context step.

How the copies overlap (CUDA): a pack copies the tensor device -> pinned host on a side stream that
first waits for the compute stream, and marks the device tensor as used by that stream
(`record_stream`), so the caching allocator re-uses its memory only after the copy finished; the
forward never waits. In backward, the first unpack of a tensor starts its host -> device copy and
that of the tensor packed just before it (the previous block's input: the next one backward needs),
so each block's input arrives while the block after it is recomputed; the compute stream waits for
the copy's event only when it needs the tensor. Host buffers come from torch's pinned caching
allocator (re-used from step to step).

On a CPU there is no second memory: the same code runs, "offloading" into a separate CPU tensor,
which is how the tests check what is moved and that the device tensor is released (`stats`).
Tensors under `min_bytes` (rsqrt of a norm, position ids) and the model's own parameters and buffers
(saved by reference, they exist anyway) stay where they are.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class OffloadStats:
    """What one `offload_saved_tensors` context moved: counts and bytes, and the shapes moved."""
    tensors: int = 0
    bytes: int = 0
    kept: int = 0
    """Saved tensors left in place (small, or a parameter/buffer)."""
    shapes: list = field(default_factory=list)
    reloads: int = 0
    """Host -> device copies made in backward (prefetched or on demand)."""


class _Packed:
    __slots__ = ("device", "host", "ready", "loaded", "index", "used")

    def __init__(self, device, host, ready, index):
        self.device, self.host, self.ready, self.index = device, host, ready, index
        self.loaded = None          # (device tensor, event) once a host -> device copy was started
        self.used = False           # unpacked once already: not worth prefetching again


class _Kept:
    """A saved tensor left on the device, packed by the hooks that were active outside the offloader
    (e.g. memprofile's saved-tensor counter, which then still counts what stays on the device)."""
    __slots__ = ("inner",)

    def __init__(self, inner):
        self.inner = inner


class Offloader:
    """saved_tensors_hooks pack/unpack pair moving large saved tensors to host memory and back."""

    def __init__(self, model: nn.Module | None = None, min_bytes: int = 1 << 20, pin_memory: bool | None = None):
        self.min_bytes = min_bytes
        self.keep = set()
        if model is not None:   # parameters and buffers are saved by reference: moving them would copy weights
            self.keep = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.stream = None
        self.packed: list[_Packed] = []
        self.stats = OffloadStats()
        self.outer = None       # (pack, unpack) of the saved-tensor hooks active around this one, if any

    def _side_stream(self, device):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if (nbytes < self.min_bytes or t.layout != torch.strided or t.device.type == "meta"
                or t.untyped_storage()._cdata in self.keep):
            self.stats.kept += 1
            return _Kept(self.outer[0](t)) if self.outer else t
        self.stats.tensors += 1
        self.stats.bytes += nbytes
        self.stats.shapes.append(tuple(t.shape))
        host, ready = self._to_host(t)
        p = _Packed(t.device, host, ready, len(self.packed))
        self.packed.append(p)
        return p

    def _to_host(self, t: torch.Tensor):
        """(host copy of t, event marking the copy done or None); t may be freed once autograd drops it."""
        if t.device.type != "cuda":        # CPU: a separate copy, so the original can be freed
            return t.detach().clone(memory_format=torch.contiguous_format), None
        stream = self._side_stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
        stream.wait_stream(torch.cuda.current_stream(t.device))   # t's values are written
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=self.pin)
            ready = torch.cuda.Event()
            ready.record(stream)
        t.record_stream(stream)        # its memory is re-used only after the copy has run
        return host, ready

    def _to_device(self, p: _Packed):
        """(device tensor with p's values, event marking the copy done or None)."""
        if p.device.type != "cuda":        # CPU: the host copy is the tensor
            return p.host, None
        stream = self._side_stream(p.device)
        with torch.cuda.stream(stream):
            if p.ready is not None:
                stream.wait_event(p.ready)             # the device -> host copy is complete
            dev = p.host.to(p.device, non_blocking=self.pin)
            event = torch.cuda.Event()
            event.record(stream)
        return dev, event

    def _load(self, p: _Packed) -> None:
        if p.loaded is not None:
            return
        self.stats.reloads += 1
        p.loaded = self._to_device(p)

    def unpack(self, p):
        if isinstance(p, _Kept):
            return self.outer[1](p.inner)
        if not isinstance(p, _Packed):
            return p
        self._load(p)
        if p.index > 0 and not self.packed[p.index - 1].used:
            self._load(self.packed[p.index - 1])       # prefetch the one backward needs next
        dev, event = p.loaded
        p.loaded, p.used = None, True                   # autograd holds it from here; freed after use
        if event is not None:
            current = torch.cuda.current_stream(p.device)
            current.wait_event(event)
            dev.record_stream(current)                  # allocated on the side stream, used on this one
        return dev


@contextlib.contextmanager
def offload_saved_tensors(model: nn.Module | None = None, *, min_bytes: int = 1 << 20,
                          pin_memory: bool | None = None, offloader: type = Offloader):
    """Context: tensors autograd saves inside it (at least `min_bytes`, not `model`'s parameters or
    buffers) live in host memory until backward needs them. Yields the `Offloader` (its `.stats`).
    `offloader`: an Offloader subclass whose `_to_host` / `_to_device` make the copies another way
    (qlora.plan's traced one counts the host copies as host memory)."""
    off = offloader(model, min_bytes, pin_memory)
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)   # torch >= 2.1
    off.outer = top(False) if top is not None else None
    with torch.autograd.graph.saved_tensors_hooks(off.pack, off.unpack):
        yield off
