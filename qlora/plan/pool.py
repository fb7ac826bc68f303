"""The planner's process pool: configurations traced side by side, one forked worker per core, with the
imports every worker needs done once in the parent (bitsandbytes without its torch.compile wrappers).
"""
from __future__ import annotations

import gc
import importlib
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from qlora.plan.build import model_class
from qlora.plan.settings import RunSettings


def workers_for(jobs: int) -> int:
    """Processes for the plan's configurations: one per core (forked: the imports are shared), 1
    where fork is not available."""
    if jobs < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(jobs, cores))


def import_before_fork(config, settings: RunSettings) -> None:
    """What every worker would import on its first trace (~3 s: the modeling code, bitsandbytes,
    the tracer), imported once in the parent so that the forked workers share it."""
    import_bitsandbytes()
    for name in ("memprofile.trace", "qlora.levers.modes", "qlora.quant", "qlora.objectives.losses",
                 "qlora.levers.checkpointing",
                 "transformers.initialization"):
        importlib.import_module(name)
    try:
        model_class(settings.task)._model_mapping[type(config)]
    except Exception:  # noqa: BLE001 - a model this task cannot build: the workers say so in one line
        pass


def import_bitsandbytes() -> None:
    """Import bitsandbytes with its torch.compile wrappers made on first call instead of at import.
    Its default backend wraps four kernels in torch.compile when imported, which imports TorchDynamo
    and Inductor (1.6 s of a plan's ~7 s of imports, `python -X importtime`) though a trace never
    calls them (fake tensors run bitsandbytes' fake kernels). A wrapper compiles as torch.compile's
    own does, on the first call, so a later real run is unchanged."""
    if "bitsandbytes" in sys.modules:
        return
    compile_now = torch.compile

    def compile_on_first_call(fn=None, **options):
        if fn is None:
            return lambda f: compile_on_first_call(f, **options)
        compiled = []

        def call(*args, **kwargs):
            if not compiled:
                compiled.append(compile_now(fn, **options))
            return compiled[0](*args, **kwargs)
        return call
    torch.compile = compile_on_first_call
    try:
        import bitsandbytes  # noqa: F401 - lazy: imported here, under the swapped torch.compile
    finally:
        torch.compile = compile_now


def run_jobs(jobs: list, workers: int, config, settings: RunSettings) -> list:
    """The results of `jobs` (groups of (fn, args); a group runs in order in one worker, its fake-op cache
    warm for the next one), over `workers` forked processes (1: here)."""
    if workers <= 1:
        return [r for group in jobs for r in _call(group)]
    import_before_fork(config, settings)
    gc.freeze()  # the parent's objects stay out of the workers' collections: no copy-on-write of the heap
    try:
        # one thread each: a forked child must not enter OpenMP's thread pool, made in the parent (it can hang), when
        # a trace runs ops on its constants for real (as DataLoader's workers do)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return [r for rows in pool.map(_call, jobs) for r in rows]
    finally:
        gc.unfreeze()


def _call(jobs):
    return [fn(*args) for fn, args in jobs]
