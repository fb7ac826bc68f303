"""A model's StepMemory at any number of blocks, from traces of a few (memprofile.trace.trace_layers, qlora.plan).

    extrapolate(a, b, la, lb, layers)          # traces at la and lb blocks -> the model with `layers` blocks
    extrapolate_increments(base, increments)   # blocks of several kinds: base + n x (one more of each kind)

From the second block on, each adds the same weights, gradients, optimizer state, saved activations
and peak, so every byte count is linear in the count (the first block's increment differs: measured on
CPU, a 1-block model's peak moment is not the n-block one's). The peak is the largest of the phases'
peaks (forward, backward, its recompute, optimizer step), each extrapolated on its own line.
"""
from __future__ import annotations

import re
from dataclasses import fields

from memprofile.measure import StepMemory

EXTRAPOLATED = ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer",
                "activations", "peak", "inputs", "trainable_params", "total_params", "host")
"""The StepMemory fields extrapolated linearly in the number of blocks (the rest are the larger trace's)."""


def extrapolate(a: StepMemory, b: StepMemory, la: int, lb: int, layers: int, under: str | None = None) -> StepMemory:
    """Byte counts at `layers` blocks from traces at `la` and `lb` blocks (linear in the count). `under`: the
    module path holding the blocks the traces differ in (an image-text model's language model; None: any), so the
    peak's block label is renumbered for the whole model there only (a vision tower's block keeps its number).

    The peak is the largest of the phases' peaks, each extrapolated on its own: the peak of a whole
    step is a maximum of lines, not a line (a full fine-tune of MiniLM peaks in backward at 2-3
    blocks, in the optimizer step at 6: one line through the step peaks was 10.6 % low)."""
    line = lambda va, vb: int(round(vb + (vb - va) * (layers - lb) / (lb - la)))  # noqa: E731
    values = {f.name: getattr(b, f.name) for f in fields(StepMemory)}
    for k in EXTRAPOLATED:
        va, vb = getattr(a, k), getattr(b, k)
        if va is not None and vb is not None:
            values[k] = line(va, vb)
    phases = {k: line(a.phase_peaks[k], v) for k, v in b.phase_peaks.items() if k in a.phase_peaks}
    values["phase_peaks"] = phases
    if phases and values["peak"] is not None:
        at = max(phases, key=phases.get)
        values["peak"], values["peak_at"] = phases[at], f"{at} (extrapolated per phase)"
        _composition_at(values, at, [a, b], lambda vs: line(*vs), lambda i: i if i < lb / 2 else layers - (lb - i),
                        under)
    values["dtypes"] = {k: int(round(v + (v - a.dtypes.get(k, 0)) * (layers - lb) / (lb - la)))
                        for k, v in b.dtypes.items()}
    return StepMemory(**values)


def _composition_at(values: dict, phase: str, traces: list, combine, block, under: str | None = None) -> None:
    """values' at_peak / temporary_parts / peak_phase: each trace's composition at `phase`'s peak, combined
    number by number as the byte counts are (`combine([v of each trace])`), so they add up to the peak;
    `block(i)`: the block of the whole model that block i of the last trace stands for (blocks under the module
    path `under` only, when given)."""
    found = [t.phase_at_peak.get(phase) for t in traces]
    if not all(found):
        values["at_peak"], values["temporary_parts"], values["peak_phase"] = {}, {}, ""
        return
    def merged(key):
        names = dict.fromkeys(name for f in found for name in f[key])
        return {name: combine([f[key].get(name, 0) for f in found]) for name in names}
    values["at_peak"] = merged("bytes")
    values["at_peak"]["temporary"] += values["peak"] - sum(values["at_peak"].values())   # the rounding of each line
    values["temporary_parts"] = {k: v for k, v in sorted(merged("temporary_parts").items(), key=lambda kv: -kv[1]) if v}
    where = found[-1]["where"]
    match = re.search(r" of block (\d+) \(([^)]*?)(\d+)\)", where)
    if match and (under is None or match.group(2).startswith(under + ".")):
        k = block(int(match.group(1)))
        where = where[:match.start()] + f" of block {k} ({match.group(2)}{k})" + where[match.end():]
    values["peak_phase"] = where + " (extrapolated)"
    values["phase_at_peak"] = {}


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
    for k in EXTRAPOLATED:
        vs = [getattr(t, k) for t in traces]
        if getattr(base, k) is not None and all(v is not None for v in vs):
            values[k] = line(getattr(base, k), vs)
    phases = {k: line(v, [t.phase_peaks[k] for t in traces]) for k, v in base.phase_peaks.items()
              if all(k in t.phase_peaks for t in traces)}
    values["phase_peaks"] = phases
    if phases and values["peak"] is not None:
        at = max(phases, key=phases.get)
        values["peak"], values["peak_at"] = phases[at], f"{at} (extrapolated per phase)"
        _composition_at(values, at, [*traces, base], lambda vs: line(vs[-1], vs[:-1]), lambda i: i)
    values["dtypes"] = {k: line(v, [t.dtypes.get(k, 0) for t in traces]) for k, v in base.dtypes.items()}
    return StepMemory(**values)
