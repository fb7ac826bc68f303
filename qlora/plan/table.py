"""The plan: per configuration the largest batch, the longest context and the peak; the recommendation;
the FSDP per-rank formula; the long-context levers. Configurations are traced side by side (plan.pool).

    result = plan(load_config(path), 24 * 2**30, RunSettings(), seq=2048);  print(format_plan(result))
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Optional

from qlora.errors import QLoRAError
from qlora.plan.build import load_config, text_config
from qlora.plan.images import default_image_size
from qlora.plan.planner import Planner
from qlora.plan.pool import run_jobs, workers_for
from qlora.plan.settings import RunSettings


def option(planner: Planner, budget: int, seq: int, effective_batch: int) -> Optional[dict]:
    """The micro-batch and accumulation for `effective_batch` examples per step under one
    configuration (None: not even batch 1 fits)."""
    largest = planner.largest_batch(budget, seq)
    if largest == 0:
        return None
    accum = math.ceil(effective_batch / min(largest, effective_batch))
    micro = math.ceil(effective_batch / accum)
    return {"configuration": planner.settings.configuration, "micro_batch": micro, "grad_accum": accum,
            "checkpointing": planner.settings.checkpointing, "largest_batch": largest,
            "peak": planner.estimate(micro, seq).peak}


def recommend(options) -> Optional[dict]:
    """Of one mode's options (with and without checkpointing): without checkpointing when a
    micro-batch of at least half the checkpointed one fits (it is ~30 % faster), else with it."""
    best = None
    for option in (o for o in options if o is not None):
        if best is None or (not option["checkpointing"] and 2 * option["micro_batch"] >= best["micro_batch"]) \
                or (best["checkpointing"] is False and option["micro_batch"] > 2 * best["micro_batch"]):
            best = option
    return best


def fsdp_per_rank(estimate, world_size: int, largest_block_bytes: int) -> dict:
    """Per-rank bytes under FSDP (a formula, not a trace): weights, gradients and optimizer state
    sharded over `world_size`, plus one block's all-gathered parameters (the largest block's
    unsharded bytes), activations as on one device."""
    b = estimate.bytes()
    sharded = {k: math.ceil(b[k] / world_size) for k in
               ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer")}
    saved = sum(b[k] - sharded[k] for k in sharded)
    out = {**sharded, "activations": b["activations"], "all_gather": largest_block_bytes}
    out["peak"] = b["peak"] - saved + largest_block_bytes
    return out


def _largest_block_bytes(planner: Planner) -> int:
    """Unsharded bytes of one block's parameters (what FSDP all-gathers at a time): the increment
    between the traced models' weights."""
    p = planner.period
    if planner.layers <= 3 * p:
        e = planner.estimate(1, 64)
        return sum(e.bytes()[k] for k in ("weights_quantized", "weights_frozen", "weights_trainable")) // planner.layers
    a, b = planner._step(2 * p, 1, 64), planner._step(3 * p, 1, 64)
    w = lambda e: sum(e.bytes()[k] for k in ("weights_quantized", "weights_frozen", "weights_trainable"))  # noqa: E731
    return (w(b) - w(a)) // p


def _row(config, settings: RunSettings, budget: int, seq: int, effective_batch: int, world_size: int,
         own: bool) -> dict:
    """One configuration's row of the plan (and its recommendation option when `own`: the mode planned for)."""
    planner = Planner(config, settings)
    e = planner.estimate(1, seq)
    row = {"configuration": settings.configuration, "peak_batch1": e.peak, "bytes": e.bytes(), "peak_at": e.peak_at,
           "at_peak": e.at_peak, "peak_phase": e.peak_phase, "temporary_parts": e.temporary_parts,
           "largest_batch": planner.largest_batch(budget, seq),
           "longest_seq": None if settings.task == "image-cls" else planner.longest_seq(budget, start=seq),
           "trainable_params": e.trainable_params, "total_params": e.total_params,
           "option": option(planner, budget, seq, effective_batch) if own else None}
    row["towers"] = planner.tower_bytes()
    if settings.images:      # the images' own cost: the same step with their tokens as text tokens, no pixels
        text = Planner(config, replace(settings, images=0)).estimate(1, seq)
        row["images"] = {"tokens": planner.image_tokens(), "activations": e.activations - text.activations,
                         "peak": e.peak - text.peak}
    if world_size > 1:
        row["fsdp"] = fsdp_per_rank(e, world_size, _largest_block_bytes(planner))
    longest = row["longest_seq"]
    at = planner.estimate(1, longest) if longest else None   # cached by the search
    row["at_longest"] = {"bytes": at.bytes() if at else None, "host": (at.host or 0) if at else None,
                         "peak_at": at.peak_at if at else None}
    return row


def _lever_row(config, settings: RunSettings, name: str, budget: int, start: int) -> dict:
    """One lever's row: the longest sequence at batch 1 within `budget` and the categories there."""
    planner = Planner(config, settings)
    longest = planner.longest_seq(budget, start=start)
    e = planner.estimate(1, longest) if longest else None
    return {"lever": name, "settings": planner.settings, "longest_seq": longest,
            "bytes": e.bytes() if e else None, "host": (e.host or 0) if e else None,
            "peak_at": e.peak_at if e else None}


def with_image_budget(config, settings: RunSettings) -> tuple[RunSettings, Optional[str]]:
    """`settings` and None when its images can be planned (or there are none); else the text-only settings and the
    one-line reason (the processor cannot be built here, the tower cannot be traced on fake tensors)."""
    if not settings.images:
        return settings, None
    try:
        Planner(config, settings).image_tokens()
    except QLoRAError as e:
        return replace(settings, images=0), f"{e}: planned text only"
    return settings, None


def plan(config, budget: int, settings: RunSettings = RunSettings(), *, seq: int = 2048, effective_batch: int = 16,
         configurations=("full", "lora", "lora-ckpt", "qlora", "qlora-ckpt"), world_size: int = 1,
         levers: Optional[dict] = None) -> dict:
    """Per configuration: the largest batch at `seq`, the longest sequence at batch 1, the peak at
    batch 1 (and per FSDP rank for world_size > 1); and a recommendation for settings.mode. With
    `levers` ({name: RunSettings fields}, e.g. LEVERS): per lever, the longest sequence at batch 1.

    Configurations (and levers) are traced side by side, one process per core (each trace is
    single-threaded Python): the lever searches, which take longest, first, then each mode with and
    without checkpointing in the same worker (they trace the same ops on the same shapes: the second
    replays most of them from memprofile.fakeops.FakeOps)."""
    t0 = time.perf_counter()
    config = load_config(config)
    settings, note = with_image_budget(config, settings)
    mode = settings.mode
    confs = list(dict.fromkeys(list(configurations) + [mode, mode + "-ckpt"]))
    modes = {}
    for c in sorted(confs, key=lambda c: (not c.endswith("-ckpt"), c)):   # -ckpt first: it takes longest
        modes.setdefault(c.split("-")[0], []).append(
            (_row, (config, settings.with_configuration(c), budget, seq, effective_batch, world_size,
                    c.split("-")[0] == mode)))
    base = replace(settings, checkpointing=True)
    lever_jobs = [[(_lever_row, (config, replace(base, **fields), name, budget, seq))]
                  for name, fields in (levers or {}).items() if fields]    # {} is the -ckpt row's own answer
    jobs = lever_jobs + sorted(modes.values(), key=len, reverse=True)
    workers = workers_for(sum(map(len, jobs)))
    while len(jobs) < workers:        # fewer groups than cores (e.g. --configs qlora-ckpt): split one
        i = next(i for i, group in enumerate(jobs) if len(group) > 1)
        jobs[i:i + 1] = [[job] for job in jobs[i]]
    done = run_jobs(jobs, workers, config, settings)
    by_conf = {r["configuration"]: r for r in done if "configuration" in r}
    by_lever = {r["lever"]: r for r in done if "lever" in r}
    own = by_conf[mode + "-ckpt"]
    lever_out = []
    for name, fields in (levers or {}).items():
        if fields:
            lever_out.append(by_lever[name])
        else:   # no lever: the checkpointed row of the mode planned for
            lever_out.append({"lever": name, "settings": settings.with_configuration(mode + "-ckpt"),
                              "longest_seq": own["longest_seq"], **own["at_longest"]})
    rec = recommend([by_conf[c]["option"] for c in (mode, mode + "-ckpt")])
    moe = any(getattr(text_config(config), k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    return {"model": getattr(config, "_name_or_path", "") or config.model_type, "model_type": config.model_type,
            "budget": budget, "seq": seq, "effective_batch": effective_batch, "world_size": world_size,
            "assumed": settings, "rows": [by_conf[c] for c in configurations], "recommendation": rec, "moe": bool(moe),
            "levers": lever_out, "seconds": time.perf_counter() - t0, "workers": workers,
            "image_size": settings.image_size or default_image_size(config), "note": note}
