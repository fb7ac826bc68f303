"""Byte accounting for the tensors a model owns: storages counted once, 4-bit weights unpacked.

Memory belongs to storages, not tensors: a view (`w.t()`, `x[:, 0]`) or a tied weight shares its
owner's storage and costs nothing extra. Every count here therefore goes through `storage_key`
and counts each storage's `nbytes()` once.

    from memprofile.tensors import weight_bytes, param_counts
    weight_bytes(model)  # {"weights_quantized": ..., "weights_frozen": ..., "weights_trainable": ...}
    param_counts(model)  # (trainable_params, total_params), 4-bit weights counted unpacked
    unpacked_numel(p)    # weights a parameter stands for (a 4-bit one: its original shape's count)

A bitsandbytes `Params4bit` holds the packed 4-bit data (uint8, two values a byte) and, on the side,
a `quant_state`: `absmax` (one per 64-value block; uint8 when double-quantized), `code` (the 16
NF4 levels, fp32), `offset` (fp32 scalar) and `state2` (the second-level quantization of absmax:
fp32 `absmax` per 256 blocks and a 256-entry fp32 `code`). `quant_state_tensors` yields all of them.
Duck-typed: nothing here imports bitsandbytes.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

CATEGORIES = (
    "weights_quantized",
    "weights_frozen",
    "weights_trainable",
    "gradients",
    "optimizer",
    "activations",
    "peak",
)
"""The byte categories every measurement and estimate reports, in this order."""


def storage_key(t: torch.Tensor) -> tuple:
    """Identity of the storage behind `t` (shared by all its views)."""
    s = t.untyped_storage()
    if s.device.type == "meta":  # meta and fake tensors: no data, the StorageImpl is the identity
        return ("impl", s._cdata)
    ptr = s.data_ptr()
    # Meta tensors and empty storages have no data pointer: fall back to the StorageImpl address.
    return (t.device.type, t.device.index, ptr) if ptr else ("impl", s._cdata)


def storage_nbytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


def unique_storage_bytes(tensors: Iterable[torch.Tensor], seen: set | None = None) -> int:
    """Bytes of the distinct storages behind `tensors`; keys are added to `seen` if given."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        k = storage_key(t)
        if k in seen:
            continue
        seen.add(k)
        total += storage_nbytes(t)
    return total


def is_4bit_param(p) -> bool:
    """A bitsandbytes Params4bit holding packed 4-bit codes (a Linear4bit's weight, or a 4-bit experts
    matrix). Duck-typed: it carries a quant_state and a quant_type. The one rule: qlora.arch.quantized
    re-exports it, and its module-level is_4bit (a Linear4bit, quantized or not yet) sits beside it."""
    return getattr(p, "quant_state", None) is not None and hasattr(p, "quant_type")


def quant_state_tensors(qs) -> Iterator[torch.Tensor]:
    """Every tensor a bitsandbytes QuantState holds, nested state2 included."""
    if qs is None:
        return
    for name in ("absmax", "code", "offset"):
        t = getattr(qs, name, None) if not isinstance(qs, dict) else qs.get(name)
        if isinstance(t, torch.Tensor):
            yield t
    yield from quant_state_tensors(getattr(qs, "state2", None))


def unpacked_shape(p: torch.Tensor) -> torch.Size:
    """The shape of the weights a parameter stands for: a 4-bit one's original shape (its quant_state's),
    not the packed [n/2, 1] codes; any other parameter's own shape. (A 4-bit one without a recorded shape:
    flat, two 4-bit values per byte of its storage.)"""
    if is_4bit_param(p):
        shape = getattr(p.quant_state, "shape", None)
        if shape is not None:
            return torch.Size(shape)
        return torch.Size([p.numel() * p.element_size() * 2])   # packed: two 4-bit values per byte
    return p.shape


def unpacked_numel(p: torch.Tensor) -> int:
    """Number of weights a parameter stands for: a 4-bit Params4bit counts as its original shape."""
    return int(unpacked_shape(p).numel())


def model_state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(category, tensor) for every parameter, buffer and quant-state tensor of `model`."""
    for p in model.parameters():
        if is_4bit_param(p):
            yield "weights_quantized", p
            for t in quant_state_tensors(p.quant_state):
                yield "weights_quantized", t
    for p in model.parameters():
        if not is_4bit_param(p):
            yield ("weights_trainable" if p.requires_grad else "weights_frozen"), p
    for b in model.buffers():
        yield "weights_frozen", b
    # Some wrappers keep the quant state on the module as well; usually the same object.
    for m in model.modules():
        qs = m.__dict__.get("quant_state")
        if qs is not None and not isinstance(qs, torch.Tensor):
            for t in quant_state_tensors(qs):
                yield "weights_quantized", t


def weight_bytes(model: nn.Module, seen: set | None = None) -> dict[str, int]:
    """Bytes of the model's own tensors by category, each storage once (first category wins:
    quantized, then trainable/frozen in parameter order, then buffers)."""
    seen = set() if seen is None else seen
    out = {"weights_quantized": 0, "weights_frozen": 0, "weights_trainable": 0}
    for cat, t in model_state_tensors(model):
        k = storage_key(t)
        if k in seen:
            continue
        seen.add(k)
        out[cat] += storage_nbytes(t)
    return out


def model_storage_keys(model: nn.Module) -> set:
    return {storage_key(t) for _, t in model_state_tensors(model)}


def counted_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters a model's forward runs with, each once (tied ones once), in module order: all of
    them but those held only by the frozen original of a `modules_to_save` wrapper (qlora's
    ModulesToSave, PEFT's ModulesToSaveWrapper: a module with children `original_module` and
    `modules_to_save`, the trained copy standing in for the original). A parameter the original shares
    with another module (an lm_head tied to the embeddings) is counted there. Memory is another matter:
    weight_bytes counts the original's storages too."""
    seen_params, seen_modules = set(), set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        for p in module._parameters.values():
            if p is not None and id(p) not in seen_params:
                seen_params.add(id(p))
                yield p
        children = module._modules
        wrapper = "original_module" in children and "modules_to_save" in children
        stack.extend(child for name, child in reversed(children.items())
                     if child is not None and not (wrapper and name == "original_module"))


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of `counted_parameters` (a modules_to_save wrapper's frozen
    original not counted: its trained copy stands in for it), 4-bit weights unpacked. The one count:
    qlora.count_parameters and print_trainable_parameters are this."""
    trainable = total = 0
    for p in counted_parameters(model):
        n = unpacked_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def param_dtypes(model: nn.Module) -> dict[str, int]:
    """Parameter count per storage dtype over `counted_parameters`, e.g. {"bfloat16": 1200, "nf4": 4096}
    (4-bit ones by their quant_type, unpacked); the counts add up to param_counts' total."""
    out: dict[str, int] = {}
    for p in counted_parameters(model):
        name = str(getattr(p, "quant_type", "4bit")) if is_4bit_param(p) else str(p.dtype).replace("torch.", "")
        out[name] = out.get(name, 0) + unpacked_numel(p)
    return out


def nested_tensors(obj) -> Iterator[torch.Tensor]:
    """Tensors inside a batch: a tensor, or dicts/lists/tuples of them (other leaves ignored)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict) or hasattr(obj, "items"):
        for v in obj.values():
            yield from nested_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from nested_tensors(v)
