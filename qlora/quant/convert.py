"""The 4-bit base of QLoRA: NF4 (or FP4) weights through bitsandbytes, on CPU or CUDA.

Two ways in, one result (every quantizable ``nn.Linear``, and transformers' ``Conv1D`` from its
transposed weight, becomes a ``bitsandbytes.nn.Linear4bit``; qlora.arch.quantized has the rule):

    import qlora, torch
    from transformers import AutoModel
    model = qlora.load_4bit("smollm2")                      # folder, Hub id, or bundled name
    enc = qlora.load_4bit("minilm", AutoModel)              # any AutoModelFor... class
    model = qlora.quantize_model(my_module)                 # any in-memory nn.Module, in place
    qlora.quant.convert.quant_settings(model)
    # {'quant_type': 'nf4', 'blocksize': 64, 'double_quant': True,
    #  'compute_dtype': 'bfloat16', 'quantized_from_dtype': 'bfloat16'}

What is kept in higher precision: the output head (modules named ``lm_head``, ``classifier`` or
``score`` and whatever ``get_output_embeddings()`` returns), embeddings and norms (they are not
``nn.Linear``), biases (in ``compute_dtype``), anything in ``skip_modules``, and an image-text model's
vision / audio towers and projector (qlora.arch.multimodal; ``quantize_vision=True`` makes them 4-bit too).

Memory: a [out, in] weight becomes ``out*in/2`` bytes of packed 4-bit codes (two codes per uint8)
plus one absmax per block of ``blocksize`` weights. With double quantization those absmax are
themselves stored as uint8 (one fp32 scale per 256 of them, plus one fp32 mean offset), so at
blocksize 64 the cost is 4 + 8/64 + 32/(64*256) = 4.127 bits per weight, against 16 for bf16.
Without double quantization: 4 + 32/64 = 4.5 bits.

Exactness: bitsandbytes computes codes and absmax in fp32 from whatever dtype it is given, so
the codes depend on the *values* -- an fp32 weight and its bf16 rounding can give different
codes -- and ``dequantize_4bit`` returns the dtype that was quantized. Every 4-bit layer made
here records that dtype as ``layer.qlora_quantized_from`` (``quant_settings()`` reports it), so
an exporter can rebuild the training-time weights bit for bit:
``quantize_4bit(W.to(quantized_from_dtype), blocksize=..., compress_statistics=double_quant,
quant_type=...)``. Both paths quantize from ``compute_dtype`` by default (``load_4bit`` loads in
``dtype=compute_dtype``, which is the dtype transformers quantizes from).

The one place a ``Params4bit`` is built is :func:`make_params4bit`; quantization is explicit
(``Params4bit._quantize``), never a side effect of ``.to(device)``, so it happens on CPU too.
"""
from __future__ import annotations

import torch
from torch import nn

from memprofile.units import human
from qlora.arch.experts import is_experts_module, is_router
from qlora.arch.heads import output_head_paths
from qlora.arch.multimodal import in_towers, tower_paths
from qlora.arch.names import matches_parts
from qlora.arch.quantized import is_4bit, is_4bit_param, is_conv1d, is_linear, linear_features, runs_as_linear
from qlora.errors import QLoRAError
from qlora.quant.bnb_fixes import import_bnb
from qlora.quant.experts import quantize_experts
from qlora.quant.inspect import quant_settings
from qlora.quant.settings import (
    check_blocksize,
    check_compute_dtype,
    check_double_quant,
    check_quant_type,
    check_skip_modules,
)
from qlora.util.dtypes import dtype_name

# Modules that stay in compute_dtype: the output head (qlora.arch.heads) -- it is small next to the body
# and is where rounding hurts most.
# Insides of LoRA wrappers (qlora.lora.layers): the adapters and trainable copies are never quantized.
_ADAPTER_PARTS = ("lora_A", "lora_B", "modules_to_save", "original_module")


def make_params4bit(weight: torch.Tensor, *, quant_type: str, double_quant: bool, blocksize: int,
                    quant_storage: torch.dtype = torch.uint8, module: nn.Module | None = None):
    """Quantize a float [out, in] weight into a ``bitsandbytes.nn.Params4bit``, on its own device.

    The codes come from ``weight`` exactly as given (its dtype is what ``dequantize_4bit`` will
    return): cast it first if you want another one. Result: data [out*in/2, 1] uint8 (two 4-bit
    codes per byte) and ``.quant_state`` with absmax per block (uint8 + nested fp32 scales when
    ``double_quant``, else fp32), the 16-entry code book and the original shape/dtype.
    """
    bnb = import_bnb()
    quant_type = check_quant_type(quant_type)
    blocksize = check_blocksize(blocksize)
    double_quant = check_double_quant(double_quant)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in (
            torch.float32, torch.bfloat16, torch.float16):
        raise QLoRAError(f"make_params4bit needs a 2-D float16/bfloat16/float32 weight [out, in]; got "
                         f"{type(weight).__name__} {getattr(weight, 'dtype', '')} "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.device.type == "meta":
        raise QLoRAError("make_params4bit got a weight on the meta device (no values to quantize); "
                         "load the real weights first")
    param = bnb.nn.Params4bit(
        weight.detach().contiguous(), requires_grad=False, blocksize=blocksize,
        compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage,
        module=module)
    # Explicit: quantize here, on the weight's device. (Params4bit.to(device) only quantizes as a
    # side effect of a device move of a not-yet-quantized parameter.) The float data is dropped:
    # memory for this weight goes from 2 or 4 bytes to ~0.52 bytes per value.
    param._quantize(weight.device)
    assert param.bnb_quantized and param.quant_state is not None
    return param


def make_linear4bit(linear: nn.Module, *, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64):
    """A ``bitsandbytes.nn.Linear4bit`` holding ``linear``'s weight quantized from ``compute_dtype``.

    ``linear``: an ``nn.Linear`` or transformers' ``Conv1D``, whose [in, out] weight is quantized as
    its transpose [out, in] (the codes transformers' 4-bit loader makes for it); the layer records
    ``source_cls`` (transformers' attribute) so exports write the weight back as [in, out].

    The bias (if any) is copied in ``compute_dtype`` (Linear4bit casts it to the compute dtype
    in its forward anyway -- in place -- so storing it that way avoids a silent dtype change).
    """
    bnb = import_bnb()
    compute_dtype = check_compute_dtype(compute_dtype)
    # Built on the meta device: no throw-away random fp32 [out, in] weight is allocated.
    in_features, out_features = linear_features(linear)
    weight = linear.weight.T if is_conv1d(linear) else linear.weight        # [out, in]
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type=quant_type, quant_storage=torch.uint8, device="meta")
    with torch.no_grad():
        # Cast to compute_dtype first (a transient [out, in] copy when the dtypes differ): the
        # same values transformers quantizes when loading with dtype=compute_dtype, and the
        # values the forward dequantizes to.
        layer.weight = make_params4bit(weight.to(compute_dtype), quant_type=quant_type,
                                       double_quant=double_quant, blocksize=blocksize, module=layer)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype),
                                      requires_grad=linear.bias.requires_grad)
    mark_layer(layer, compute_dtype)
    layer.source_cls = type(linear)
    layer.train(linear.training)
    return layer


def mark_layer(layer: nn.Module, compute_dtype: torch.dtype) -> None:
    """Make a Linear4bit's settings explicit and record what it was quantized from."""
    layer.compute_dtype = compute_dtype
    layer.compute_type_is_set = True  # else the first input's dtype silently overrides it
    # bitsandbytes repacks the weight in place for its AVX512-BF16 CPU kernel on the first
    # eval/no-grad forward: it un-nests the absmax into bf16 (rounding it), so the layer would no
    # longer hold the training-time weights and saving re-quantizes them lossily. Keep the
    # standard layout (slower CPU inference on such CPUs, exact weights everywhere).
    layer.support_avx512bf16_for_cpu = False
    layer.qlora_quantized_from = dtype_name(layer.weight.quant_state.dtype)
    layer.weight.requires_grad_(False)


def float_towers(model: nn.Module, quantize_vision: bool = False) -> list[str]:
    """The towers of an image-text model that stay in compute_dtype (qlora.arch.multimodal: vision / audio
    encoders, projectors): all of them, none with `quantize_vision`."""
    return [] if quantize_vision else tower_paths(model)


def conversion_plan(model: nn.Module, skip: list[str], quantize_vision: bool = False) -> tuple[list[str], list[str]]:
    """(names of linear layers to quantize, names kept) for a model or a meta skeleton (quantized.is_linear:
    nn.Linear or Conv1D). An image-text model's towers are kept unless `quantize_vision` (float_towers)."""
    modules = dict(model.named_modules())
    heads = output_head_paths(model)
    towers = float_towers(model, quantize_vision)
    for pattern in skip:
        if not any(matches_parts(n, pattern) for n in modules if n):
            sample = [n for n, m in modules.items() if is_linear(m)][:6]
            raise QLoRAError(f"skip_modules entry {pattern!r} matches no module of "
                             f"{type(model).__name__}; Linear layers are named like {sample}")
    to_quantize, kept = [], []
    for name, module in modules.items():
        if not is_linear(module) or is_4bit(module):
            continue
        parent = modules[name.rpartition(".")[0]] if "." in name else model
        if (name in heads or any(h and name.startswith(h + ".") for h in heads) or is_router(module, parent)
                or not runs_as_linear(module)                  # a forward of its own that needs its float weight
                or any(p in _ADAPTER_PARTS for p in name.split("."))
                or isinstance(parent, nn.MultiheadAttention)  # reads out_proj.weight directly
                or in_towers(name, towers)
                or any(matches_parts(name, p) for p in skip)):
            kept.append(name)
        else:
            to_quantize.append(name)
    return to_quantize, kept


def experts_plan(model: nn.Module, skip: list[str], quantize_vision: bool = False) -> list[str]:
    """Names of the experts modules (qlora.arch.experts: transformers' fused 3-D experts) whose matrices
    quantize_model makes 4-bit: all but those matching skip_modules, inside an adapter wrapper or a float tower
    (float_towers), or already 4-bit."""
    towers = float_towers(model, quantize_vision)
    return [name for name, module in model.named_modules()
            if is_experts_module(module) and not any(is_4bit_param(p) for p in module.parameters(recurse=False))
            and not any(p in _ADAPTER_PARTS for p in name.split("."))
            and not any(matches_parts(name, p) for p in skip) and not in_towers(name, towers)]


def quantize_model(model: nn.Module, *, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                   skip_modules: list[str] | None = None, quantize_vision: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` (and ``Conv1D``) of ``model`` by a 4-bit ``bitsandbytes.nn.Linear4bit``, and
    every fused 3-D experts matrix by a 4-bit one (qlora.quant.experts), in place.

    Kept as they are: the output head (``lm_head``/``classifier``/``score`` and whatever
    ``get_output_embeddings()`` returns), LoRA adapter matrices, ``nn.MultiheadAttention``'s
    out_proj, and every module matching ``skip_modules`` (whole dotted parts: 'down_proj',
    'mlp.down_proj', 'layers.0'), and an image-text model's vision / audio towers and projector
    (qlora.arch.multimodal) unless ``quantize_vision``. Weights are quantized from ``compute_dtype`` on their
    current device; biases are stored in ``compute_dtype``; everything else keeps its dtype. Layer by
    layer, so peak extra memory is one layer's weight in ``compute_dtype``.
    Returns ``model``.
    """
    quant_type = check_quant_type(quant_type)
    blocksize = check_blocksize(blocksize)
    compute_dtype = check_compute_dtype(compute_dtype)
    double_quant = check_double_quant(double_quant)
    skip = check_skip_modules(skip_modules)
    if not isinstance(model, nn.Module):
        raise QLoRAError(f"quantize_model needs a torch.nn.Module; got {type(model).__name__}")

    to_quantize, kept = conversion_plan(model, skip, quantize_vision)
    experts = experts_plan(model, skip, quantize_vision)
    if not to_quantize and not experts:
        existing = quant_settings(model)
        if existing is not None:
            asked = {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
                     "compute_dtype": dtype_name(compute_dtype)}
            differ = {k: (existing[k], v) for k, v in asked.items() if existing[k] != v}
            if differ:
                raise QLoRAError(f"{type(model).__name__} is already 4-bit with other settings "
                                 f"(have, asked): {differ}; start again from the float model")
            return model  # already quantized the same way
        raise QLoRAError(
            f"quantize_model found nothing to quantize in {type(model).__name__}: it needs at least one "
            f"torch.nn.Linear (or transformers Conv1D) outside the output head and skip_modules={skip}; "
            f"Linear layers kept: {kept[:8]}{' ...' if len(kept) > 8 else ''}")

    for name in to_quantize:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        # One layer at a time: the float [out, in] weight is released when `linear` goes away.
        setattr(parent, child, make_linear4bit(linear, quant_type=quant_type, double_quant=double_quant,
                                               compute_dtype=compute_dtype, blocksize=blocksize))
        del linear
    for name in experts:     # one experts module at a time: its float matrices are released as it goes
        quantize_experts(model.get_submodule(name), quant_type=quant_type, double_quant=double_quant,
                         compute_dtype=compute_dtype, blocksize=blocksize)
    say_float_matrices(model)
    return model


def float_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """3-D float parameters [n > 1, a, b] outside transformers' experts interface and outside convolutions (a
    position embedding [1, n, d] is not one): the experts of families whose layout the interface does not
    describe (Llama 4 text, DBRX, JetMoE), which stay 16-bit. An image-text model's towers have no experts (Gemma 4's
    vision position table [2, n, d] is not one)."""
    out, towers = {}, tower_paths(model)
    for name, module in model.named_modules():
        if is_experts_module(module) or isinstance(module, nn.modules.conv._ConvNd) or in_towers(name, towers):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim == 3 and p.shape[0] > 1 and p.is_floating_point() and not is_4bit_param(p):
                out[f"{name}.{pname}" if name else pname] = p
    return out


def say_float_matrices(model: nn.Module) -> None:
    """One line when some experts stay in float (float_matrices): which, and their bytes."""
    left = float_matrices(model)
    if left:
        first, p = next(iter(left.items()))
        size = sum(t.numel() * t.element_size() for t in left.values())
        more = ", ..." if len(left) > 1 else ""
        print(f"note: {len(left)} expert matrices stay {str(p.dtype).removeprefix('torch.')} ({human(size)}): their "
              f"layout is outside transformers' experts interface ({first} {list(p.shape)}{more}); "
              "the model's Linear layers are 4-bit")
