"""Loading for FSDP without N copies: rank 0 reads the 4-bit model, every other rank builds it on meta.

    model = qlora.fsdp.load_4bit_once(path)   # under torchrun / accelerate launch, on every rank

`meta_4bit` makes what `qlora.quantize_model` would make, on the meta device (same modules, names,
shapes, dtypes, the same choice of layers); `qlora.fsdp_model` then scatters rank 0's values.
"""
from __future__ import annotations

import torch
import transformers
from torch import nn

from qlora.arch.experts import expert_weight_names
from qlora.arch.quantized import linear_features
from qlora.bundled import resolve_model
from qlora.quant.bnb_fixes import import_bnb
from qlora.quant.convert import conversion_plan, experts_plan, mark_layer
from qlora.quant.experts import chunk_experts, use_qlora_forward
from qlora.quant.load import load_4bit
from qlora.quant.settings import (
    check_blocksize,
    check_compute_dtype,
    check_double_quant,
    check_quant_type,
    check_skip_modules,
)
from qlora.util.dist import is_main_process
from qlora.util.dtypes import dtype_name


def _meta_params4bit(shape: tuple, *, quant_type: str, double_quant: bool, blocksize: int,
                     compute_dtype: torch.dtype, module: nn.Module | None = None):
    """A quantized bitsandbytes Params4bit of a weight of `shape` on the meta device, with the shapes quantization
    gives: packed [ceil(n/2), 1] uint8, absmax [blocks] (uint8 nested, else fp32), nested absmax
    [ceil(blocks/256)], code books [16] / [256], offset []."""
    bnb = import_bnb()
    QuantState = bnb.functional.QuantState
    n = torch.Size(shape).numel()
    blocks = -(-n // blocksize)
    meta = dict(device="meta")
    state2 = (QuantState(absmax=torch.empty(-(-blocks // 256), dtype=torch.float32, **meta),
                         code=torch.empty(256, dtype=torch.float32, **meta), blocksize=256, dtype=torch.float32)
              if double_quant else None)
    qs = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8 if double_quant else torch.float32, **meta),
                    shape=torch.Size(shape), code=torch.empty(16, dtype=torch.float32, **meta),
                    blocksize=blocksize, quant_type=quant_type, dtype=compute_dtype,
                    offset=torch.empty((), dtype=torch.float32, **meta) if double_quant else None, state2=state2)
    return bnb.nn.Params4bit(torch.empty((n + 1) // 2, 1, dtype=torch.uint8, **meta), requires_grad=False,
                             quant_state=qs, blocksize=blocksize, compress_statistics=double_quant,
                             quant_type=quant_type, quant_storage=torch.uint8, bnb_quantized=True, module=module)


def _meta_linear4bit(linear: nn.Module, *, quant_type: str, double_quant: bool, blocksize: int,
                     compute_dtype: torch.dtype):
    """A bitsandbytes Linear4bit on the meta device with the shapes quantization would give."""
    bnb = import_bnb()
    in_f, out_f = linear_features(linear)          # nn.Linear or Conv1D (qlora.arch.quantized)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=linear.bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type,
                              quant_storage=torch.uint8, device="meta")
    layer.weight = _meta_params4bit((out_f, in_f), quant_type=quant_type, double_quant=double_quant,
                                    blocksize=blocksize, compute_dtype=compute_dtype, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(torch.empty(out_f, dtype=compute_dtype, device="meta"), requires_grad=False)
    return layer


def _meta_experts(module: nn.Module, *, quant_type: str, double_quant: bool, blocksize: int,
                  compute_dtype: torch.dtype) -> None:
    """What qlora.quant.experts.quantize_experts makes of an experts module, on the meta device: each 3-D
    matrix a meta Params4bit ([E*a*b/2, 1] uint8) with a meta QuantState of bitsandbytes' whole-tensor shapes."""
    for name in expert_weight_names(module):
        shape = tuple(module._parameters[name].shape)              # [E, a, b]
        module._parameters[name] = _meta_params4bit(shape, quant_type=quant_type, double_quant=double_quant,
                                                    blocksize=blocksize, compute_dtype=compute_dtype)
        bias = module._parameters.get(name + "_bias")
        if bias is not None:
            module._parameters[name + "_bias"] = nn.Parameter(
                torch.empty(bias.shape, dtype=compute_dtype, device="meta"), requires_grad=False)
    module.compute_dtype = compute_dtype
    module.qlora_quantized_from = dtype_name(compute_dtype)
    per_expert = max(module._parameters[n].quant_state.shape[1:].numel() for n in expert_weight_names(module))
    module.qlora_chunk_experts = chunk_experts(module.num_experts, per_expert * torch.finfo(compute_dtype).bits // 8)
    use_qlora_forward(module)


def meta_4bit(model: nn.Module, *, quant_type: str = "nf4", double_quant: bool = True,
              compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
              skip_modules: list[str] | None = None) -> nn.Module:
    """What `qlora.quantize_model` makes of `model`, on the meta device (no memory, no values):
    the same modules, names, shapes and dtypes, for the ranks that receive their shards from rank 0.
    Same arguments and the same choice of layers as `quantize_model`; the other parameters keep
    their dtypes (build `model` in the dtype rank 0 loads in). In place; returns `model`."""
    compute_dtype = check_compute_dtype(compute_dtype)
    kw = dict(quant_type=check_quant_type(quant_type), double_quant=check_double_quant(double_quant),
              blocksize=check_blocksize(blocksize), compute_dtype=compute_dtype)
    model.to(device="meta")
    skip = check_skip_modules(skip_modules)
    to_quantize, _ = conversion_plan(model, skip)
    for name in experts_plan(model, skip):
        _meta_experts(model.get_submodule(name), **kw)
    for name in to_quantize:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = _meta_linear4bit(getattr(parent, child), **kw)
        mark_layer(layer, compute_dtype)                         # the meta quant state's dtype is compute_dtype
        layer.source_cls = type(getattr(parent, child))          # what make_linear4bit records
        layer.train(parent.training)
        setattr(parent, child, layer)
    return model


def load_4bit_once(name_or_path, model_class=None, *, compute_dtype: torch.dtype = torch.bfloat16,
              quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
              skip_modules: list[str] | None = None, **from_pretrained_kwargs) -> nn.Module:
    """`qlora.load_4bit` on rank 0 (into CPU memory unless `device_map` says otherwise); on every
    other rank the same model on the meta device, built from the folder's config.json alone. The
    sharded training takes every value from rank 0, so only one process ever holds the whole model."""
    kw = dict(quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, skip_modules=skip_modules)
    if is_main_process():
        from_pretrained_kwargs.setdefault("device_map", {"": "cpu"})
        return load_4bit(name_or_path, model_class, compute_dtype=compute_dtype, **kw, **from_pretrained_kwargs)

    path = resolve_model(name_or_path)
    model_class = model_class or transformers.AutoModelForCausalLM
    keys = ("trust_remote_code", "revision", "token", "cache_dir", "subfolder")
    config = transformers.AutoConfig.from_pretrained(path, **{k: from_pretrained_kwargs[k] for k in keys
                                                              if k in from_pretrained_kwargs})
    factory = getattr(model_class, "from_config", None) or model_class._from_config
    extra = {"trust_remote_code": True} if from_pretrained_kwargs.get("trust_remote_code") else {}
    with torch.device("meta"):      # as from_pretrained builds it: parameters in compute_dtype, buffers their own
        skeleton = factory(config, dtype=compute_dtype, **extra)
    skeleton.eval()                 # from_pretrained returns eval-mode models
    return meta_4bit(skeleton, compute_dtype=compute_dtype, **kw)
