"""The memory sweep: every training configuration of one model, measured and predicted side by side.

    qlora profile --model smollm2 --task causal-lm --configs full,head,lora,lora-ckpt,qlora,qlora-ckpt \
        --batch 1,4 --seq 128,512 --rank 16 --out runs/profile
    qlora plan --model path/to/config.json --memory 24GiB --seq 2048

Each row builds a fresh model in its configuration exactly as `qlora train` does (qlora.plan.planner.build:
qlora.levers.modes' full/head/lora/qlora, -ckpt = checkpointing), measures one training step with
memprofile.measure (the run's loss and optimizer) and predicts the same step with qlora.plan.planner
(the model traced on fake tensors from its config). An out-of-memory row is recorded as
fits=false; a configuration that cannot be built or traced gets its one-line error in the row
("error" / "predict_error") and the sweep goes on, so the report is always written.
"""
from __future__ import annotations

import gc
import itertools
import sys
from dataclasses import replace

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from memprofile.measure import free_memory, measure_step_or_oom
from memprofile.report import environment, make_row, write_report
from qlora.bundled import resolve_model
from qlora.errors import QLoRAError
from qlora.levers.modes import CONFIGURATIONS, check_mode
from qlora.plan.build import build, loss_fn, make_batch, measured_optimizer
from qlora.plan.images import add_images
from qlora.plan.planner import Planner
from qlora.plan.settings import TASKS, RunSettings
from qlora.util.dtypes import dtype_name, parse_dtype

ESTIMATOR_TASK = {t: t for t in TASKS}  # kept for callers of the old name


def check_task(task: str) -> str:
    if task not in TASKS:
        raise QLoRAError(f"task {task!r} is not known; allowed: {', '.join(TASKS)}")
    return task


def sweep(model: str, *, task: str = "causal-lm", configurations=CONFIGURATIONS, batches=(1, 4), seqs=(128, 512),
          ranks=(16,), settings: RunSettings | None = None, out=None, progress: bool = True, **overrides) -> list[dict]:
    """Measure and predict each (configuration, batch, seq, rank); write reports to `out` if given.

    `settings` (default: RunSettings(), qlora train's defaults, on this machine's device) gives
    the loss, optimizer, LoRA dropout/targets and compute dtype; `overrides` replace its fields
    (e.g. lora_dropout=0.0, compute_dtype="float32"). `lora_dropout` > 0 costs activation memory:
    each adapted layer saves its own dropped copy of its input (+ mask) for backward."""
    check_task(task)
    for c in configurations:
        check_mode(c)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "dtype" in overrides:  # the old keyword
        overrides["compute_dtype"] = dtype_name(parse_dtype(overrides.pop("dtype")))
    base = replace(settings or RunSettings(), task=task, device=device, **overrides)
    path = resolve_model(model)
    hf_config = AutoConfig.from_pretrained(path)
    rows, planners = [], {}
    grid = list(itertools.product(configurations, batches, seqs, ranks))
    for conf, batch, seq, rank in tqdm(grid, desc="memory sweep", unit="config", disable=not progress):
        s = replace(base.with_configuration(conf), lora_r=rank)
        measured = predicted = None
        errors = {}
        try:
            model_obj = build(hf_config, s, path=path)
            inputs = make_batch(model_obj.config, task, batch, seq)
            inputs = add_images(model_obj, inputs, s.images, s.image_size) if s.images else inputs
            measured = measure_step_or_oom(model_obj.to(device), inputs,
                                           loss_fn=loss_fn(s), optimizer=measured_optimizer(s))
            del model_obj
        except QLoRAError as e:
            errors["error"] = str(e)
        try:
            if (conf, rank) not in planners:
                planners[(conf, rank)] = Planner(hf_config, s)
            predicted = planners[(conf, rank)].estimate(batch, seq)
        except QLoRAError as e:
            errors["predict_error"] = str(e)
        for key, msg in errors.items():
            print(f"qlora profile: {conf} b={batch} s={seq}: {'not predicted' if key == 'predict_error' else 'not measured'}: "
                  f"{msg}", file=sys.stderr)
        rows.append({**make_row(conf, batch, seq, rank, measured, predicted), **errors})
        free_memory()
        gc.collect()
    if out is not None:
        write_report(rows, out, env={**environment(), "model": str(path), "task": task,
                                     "dtype": dtype_name(base.dtype), "assumed": base.describe()})
    return rows

