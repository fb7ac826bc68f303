"""Training's bridge to the planner: the RunSettings of a model built for training, the micro-batch and
checkpointed blocks that fit `train.memory_budget`, and the check of the first step against the plan.
(Training calls the planner; the planner knows nothing of training.)
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch

from qlora.arch.blocks import transformer_blocks
from qlora.arch.quantized import has_4bit
from qlora.errors import QLoRAError
from qlora.levers.checkpointing import enable_checkpointing, is_checkpointing
from qlora.levers.tiled_mlp import TiledMLP
from qlora.lora.layers import LoRALayer
from qlora.plan.build import num_layers
from qlora.plan.planner import Planner, fewest_checkpointed_blocks
from qlora.plan.settings import RunSettings
from qlora.util.dtypes import dtype_name
from qlora.util.sizes import parse_size


def apply_memory_budget(model, train_set, collate, config, log, plan_as: Optional[dict] = None):
    """(config with batch_size / grad_accum chosen for config.memory_budget, the predicted peak); the
    fewest checkpointed blocks that fit are switched on in `model`. Without a budget: (config, None)."""
    if not config.memory_budget:
        return config, None
    config, predicted_peak, blocks = fit_to_budget(model, train_set, collate, config, parse_size(config.memory_budget),
                                                   plan_as)
    ckpt = ""
    if blocks is not None:   # fewer blocks recomputed: faster steps in the same budget
        enable_checkpointing(model, blocks=blocks)
        ckpt = f" checkpointing the first {blocks} of {num_layers(model.config)} blocks"
    log(f"memory_budget {config.memory_budget}: batch_size={config.batch_size} "
        f"grad_accum={config.grad_accum}{ckpt} (predicted peak {predicted_peak / 2**30:.2f} GiB)")
    return config, predicted_peak


def settings_of(model, train_config) -> RunSettings:
    """The RunSettings of a model built for training: mode from its layers (4-bit / LoRA / all or
    some parameters trainable), LoRA from model.qlora_config, checkpointing as it is on, the
    optimizer and offload (qlora train offloads on CUDA only) from the TrainConfig, MLP tiles as
    qlora.levers.tiled_mlp set them. The loss is assumed chunked (qlora train's causal-LM loss)."""
    modules = list(model.modules())
    lora = getattr(model, "qlora_config", None)
    if has_4bit(model):
        mode = "qlora"
    elif any(isinstance(m, LoRALayer) for m in modules):
        mode = "lora"
    else:
        mode = "full" if all(p.requires_grad for p in model.parameters()) else "head"
    task = {"ForSequenceClassification": "seq-cls", "ForImageClassification": "image-cls"}
    name = type(model).__name__
    tiled = next((m.__dict__["forward"] for m in modules if isinstance(m.__dict__.get("forward"), TiledMLP)), None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fields = dict(mode=mode, checkpointing=is_checkpointing(model), optimizer=train_config.optimizer,
                  device=device, offload_activations=bool(train_config.offload_activations) and device == "cuda",
                  mlp_tile=tiled.tile if tiled else 0, mlp_tile_min_tokens=tiled.min_tokens if tiled else 4096,
                  task=next((t for suffix, t in task.items() if name.endswith(suffix)), "causal-lm"),
                  compute_dtype=dtype_name(next(p.dtype for p in model.parameters() if p.is_floating_point())))
    chosen = [getattr(b, "gradient_checkpointing", False) for b in transformer_blocks(model)]
    if fields["checkpointing"] and chosen and not all(chosen):   # a subset (counted as the first k)
        fields["checkpoint_blocks"] = sum(chosen)
    if lora is not None:
        fields.update(lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                      target_modules=lora.target_modules if isinstance(lora.target_modules, str)
                      else tuple(lora.target_modules))
    return RunSettings(**fields)


def fit_to_budget(model, train_set, collate, train_config, budget: int, plan_as: Optional[dict] = None):
    """(train_config with batch_size and grad_accum chosen so that batch_size * grad_accum examples
    per step fit in `budget` bytes, the predicted peak at that micro-batch, checkpoint_blocks). The
    sequence length is that of a collated batch of the configured size; a batch with a completion_mask is
    planned as preference pairs (task dpo). With checkpointing on, the
    micro-batch is chosen with every block checkpointed, then `checkpoint_blocks` is the fewest
    (the first k) that still fit at it (each block left out skips its recompute): None when all are
    needed (or checkpointing is off); the peak is the one with k blocks. `plan_as`: RunSettings fields and `seq`
    for a batch whose tensors do not say how it is planned (GRPO: its prompts become rows the step samples)."""
    settings = settings_of(model, train_config)
    if plan_as is not None:
        fields = dict(plan_as)
        seq = int(fields.pop("seq"))
        settings = replace(settings, **fields)
    else:
        sample = collate([train_set[i] for i in range(min(len(train_set), train_config.batch_size))])
        if "completion_mask" in sample:        # TRL's preference layout: batch_size pairs, 2 rows each
            settings = replace(settings, task="dpo")
        x = sample.get("input_ids", sample.get("pixel_values"))
        seq = int(x.shape[-1])
    planner = Planner(model.config, settings)
    effective = train_config.batch_size * train_config.grad_accum
    largest = planner.largest_batch(budget, seq, max_batch=effective)
    if largest == 0:
        shorten = ("lower num_generations, max_completion_length or max_prompt_length" if settings.task == "grpo"
                   else "shorten max_length")
        raise QLoRAError(f"train.memory_budget: even batch 1 at length {seq} is predicted to need "
                         f"{planner.estimate(1, seq).peak / 2**30:.2f} GiB ({settings.describe()}); raise the budget, "
                         f"{shorten}, or turn gradient checkpointing on")
    accum = math.ceil(effective / largest)
    micro = math.ceil(effective / accum)
    blocks = fewest_checkpointed_blocks(planner, budget, micro, seq) if settings.checkpointing else None
    peak = planner.with_checkpoint_blocks(blocks).estimate(micro, seq).peak
    return replace(train_config, batch_size=micro, grad_accum=accum), peak, blocks


def check_prediction(measured: int, predicted: int, tolerance: float = 0.10, others: int = 0) -> Optional[str]:
    """A warning line when the first step's measured peak, less the `others` bytes live before it that the run
    does not own (FirstStepPeak.others: the plan does not hold them), is more than `tolerance` from the plan."""
    own = measured - others if measured else measured
    if not own or not predicted or abs(own - predicted) <= tolerance * own:
        return None
    besides = f" (besides {others / 2**20:.1f} MiB of other tensors live before it)" if others else ""
    return (f"memory: the first step peaked at {own / 2**30:.2f} GiB{besides}, the plan predicted "
            f"{predicted / 2**30:.2f} GiB ({(predicted - own) / own:+.0%}); the plan assumes the "
            "chunked loss and full-length batches")
