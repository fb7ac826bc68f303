"""The memory sweep: every training configuration of one model, measured and predicted side by side.

    qlora profile --model smollm2 --task causal-lm --configs full,head,lora,lora-ckpt,qlora,qlora-ckpt \
        --batch 1,4 --seq 128,512 --rank 8 --out runs/profile
    qlora plan --model path/to/config.json --memory 24GiB --seq 2048 --rank 16

Each row builds a fresh model in its configuration (qlora.modes), measures one training step with
memprofile.measure and predicts the same step with memprofile.estimate from the config alone.
An out-of-memory row is recorded as fits=false and the sweep goes on.
"""
from __future__ import annotations

import gc
import itertools

import torch

from qlora.config import LoraConfig, dtype_name, parse_dtype
from qlora.errors import QLoRAError
from qlora.modes import CONFIGURATIONS, build_for_mode, check_mode

ESTIMATOR_TASK = {"causal-lm": "causal-lm", "seq-cls": "sequence-classification",
                  "image-cls": "image-classification"}
TASKS = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
         "image-cls": "AutoModelForImageClassification"}


def check_task(task: str) -> str:
    if task not in TASKS:
        raise QLoRAError(f"task {task!r} is not known; allowed: {', '.join(TASKS)}")
    return task


def make_batch(config, task: str, batch: int, seq: int, seed: int = 0) -> dict:
    """Random but valid inputs: token ids [batch, seq] (+labels), or pixels [batch, c, seq, seq]."""
    gen = torch.Generator().manual_seed(seed)
    if task == "image-cls":
        pixels = torch.randn(batch, config.num_channels, seq, seq, generator=gen)
        return {"pixel_values": pixels, "labels": torch.randint(0, config.num_labels, (batch,), generator=gen)}
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    if task == "causal-lm":
        return {"input_ids": ids, "labels": ids.clone()}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, config.num_labels, (batch,), generator=gen)}


def _loaders(path: str, task: str, dtype: torch.dtype, **kwargs):
    import transformers
    cls = getattr(transformers, TASKS[task])

    def load_float():
        return cls.from_pretrained(path, dtype=dtype, **kwargs)

    def load_4bit():
        from qlora.quant import load_4bit as load
        return load(path, cls, compute_dtype=dtype, **kwargs)
    return load_float, load_4bit


def sweep(model: str, *, task: str = "causal-lm", configurations=CONFIGURATIONS, batches=(1, 4), seqs=(128, 512),
          ranks=(8,), dtype="bfloat16", target_modules="all-linear", lora_dropout: float = 0.0, out=None,
          progress: bool = True) -> list[dict]:
    """Measure and predict each (configuration, batch, seq, rank); write reports to `out` if given.

    `lora_dropout` > 0 costs activation memory: each adapted layer saves its own dropped copy of its
    input (+ mask) for backward (MiniLM, LoRA, batch 32 x 64: 435 -> 624 MiB of activations at 0.05)."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from memprofile.estimate import estimate
    from memprofile.measure import free_memory, measure_step_or_oom
    from memprofile.report import make_row
    from qlora.bundled import resolve_model
    check_task(task)
    for c in configurations:
        check_mode(c)
    dtype = parse_dtype(dtype)
    path = resolve_model(model)
    hf_config = AutoConfig.from_pretrained(path)
    load_float, load_4bit = _loaders(path, task, dtype)
    is_cls = task != "causal-lm"
    rows = []
    grid = list(itertools.product(configurations, batches, seqs, ranks))
    for conf, batch, seq, rank in tqdm(grid, desc="memory sweep", unit="config", disable=not progress):
        lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules, dtype=dtype,
                          lora_dropout=lora_dropout, modules_to_save=[_head_name(hf_config, task)] if is_cls else None)
        model_obj = build_for_mode(conf, load_float=load_float, load_4bit=load_4bit, lora=lora)
        inputs = make_batch(model_obj.config, task, batch, seq)
        measured = measure_step_or_oom(model_obj, inputs)
        predicted = estimate(hf_config, conf, batch, seq, rank, task=ESTIMATOR_TASK[task], dtype=dtype_name(dtype),
                             lora_targets=target_modules, lora_dropout=lora_dropout, train_head=is_cls,
                             device=measured.device)
        rows.append(make_row(conf, batch, seq, rank, measured, predicted))
        del model_obj, inputs
        free_memory()
        gc.collect()
    if out is not None:
        from memprofile.report import environment, write_report
        write_report(rows, out, env={**environment(), "model": str(path), "task": task, "dtype": dtype_name(dtype)})
    return rows


def _head_name(config, task: str) -> str:
    return "classifier" if task == "image-cls" or getattr(config, "model_type", "") in (
        "bert", "roberta", "vit", "distilbert") else "score"
