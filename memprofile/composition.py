"""What is alive at the moment of the peak, by category: a composition that adds up to the peak.

    comp = Composition({"weights_frozen": w, "optimizer": o, "inputs": b, ...})   # bytes live before the step
    comp.allocated(key, nbytes, kind)          # a storage the step made: a temporary of `kind` until it is more
    comp.retag(key, "activations")             # autograd saved it for backward (the pack hook)
    comp.retag(key, "gradients")               # it became a parameter's .grad
    comp.freed(key)
    comp.snapshot(phase, where)                # the tracker calls this at each new maximum of a phase
    at_peak, temporary_parts, where = comp.at_peak()
    describe(at_peak, where, temporary_parts)  # one line, largest category first

memprofile.tracker.StorageTracker keeps one (`account(model, params, baseline)`): on fake tensors in a trace,
and in real mode beside the allocator's peak counter in a measured step (memprofile.measure) or a training
run's first step (qlora.train). The maxima of memprofile.measure's categories are taken at different moments
(weights and optimizer state all step long, activations when the loss is computed, gradients after backward),
so they do not add up to the peak. Here every byte live at the peak's moment is in exactly one category: the
six of StepMemory, `inputs` (the batch) and `temporary`: what is live then and in none of the others, by what
made it (`temporary_kind`: dequantized 4-bit weights, recomputed activations, gradients of activations,
forward outputs not saved such as logits, optimizer temporaries; in a real step also the bytes the allocator
had live that no op's output accounts for: kernel scratch, allocator rounding).

`Blocks` names the block a moment belongs to: in forward the block whose forward is running, in backward the
block whose ops' gradients are being computed (from the autograd node running now and each block's range of
autograd sequence numbers, recorded in forward), so a peak reads "backward of block 3 (model.layers.3): mm".
"""
from __future__ import annotations

import bisect

import torch
from torch import nn

from memprofile.units import human

AT_PEAK = ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer", "activations",
           "inputs", "temporary")
"""The categories of the composition at the peak (they add up to the peak)."""


SHORT = {"weights_quantized": "4-bit weights", "weights_frozen": "frozen weights", "weights_trainable":
         "trainable weights"}


def describe(at_peak: dict, where: str = "", parts: dict | None = None) -> str:
    """One line: "at the peak (backward of block 3 (model.layers.3): mm): activations 120.0 MiB, 4-bit weights
    80.0 MiB, ..., temporary 20.0 MiB (largest: gradients of activations 12.0 MiB)", largest category first."""
    cells = []
    for name, n in sorted(((k, v) for k, v in at_peak.items() if v), key=lambda kv: -kv[1]):
        cell = f"{SHORT.get(name, name)} {human(n, digits=1)}"
        if name == "temporary" and parts:
            kind, size = max(parts.items(), key=lambda kv: kv[1])
            cell += f" (largest: {kind} {human(size, digits=1)})"
        cells.append(cell)
    return f"at the peak{f' ({where})' if where else ''}: " + ", ".join(cells)


def temporary_kind(phase: str, op: str) -> str:
    """What a temporary is, from the phase and the op that made it."""
    if "dequantize" in op:
        return "dequantized 4-bit weights"
    if "recompute" in phase:
        return "recomputed activations"
    if phase.startswith("backward"):
        return "gradients of activations"
    if phase.startswith("optimizer"):
        return "optimizer temporaries"
    return "forward outputs not saved (logits, loss, ...)"


class Composition:
    """Bytes by category of every storage live during a step, and their values at each phase's largest total."""

    def __init__(self, baseline: dict[str, int]):
        self.sums = dict.fromkeys(AT_PEAK, 0)
        for k, v in baseline.items():
            self.sums[k] += v
        self.parts: dict[str, int] = {}                 # temporaries by kind
        self.tags: dict[int, tuple[str, str, int]] = {}  # storage key -> (category, kind, bytes)
        self.phases: dict[str, tuple] = {}              # phase -> (total, sums, temporary parts, where) at its peak

    def allocated(self, key: int, n: int, kind: str) -> None:
        self.tags[key] = ("temporary", kind, n)
        self.sums["temporary"] += n
        self.parts[kind] = self.parts.get(kind, 0) + n

    def retag(self, key: int, category: str) -> None:
        """A storage the step made is now `category` (no-op for one made before the step: a weight, the batch)."""
        tag = self.tags.get(key)
        if tag is None or tag[0] == category:
            return
        old, kind, n = tag
        self.sums[old] -= n
        if old == "temporary":
            self.parts[kind] -= n
        self.sums[category] += n
        self.tags[key] = (category, kind, n)

    def freed(self, key: int) -> None:
        tag = self.tags.pop(key, None)
        if tag is None:
            return
        category, kind, n = tag
        self.sums[category] -= n
        if category == "temporary":
            self.parts[kind] -= n

    def snapshot(self, phase: str, where, extra: int = 0, extra_kind: str = "") -> None:
        """Keep the sums if their total (+ `extra` temporary bytes of `extra_kind` live just now, e.g. a kernel's
        scratch) is the largest of `phase` yet. `where()` names the moment (called only then)."""
        total = sum(self.sums.values()) + extra
        if total <= self.phases.get(phase, (-1,))[0]:
            return
        sums, parts = dict(self.sums), {k: v for k, v in self.parts.items() if v}
        if extra:
            sums["temporary"] += extra
            parts[extra_kind] = parts.get(extra_kind, 0) + extra
        self.phases[phase] = (total, sums, parts, where())

    def at_peak(self, peak: int | None = None, unseen: str = "") -> tuple[dict, dict, str]:
        """(bytes by category, temporary bytes by kind, largest first, where) at the largest total of the step.
        Given the device's own `peak`, what it had live beyond the ops' outputs is a temporary of kind `unseen`
        (kernel scratch, allocator rounding, tensors made before the step), so the categories add up to it."""
        if not self.phases:
            sums, parts, where = dict(self.sums), {}, ""
        else:
            _, sums, parts, where = max(self.phases.values(), key=lambda v: v[0])
            sums, parts = dict(sums), dict(parts)
        if peak is not None and peak != sum(sums.values()):
            parts[unseen] = peak - sum(sums.values())
            sums["temporary"] += parts[unseen]
        return sums, dict(sorted(parts.items(), key=lambda kv: -kv[1])), where

    def by_phase(self) -> dict[str, dict]:
        """phase -> {"bytes": by category, "temporary_parts": by kind, "where": ...} at that phase's largest
        total (what memprofile.extrapolate needs to give a traced model's composition at any depth)."""
        return {phase: {"bytes": dict(v[1]), "temporary_parts": dict(v[2]), "where": v[3]}
                for phase, v in self.phases.items()}


class Blocks:
    """The block a moment of the step belongs to. Blocks: the children of the model's nn.ModuleLists."""

    def __init__(self, model: nn.Module):
        lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        outer = [(name, m) for name, m in lists if not any(name.startswith(o + ".") for o, _ in lists if o != name)]
        self.names = [f"{name}.{i}" for name, m in outer for i in range(len(m))]
        blocks = [b for _, m in outer for b in m]
        self.running: list[int] = []               # forward: the blocks whose forward is running
        self.starts: list[int] = []                # forward: sequence numbers where each block's ops begin
        self.owner: list[int] = []                 # ... and the block
        self.inside = 0                            # forwards of the blocks' children running now
        self.handles = []
        for k, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._enter(k)))
            self.handles.append(block.register_forward_hook(self._leave(k)))
            for child in block.children():         # a checkpointed block's recompute runs its children's forwards
                self.handles.append(child.register_forward_pre_hook(self._child_enters))
                self.handles.append(child.register_forward_hook(self._child_leaves))

    def _child_enters(self, module, args):
        self.inside += 1

    def _child_leaves(self, module, args, output):
        self.inside -= 1

    @property
    def recomputing(self) -> bool:
        """In backward: a block's forward runs again (checkpointing's recompute; the block's own hooks run
        outside the checkpoint, its children's inside)."""
        return self.inside > 0

    def _enter(self, k: int):
        def hook(module, args):
            self.running.append(k)
            if torch._C._current_graph_task_id() == -1:   # forward: record where this block's nodes begin (a
                self.starts.append(torch._C._autograd._get_sequence_nr())   # recompute inside backward runs on the
                self.owner.append(k)                      # engine's thread, whose numbers are its own: not recorded)
        return hook

    def _leave(self, k: int):
        def hook(module, args, output):
            if self.running and self.running[-1] == k:
                self.running.pop()
            if torch._C._current_graph_task_id() == -1:
                self.starts.append(torch._C._autograd._get_sequence_nr())
                self.owner.append(self.running[-1] if self.running else -1)   # the ops from here on
        return hook

    def where(self, phase: str) -> str:
        """" of block k (name)" for the moment now, or "" when it is in no block."""
        k = -1
        if phase.startswith("forward"):
            k = self.running[-1] if self.running else -1
        else:
            node = torch._C._current_autograd_node()
            seq = node._sequence_nr() if node is not None else -1
            if 0 <= seq < 2 ** 62 and self.starts:
                i = bisect.bisect_right(self.starts, seq) - 1
                k = self.owner[i] if i >= 0 else -1
        if k < 0:
            return ""
        name = self.names[k]
        return f" of block {name.rsplit('.', 1)[1]} ({name})"     # its number in its own list (a tower's, the model's)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

