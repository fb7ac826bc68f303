"""A shape-only replay of autograd: what a training step allocates, saves and frees, without data.

memprofile.estimate predicts memory by running the model's forward pass on `Sym`s (a shape, a
dtype, a storage) instead of tensors, with ops from memprofile.ops that know what the real torch op
saves for backward and allocates in backward. The `Tape` keeps a running total of live bytes:

* a `Storage` adds its bytes when created and removes them when the last Python reference to it
  goes (CPython refcounting), so intermediates die exactly when the model code drops them, as in
  the real forward pass;
* an op whose output needs a gradient records a `Node` that holds its saved storages: they stay
  alive until backward runs that node (these are the "activations");
* `Tape.backward` replays the autograd engine: nodes in reverse creation order (what the CPU engine
  does: it runs the ready node with the highest sequence number), each allocating its input
  gradients and temporaries, then releasing its saved storages and the incoming gradient;
  gradients of one tensor from several consumers are summed in place unless both arrive as
  views (then `old + new` is a third buffer); parameter gradients stay (AccumulateGrad);
* `Tape.checkpoint` marks a region run under non-reentrant activation checkpointing: its saved
  storages are dropped at the end of the forward (only the region's inputs stay) and re-created
  when backward reaches the region, together with the recompute's transient peak;
* `Tape.adamw_step` adds the optimizer step's transient (see there).

Live bytes start at 0: they are bytes *above* what exists before the step (weights, optimizer
state, the batch), which memprofile.estimate adds back.

    tape = Tape()
    x = tape.tensor((b, s, h), torch.bfloat16)          # a new activation
    w = tape.param((h, h), torch.bfloat16, trainable=True)
    ...ops...
    activations = tape.saved_bytes()                    # right after the forward
    tape.backward(loss); tape.adamw_step(param_bytes)
    tape.peak, tape.peak_where                           # max live bytes, and where
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch


_ITEMSIZE: dict = {}


def itemsize(dtype: torch.dtype) -> int:
    n = _ITEMSIZE.get(dtype)
    if n is None:
        n = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype, device="meta").element_size()
    return n


class Storage:
    """One allocation. Counted live from creation until CPython drops the last reference."""

    __slots__ = ("nbytes", "tape", "serial", "__weakref__")

    def __init__(self, tape: "Tape", nbytes: int):
        self.tape, self.nbytes = tape, int(nbytes)
        tape._serial += 1
        self.serial = tape._serial
        tape._alloc(self.nbytes)

    def __del__(self):
        self.tape._free(self.nbytes)


class Slot:
    """Where the gradient of a value accumulates; `node` produced the value (None for leaves)."""

    __slots__ = ("node", "grad", "stealable")

    def __init__(self, node=None):
        self.node, self.grad, self.stealable = node, None, True

    def accumulate(self, g: Storage, stealable: bool, tape: "Tape", shared=False) -> None:
        """The engine's InputBuffer::accumulate: a second gradient is added in place into
        whichever of the two buffers it solely owns; a gradient that arrives as a view (of a
        reshaped mm result: every Linear on 3-D input; of a transposed/viewed tensor) is not
        solely owned, and if neither is, `old + new` allocates a third buffer."""
        if self.grad is None:
            self.grad, self.stealable = g, stealable
        elif not (self.stealable or stealable):
            summed = Storage(tape, self.grad.nbytes)
            self.grad, self.stealable = summed, True


class ParamSlot(Slot):
    """A trainable parameter. AccumulateGrad makes the first gradient `p.grad`: it steals the
    tensor when nothing else references it -- even a narrow view, whose whole storage then
    stays alive -- and clones it (param-sized) when another input got the same tensor (add's
    backward hands one tensor to both inputs). Later gradients are added in place."""

    __slots__ = ("tape", "nbytes")

    def __init__(self, tape: "Tape", nbytes: int):
        super().__init__(None)
        self.tape, self.nbytes = tape, nbytes

    def accumulate(self, g: Storage, stealable: bool = True, tape=None, shared=False) -> None:
        if self.grad is None:
            self.grad = Storage(self.tape, self.nbytes) if shared else g
            self.tape.param_grads.append(self.grad)


class LeafSlot(Slot):
    """A non-parameter leaf that requires grad (e.g. HF's enable_input_require_grads on the
    embedding output): its AccumulateGrad node holds the tensor itself, so it and its `.grad`
    live as long as the graph (until backward ends)."""

    __slots__ = ("keep",)

    def __init__(self, keep=None):
        super().__init__(None)
        self.keep = keep

    def accumulate(self, g: Storage, stealable: bool = True, tape=None, shared=False) -> None:
        if self.grad is None:
            self.grad = g


class Sym:
    """A tensor without data. `storage` None: memory that existed before the step (parameters,
    buffers, the batch), not counted. Views share `storage` and the gradient `slot`."""

    __slots__ = ("shape", "dtype", "storage", "slot", "contig", "is_view", "numel", "nbytes")

    def __init__(self, shape, dtype, storage, slot=None, contig=True, is_view=False):
        self.shape, self.dtype, self.storage, self.slot, self.contig, self.is_view = (
            tuple(shape), dtype, storage, slot, contig, is_view)
        self.numel = math.prod(self.shape)
        self.nbytes = self.numel * itemsize(dtype)

    @property
    def rg(self) -> bool:
        return self.slot is not None

    def __repr__(self):
        return f"Sym({self.shape}, {self.dtype}, rg={self.rg})"


PASS = "pass"  # backward hands the incoming gradient tensor itself to this input (no bytes)
VIEW = "view"  # backward hands this input a view (narrow) of the incoming gradient (no bytes)


class Node:
    """An autograd node: saved storages, output gradient slots, (input slot, gradient bytes or
    PASS/VIEW, stealable) per input that needs grad, backward scratch bytes."""

    __slots__ = ("name", "saved", "outs", "ins", "temp", "region")

    def __init__(self, name, saved, outs, ins, temp, region):
        self.name, self.saved, self.outs, self.ins, self.temp, self.region = (
            name, saved, outs, ins, temp, region)


class Region:
    """A checkpointed block: its nodes, what it keeps, and its forward's transient peak."""

    def __init__(self, tape, inputs, keep=(), state_bytes=0):
        self.nodes: list[Node] = []
        self.state_bytes = state_bytes
        self.start_live = tape.live
        # saved by the checkpoint itself (seen by saved_tensors_hooks): the tensor inputs
        self.kept = [x.storage for x in inputs if x.storage is not None]
        # alive through the checkpoint's closure/state but not "saved": kwargs tensors (RoPE
        # cos/sin, position ids) and the RNG state it stashes (preserve_rng_state=True)
        self.external = [x.storage for x in keep if x.storage is not None]
        if state_bytes:
            self.external.append(Storage(tape, state_bytes))
        self.first_serial = tape._serial + 1
        self.excess = 0  # max(live - start_live) during the region's forward so far
        self.excess_at_last_save = 0  # ... up to the op that saved the region's last tensor
        self.sizes: list[tuple[Node, list[int]]] = []  # node -> keys of dropped saved storages
        self.key_bytes: dict[int, int] = {}
        self.recomputed = False


class Tape:
    """The live-bytes account of one replayed step: forward ops, backward, optimizer step."""

    def __init__(self, device: str = "cpu", threads: int = 1):
        self.device = device
        self.threads = threads  # CPU kernels with per-thread scratch (flash attention)
        self.live = 0
        self.peak = 0
        self.where = "start"
        self.peak_where = "start"
        self.phase = "forward"
        self.nodes: list[Node] = []
        self.param_grads: list[Storage] = []
        self.region: Region | None = None
        self.regions: list[Region] = []
        self.leaf_slots: list[Slot] = []
        self._serial = 0

    # ------------------------------------------------------------------ accounting
    def _alloc(self, n: int) -> None:
        self.live += n
        if self.live > self.peak:
            self.peak, self.peak_where = self.live, f"{self.phase}: {self.where}"
        if self.region is not None:
            self.region.excess = max(self.region.excess, self.live - self.region.start_live)

    def _free(self, n: int) -> None:
        self.live -= n

    def transient(self, nbytes: int, where: str | None = None) -> None:
        """Memory that is allocated and freed inside one op (scratch buffers)."""
        if where:
            self.where = where
        self._alloc(nbytes)
        self._free(nbytes)

    # ------------------------------------------------------------------ values
    def tensor(self, shape, dtype, rg: bool = False, contig: bool = True) -> Sym:
        """A newly allocated tensor (its own storage)."""
        s = Sym(shape, dtype, None, Slot() if rg else None, contig)
        s.storage = Storage(self, s.nbytes)
        return s

    def external(self, shape, dtype) -> Sym:
        """Memory that exists before the step and is not counted (a buffer, a batch tensor)."""
        return Sym(shape, dtype, None)

    def param(self, shape, dtype, trainable: bool) -> Sym:
        s = Sym(shape, dtype, None)
        if trainable:
            s.slot = ParamSlot(self, s.nbytes)
        return s

    def requires_grad_(self, x: Sym) -> Sym:
        """output.requires_grad_(True) on a tensor no op recorded: a leaf requiring grad."""
        if x.slot is None:
            x.slot = LeafSlot(x.storage)
            self.leaf_slots.append(x.slot)
        return x

    def view(self, x: Sym, shape=None, contig: bool | None = None) -> Sym:
        """Same storage, same gradient slot (view/transpose backward returns a view: no bytes)."""
        return Sym(x.shape if shape is None else shape, x.dtype, x.storage, x.slot,
                   x.contig if contig is None else contig, is_view=True)

    # ------------------------------------------------------------------ recording
    def op(self, name: str, inputs, out_shapes, out_dtype, saved=(), grads=None, temp: int = 0,
           fwd_temp: int = 0, contig: bool = True, alias: Sym | None = None,
           view_grads: bool = False, save_outputs=()):
        """Run one op: allocate its outputs; if any input needs grad, record a node.

        saved: Syms the op saves for backward (callers pass only what autograd saves given which
        inputs require grad). grads: per input, PASS, VIEW or the bytes backward allocates for its
        gradient (default: the input's own size). temp: scratch bytes alive in backward while
        the input gradients are allocated. fwd_temp: scratch bytes inside the forward kernel.
        alias: the outputs are views of this Sym's storage (slice, select, split): no new bytes.
        view_grads: the input gradients come out as views (Linear on 3-D input: mm + reshape).
        save_outputs: indices of outputs the op saves too (softmax, tanh: their result).
        """
        self.where = name
        rg = any(x.rg for x in inputs)
        single = not isinstance(out_shapes, list)
        shapes = [out_shapes] if single else out_shapes
        dtypes = [out_dtype] * len(shapes) if not isinstance(out_dtype, list) else out_dtype
        if alias is not None:
            outs = [Sym(sh, dt, alias.storage, Slot() if rg else None, contig)
                    for sh, dt in zip(shapes, dtypes)]
        else:
            outs = [self.tensor(sh, dt, rg, contig) for sh, dt in zip(shapes, dtypes)]
        if fwd_temp:  # scratch that coexists with the outputs inside the kernel
            self.transient(fwd_temp)
        if rg:
            if grads is None:
                grads = [x.nbytes for x in inputs]
            ins = [(x.slot, g, not (view_grads or x.is_view)) for x, g in zip(inputs, grads) if x.rg]
            saved = [x for x in saved if x is not None] + [outs[i] for i in save_outputs]
            keep = [x.storage for x in saved if x.storage is not None]
            node = Node(name, keep, [o.slot for o in outs], ins, temp, self.region)
            for o in outs:
                o.slot.node = node
            self.nodes.append(node)
            if self.region is not None:
                self.region.nodes.append(node)
                if saved:  # parameters count: early stop waits for every saved tensor
                    self.region.excess_at_last_save = self.region.excess
        return outs[0] if single else outs

    def saved_bytes(self) -> int:
        """Bytes of distinct storages held by nodes (and checkpoint regions) right now."""
        seen, total = set(), 0
        holders = [n.saved for n in self.nodes if n.saved] + [r.kept for r in self.regions]
        for saved in holders:
            for s in saved:
                if id(s) not in seen:
                    seen.add(id(s))
                    total += s.nbytes
        return total

    # ------------------------------------------------------------------ checkpointing
    @contextmanager
    def checkpoint(self, inputs, keep=(), state_bytes: int = 0):
        """Non-reentrant activation checkpointing of the block run inside (HF layers: the
        positional tensor args are saved, i.e. the hidden states; `keep` are tensors its
        closure holds; `state_bytes` what it stashes, e.g. the RNG state)."""
        region = Region(self, inputs, keep, state_bytes)
        outer, self.region = self.region, region
        try:
            yield region
        finally:
            self.region = outer
            self.regions.append(region)
            # Drop what the block's nodes saved that the block itself created; storages from
            # before the block (e.g. RoPE cos/sin) stay alive through the checkpoint's closure.
            for node in region.nodes:
                keys = []
                for s in node.saved:
                    if s.serial >= region.first_serial:
                        region.key_bytes[id(s)] = s.nbytes
                        keys.append(id(s))
                    elif all(s is not e for e in region.external):
                        region.external.append(s)
                region.sizes.append((node, keys))
                node.saved = []

    def _recompute(self, region: Region) -> None:
        self.where = "checkpoint recompute"
        # The recomputed forward peaks like the original one did, above the current live bytes,
        # but stops early, once the last saved tensor exists (checkpoint early stop, on by
        # default); meanwhile fork_rng holds a copy of the current RNG state.
        self.transient(region.excess_at_last_save + region.state_bytes)
        fresh = {k: Storage(self, n) for k, n in region.key_bytes.items()}
        for node, keys in region.sizes:
            node.saved = [fresh[k] for k in keys]
        region.recomputed = True

    # ------------------------------------------------------------------ backward and step
    def backward(self, loss: Sym) -> None:
        self.phase = "backward"
        self.where = "loss seed"
        loss.slot.grad = Storage(self, loss.nbytes)  # torch.ones_like(loss)
        for node in reversed(self.nodes):
            incoming = [s.grad for s in node.outs]
            if all(g is None for g in incoming):
                node.saved = None
                continue
            if node.region is not None and not node.region.recomputed:
                self._recompute(node.region)
            self.where = node.name
            scratch = Storage(self, node.temp) if node.temp else None
            new = []
            n_pass = sum(1 for _, g, _ in node.ins if g == PASS)
            for slot, g, stealable in node.ins:
                if g == PASS:
                    new.append((slot, incoming[0], stealable and node.outs[0].stealable, n_pass > 1))
                elif g == VIEW:
                    new.append((slot, incoming[0], False, False))
                else:
                    new.append((slot, Storage(self, g), stealable, False))
            del scratch
            for s in node.outs:
                s.grad = None
            node.saved = None
            incoming = None
            for slot, g, stealable, shared in new:
                slot.accumulate(g, stealable, self, shared)
            del new, g
            region = node.region
            if region is not None and region.nodes and node is region.nodes[0]:
                region.kept = []  # the checkpoint's inputs and state go with its first node
                region.external = []
        self.nodes = []
        for r in self.regions:
            r.kept, r.external = [], []
        for slot in self.leaf_slots:  # the leaves and their .grad go with the graph at the end
            slot.grad = slot.keep = None

    def adamw_step(self, param_bytes: list[int], foreach: bool = False) -> None:
        """torch.optim.AdamW on existing state. Single-tensor (CPU default): per parameter,
        `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)` holds two temporaries of
        the parameter's size at once (sqrt, then the division) -> 2 x the largest parameter.
        foreach (CUDA default): `_foreach_sqrt(exp_avg_sqs)` makes one temporary per parameter,
        divided and added in place -> 1 x all trainable bytes."""
        self.phase, self.where = "optimizer step", "adamw"
        if not param_bytes:
            return
        self.transient(sum(param_bytes) if foreach else 2 * max(param_bytes))
