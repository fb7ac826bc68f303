"""Activation (gradient) checkpointing and getting a 4-bit model ready to train.

    import qlora
    model = qlora.load_4bit("smollm2")
    model = qlora.add_lora(model, qlora.LoraConfig(r=16, target_modules="all-linear"))
    qlora.prepare_for_training(model)        # freeze 4-bit layers, checkpoint every block
    model.train()                            # checkpointing only acts in training mode

Checkpointing changes memory, not maths. Without it, autograd keeps every block's intermediate
activations for backward: per block roughly [batch, seq, hidden] x (a dozen tensors) plus the
attention scores and the MLP's [batch, seq, intermediate] tensors. With it, a block keeps only
its input [batch, seq, hidden] and recomputes the rest during backward (one extra forward per
block, ~30% more compute), so activation memory goes from O(layers x per-block activations) to
O(layers x hidden) + one block's worth.

Frozen embeddings: with QLoRA the embedding is frozen, so the hidden states entering the first
block do not require grad. torch's old *reentrant* checkpoint then warns "None of the inputs have
requires_grad=True" and gives the block's parameters (the LoRA adapters) no gradient at all,
silently. The non-reentrant checkpoint (``use_reentrant=False``, the default here) has no such
problem. With ``use_reentrant=True`` we make the inputs require grad (transformers'
``enable_input_require_grads`` hook on the embedding, or the same done by our block wrapper).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora.arch.blocks import is_transformers_model, repeated_module_lists, transformer_blocks
from qlora.arch.heads import in_head_by_name, output_embedding
from qlora.arch.quantized import is_quantized as _is_quantized_layer
from qlora.errors import QLoRAError


# --------------------------------------------------------------------------------------------
# checkpointing a plain nn.Module: each block of its largest repeated nn.ModuleList
# --------------------------------------------------------------------------------------------
def _with_grad_input(args: tuple) -> tuple:
    """For reentrant checkpoint: make sure one floating tensor input requires grad, else
    autograd never enters the checkpointed block in backward and its parameters get no grad."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(t.requires_grad for t in tensors):
        return args
    out, done = [], False
    for a in args:
        if not done and isinstance(a, torch.Tensor) and a.is_floating_point():
            a, done = a.detach().requires_grad_(True), True  # a leaf; its grad is simply unused
        out.append(a)
    return tuple(out)


class CheckpointedForward:
    """Replaces a block's ``forward`` (as an instance attribute): in training with grad enabled
    it runs the block's own forward under ``torch.utils.checkpoint``, else it runs it as is.

    Patching ``forward`` instead of wrapping the block in a new module keeps every parameter
    name unchanged ("layers.3.attn.q_proj.lora_A.weight", not "layers.3.block.attn..."), so
    adapters saved with and without checkpointing are interchangeable. Module hooks of the block
    run once, outside the checkpoint (like transformers' GradientCheckpointingLayer).
    """

    def __init__(self, block: nn.Module, use_reentrant: bool = False):
        self.block = block  # deepcopy of the block maps this to the copy (memo), as it should
        self.use_reentrant = use_reentrant

    def _forward(self, *args, **kwargs):
        return type(self.block).forward(self.block, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if not (self.block.training and torch.is_grad_enabled()):
            return self._forward(*args, **kwargs)
        if not self.use_reentrant:
            # Saves nothing of the block's internals; recomputes them in backward. Works whether
            # or not the inputs require grad.
            return checkpoint(self._forward, *args, use_reentrant=False, **kwargs)
        # Reentrant checkpoint takes no kwargs and needs an input that requires grad.
        fn = functools.partial(self._forward, **kwargs) if kwargs else self._forward
        return checkpoint(fn, *_with_grad_input(args), use_reentrant=True)


def _chosen_blocks(blocks, n: int) -> set[int]:
    """`blocks` (None: all; an int k: the first k; a list: those indices) -> the set of indices."""
    if blocks is None:
        return set(range(n))
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        if not 0 <= blocks <= n:
            raise QLoRAError(f"enable_checkpointing: blocks={blocks} must be between 0 and {n} (the model's blocks)")
        return set(range(blocks))
    if isinstance(blocks, (list, tuple, set)) and all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        bad = [b for b in blocks if not 0 <= b < n]
        if bad:
            raise QLoRAError(f"enable_checkpointing: block index {bad[0]} out of range: the model has {n} blocks (0..{n - 1})")
        return set(blocks)
    raise QLoRAError(f"enable_checkpointing: blocks={blocks!r} must be None (all), a count, or a list of block indices")


def enable_checkpointing(model: nn.Module, *, use_reentrant: bool = False, blocks=None) -> nn.Module:
    """Turn on activation checkpointing for the blocks of ``model``; returns ``model``.

    transformers models: their own mechanism (``activation_checkpointing_enable``, called
    ``gradient_checkpointing_enable`` before transformers 5) with ``use_reentrant`` passed to
    torch. Any other ``nn.Module``: each child of its largest repeated ``nn.ModuleList`` (the
    stack of blocks) runs under ``torch.utils.checkpoint`` when ``model.training`` and grad is
    enabled. Idempotent. Inference (eval or no_grad) is unaffected.

    ``blocks`` (speed for memory): None checkpoints every block; a count ``k`` the *first* k; a list
    those block indices. A block left out keeps all its activations (per Llama block roughly
    ``seq x (14 hidden + 4 intermediate + heads x seq for eager attention)`` values) instead of only its
    input, and skips its recompute (~1/3 of its step time). The first blocks are the ones to checkpoint:
    backward meets the last blocks first, frees their activations, and only then recomputes the
    checkpointed ones, so one recompute never adds to the uncheckpointed blocks' activations.
    """
    if not isinstance(model, nn.Module):
        raise QLoRAError(f"enable_checkpointing needs a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(use_reentrant, bool):
        raise QLoRAError(f"use_reentrant={use_reentrant!r} must be False (recommended) or True")

    if is_transformers_model(model):
        had_input_hooks = bool(getattr(model, "_require_grads_hooks", None) or
                               getattr(model, "_require_grads_hook", None))
        kwargs = {"use_reentrant": use_reentrant}
        if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if use_reentrant:
            # Embedding frozen -> hidden states don't require grad -> reentrant checkpoint would
            # skip the blocks in backward. The hook makes the embedding output require grad.
            if not getattr(model, "_require_grads_hooks", None):
                model.enable_input_require_grads()
        elif not had_input_hooks and callable(getattr(model, "disable_input_require_grads", None)):
            # transformers >= 5 adds that hook unconditionally; non-reentrant checkpoint does not
            # need it, and it would make autograd carry a [batch, seq, hidden] grad for nothing.
            model.disable_input_require_grads()
        layers = transformer_blocks(model)
        if blocks is not None and not layers:
            raise QLoRAError("enable_checkpointing: blocks= needs transformers' per-layer switch "
                             "(GradientCheckpointingLayer, transformers >= 4.53); pass blocks=None")
        chosen = _chosen_blocks(blocks, len(layers))
        for i, layer in enumerate(layers):      # the per-layer switch transformers reads in forward
            layer.gradient_checkpointing = i in chosen
        return model

    stacks = repeated_module_lists(model)
    if not stacks:
        raise QLoRAError(
            f"enable_checkpointing: {type(model).__name__} is not a transformers model with "
            f"checkpointing support and has no nn.ModuleList of >= 2 blocks of one type to checkpoint; "
            f"accepted: a transformers PreTrainedModel, or a module keeping its blocks in an nn.ModuleList "
            f"(prepare_for_training: pass checkpointing=False to train without it)")
    _, stack = stacks[0]
    chosen = _chosen_blocks(blocks, len(stack))
    for i, block in enumerate(stack):
        current = block.__dict__.get("forward")
        if i not in chosen:
            if isinstance(current, CheckpointedForward):
                del block.__dict__["forward"]
            continue
        if isinstance(current, CheckpointedForward):
            current.use_reentrant = use_reentrant  # already on: just update the mode
            continue
        if current is not None:
            raise QLoRAError(f"enable_checkpointing: block {type(block).__name__} already has a patched "
                             f"forward ({current!r}, e.g. an accelerate hook); cannot checkpoint it")
        block.forward = CheckpointedForward(block, use_reentrant)
    return model


def disable_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_checkpointing`; returns ``model``."""
    if is_transformers_model(model):
        if callable(getattr(model, "activation_checkpointing_disable", None)):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        return model
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), CheckpointedForward):
            del module.__dict__["forward"]
    return model


def is_checkpointing(model: nn.Module) -> bool:
    """True when :func:`enable_checkpointing` (or transformers' own switch) is on for ``model``."""
    if is_transformers_model(model):
        for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new name first
            if hasattr(type(model), attr):
                return bool(getattr(model, attr))
        return False
    return any(isinstance(m.__dict__.get("forward"), CheckpointedForward) for m in model.modules())


# --------------------------------------------------------------------------------------------
# prepare_for_training
# --------------------------------------------------------------------------------------------
def _is_norm(module: nn.Module) -> bool:
    # nn.LayerNorm / nn.RMSNorm / nn.GroupNorm and model-specific ones (LlamaRMSNorm, T5LayerNorm...)
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or (
        "norm" in type(module).__name__.lower() and not list(module.children()))


def _upcast_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    out_emb = output_embedding(model)
    targets = []
    for name, module in modules.items():
        if _is_quantized_layer(module):
            continue
        # the head and its insides (a ModulesToSave copy, a classifier's dense/out_proj)
        is_head = module is out_emb or in_head_by_name(name)
        if _is_norm(module) or isinstance(module, nn.Embedding) or is_head:
            targets.append((name, module))
    return targets


def prepare_for_training(model: nn.Module, *, checkpointing: bool = True,
                         upcast_norms: bool = False, checkpoint_blocks=None) -> nn.Module:
    """Get a (4-bit) model ready to train adapters on it; returns ``model``.

    * Freezes the parameters of quantized layers (bitsandbytes Linear4bit / Linear8bitLt: their
      packed weights and their biases). Every other parameter keeps the ``requires_grad`` the
      caller gave it: ``qlora.add_lora`` marks LoRA adapters and modules_to_save copies trainable.
    * ``checkpointing=True``: :func:`enable_checkpointing` (non-reentrant), of the blocks
      ``checkpoint_blocks`` selects (None: all; a count: the first k; a list of indices).
    * ``upcast_norms=True``: casts LayerNorm/RMSNorm, embeddings and the output head to fp32.

    The up-cast trade-off: PEFT's ``prepare_model_for_kbit_training`` casts every non-quantized
    parameter to fp32 for numerical stability. The norms are tiny, but the embedding and output
    head are not: on Llama-3-8B each is a 128256 x 4096 matrix (525M params), 1.05 GB in bf16 and
    2.1 GB in fp32, so embedding + head cost 4.2 GB instead of 2.1 GB -- about 2 GB more, on a
    model whose whole 4-bit body is ~3.5 GB. fp32 norms/head also make the activations after them
    fp32 (twice the bytes). Default here: keep them in the loading dtype (bf16), which is what
    QLoRA trains with in practice; turn ``upcast_norms`` on if fp16 (not bf16) training
    overflows in the norms. Call ``model.train()`` before training: checkpointing only acts then.
    """
    if not isinstance(model, nn.Module):
        raise QLoRAError(f"prepare_for_training needs a torch.nn.Module; got {type(model).__name__}")
    for flag, value in (("checkpointing", checkpointing), ("upcast_norms", upcast_norms)):
        if not isinstance(value, bool):
            raise QLoRAError(f"prepare_for_training: {flag}={value!r} must be True or False")

    for module in model.modules():
        if _is_quantized_layer(module):
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)

    if upcast_norms:
        for _, module in _upcast_targets(model):
            for p in module.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != torch.float32:
                    # In place on .data: the Parameter object (and any tie, e.g. lm_head <->
                    # embed_tokens) stays the same; memory for it doubles from bf16.
                    p.data = p.data.float()
    if checkpointing:
        enable_checkpointing(model, blocks=checkpoint_blocks)
    return model
