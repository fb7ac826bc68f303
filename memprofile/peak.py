"""Peak of live CPU tensor memory over a region of code, from the CPU allocator's own events.

    tracker = CpuPeakTracker()
    tracker.start(); ...; tracker.stop()
    tracker.max_increase()   # most bytes allocated-and-not-yet-freed at any moment, >= 0
    tracker.net_increase()   # bytes still allocated at stop (allocs - frees)

With `profile_memory=True` the profiler receives one `[memory]` event per CPU allocator
allocation (+nbytes) and free (-nbytes). Their running sum in time order is the change in live
CPU tensor bytes since `start`; its maximum is the peak over the region. Add the bytes live before
`start` to get an absolute peak. Frees of tensors allocated before `start` push the running sum
below zero, which is right as long as those tensors were counted in that baseline.

We drive `torch.autograd.profiler.profile` directly: `torch.profiler.profile` probes
`torch._inductor` on start, which imports it (seconds) the first time in a process.
"""
from __future__ import annotations

import os

import torch
import torch.autograd.profiler as _autograd_profiler


class CpuPeakTracker:
    method = "cpu-profiler-allocator-events"

    def __init__(self):
        self._prof = None
        self._deltas: list[int] | None = None

    def start(self) -> None:
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")   # kineto prints "USDT ... profiler_start" lines otherwise
        self._prof = _autograd_profiler.profile(
            use_cpu=True, profile_memory=True, record_shapes=False, with_stack=False
        )
        self._prof.__enter__()

    def stop(self) -> None:
        self._prof.__exit__(None, None, None)
        events = [
            e
            for e in self._prof.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
        # sorted() is stable: events with equal timestamps keep the order they were recorded in.
        events.sort(key=lambda e: e.start_ns())
        self._deltas = [int(e.nbytes()) for e in events]
        self._prof = None

    def deltas(self) -> list[int]:
        """+bytes per allocation, -bytes per free, in time order."""
        return list(self._deltas or [])

    def max_increase(self) -> int:
        running = peak = 0
        for d in self._deltas or ():
            running += d
            peak = max(peak, running)
        return peak

    def net_increase(self) -> int:
        return sum(self._deltas or ())
