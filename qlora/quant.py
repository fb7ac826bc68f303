"""The 4-bit base of QLoRA: NF4 (or FP4) weights through bitsandbytes, on CPU or CUDA.

Two ways in, one result (every quantizable ``nn.Linear``, and transformers' ``Conv1D`` from its
transposed weight, becomes a ``bitsandbytes.nn.Linear4bit``; qlora.quantized has the rule):

    import qlora, torch
    from transformers import AutoModel
    model = qlora.load_4bit("smollm2")                      # folder, Hub id, or bundled name
    enc = qlora.load_4bit("minilm", AutoModel)              # any AutoModelFor... class
    model = qlora.quantize_model(my_module)                 # any in-memory nn.Module, in place
    qlora.quant.quant_settings(model)
    # {'quant_type': 'nf4', 'blocksize': 64, 'double_quant': True,
    #  'compute_dtype': 'bfloat16', 'quantized_from_dtype': 'bfloat16'}

What is kept in higher precision: the output head (modules named ``lm_head``, ``classifier`` or
``score`` and whatever ``get_output_embeddings()`` returns), embeddings and norms (they are not
``nn.Linear``), biases (in ``compute_dtype``), and anything in ``skip_modules``.

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

import copy
import os
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qlora.config import _DTYPES, dtype_name
from qlora.errors import QLoRAError
from qlora.heads import OUTPUT_HEAD_NAMES, output_head_paths
from qlora.names import matches_parts as _name_matches
from qlora.quantized import is_4bit as is_linear4bit  # noqa: F401  (re-exported: qlora.quant.is_linear4bit)
from qlora.quantized import is_conv1d, is_linear, linear_features

QUANT_TYPES = ("nf4", "fp4")
# What bitsandbytes.functional.quantize_4bit accepts (CPU and CUDA alike; 32 is CUDA/CPU only,
# not ROCm with 64-wide warps).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Modules that stay in compute_dtype: the output head (qlora.heads) -- it is small next to the body
# and is where rounding hurts most.
# Insides of LoRA wrappers (qlora.lora): the adapters and trainable copies are never quantized.
_ADAPTER_PARTS = ("lora_A", "lora_B", "modules_to_save", "original_module")
# transformers' BitsAndBytesConfig has no block size: its Linear4bit placeholders use 64.
_TRANSFORMERS_BLOCKSIZE = 64


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def check_quant_type(quant_type: Any) -> str:
    if not isinstance(quant_type, str) or quant_type.lower() not in QUANT_TYPES:
        raise QLoRAError(f"quant_type={quant_type!r} is not supported; accepted: 'nf4' (QLoRA's "
                         f"NormalFloat4, the default) or 'fp4'")
    return quant_type.lower()


def check_blocksize(blocksize: Any) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise QLoRAError(f"blocksize={blocksize!r} is not supported by bitsandbytes 4-bit "
                         f"quantization; accepted: {', '.join(map(str, BLOCKSIZES))} (64 is QLoRA's)")
    return blocksize


def check_compute_dtype(compute_dtype: Any) -> torch.dtype:
    if isinstance(compute_dtype, str) and compute_dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[compute_dtype.lower().removeprefix("torch.")]
    if isinstance(compute_dtype, torch.dtype) and compute_dtype in (torch.float32, torch.bfloat16, torch.float16):
        return compute_dtype
    raise QLoRAError(f"compute_dtype={compute_dtype!r} is not a float type 4-bit layers can compute in; "
                     f"accepted: torch.bfloat16 (default), torch.float16, torch.float32 "
                     f"(or the strings 'bfloat16'/'bf16', 'float16'/'fp16', 'float32'/'fp32')")


def check_double_quant(double_quant: Any) -> bool:
    if not isinstance(double_quant, bool):
        raise QLoRAError(f"double_quant={double_quant!r} must be True (quantize the block constants "
                         f"too, ~0.37 bits/weight saved) or False")
    return double_quant


def _check_skip_modules(skip_modules: Any) -> list[str]:
    if skip_modules is None:
        return []
    if isinstance(skip_modules, str):
        skip_modules = [skip_modules]
    if not isinstance(skip_modules, Iterable) or not all(isinstance(s, str) and s for s in skip_modules):
        raise QLoRAError(f"skip_modules={skip_modules!r} must be a list of module names such as "
                         f"['lm_head', 'mlp.down_proj', 'layers.0'] (a name matches whole dotted "
                         f"parts of a module path)")
    return list(skip_modules)


# --------------------------------------------------------------------------------------------
# the one place a Params4bit is built
# --------------------------------------------------------------------------------------------
def make_params4bit(weight: torch.Tensor, *, quant_type: str, double_quant: bool, blocksize: int,
                    quant_storage: torch.dtype = torch.uint8, module: nn.Module | None = None):
    """Quantize a float [out, in] weight into a ``bitsandbytes.nn.Params4bit``, on its own device.

    The codes come from ``weight`` exactly as given (its dtype is what ``dequantize_4bit`` will
    return): cast it first if you want another one. Result: data [out*in/2, 1] uint8 (two 4-bit
    codes per byte) and ``.quant_state`` with absmax per block (uint8 + nested fp32 scales when
    ``double_quant``, else fp32), the 16-entry code book and the original shape/dtype.
    """
    import bitsandbytes as bnb
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
    import bitsandbytes as bnb
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
    _mark_layer(layer, compute_dtype)
    layer.source_cls = type(linear)
    layer.train(linear.training)
    return layer


def _mark_layer(layer: nn.Module, compute_dtype: torch.dtype) -> None:
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


# --------------------------------------------------------------------------------------------
# quantize_model
# --------------------------------------------------------------------------------------------
def _plan(model: nn.Module, skip: list[str]) -> tuple[list[str], list[str]]:
    """(names of linear layers to quantize, names kept) for a model or a meta skeleton (quantized.is_linear:
    nn.Linear or Conv1D)."""
    import bitsandbytes as bnb
    modules = dict(model.named_modules())
    heads = output_head_paths(model)
    for pattern in skip:
        if not any(_name_matches(n, pattern) for n in modules if n):
            sample = [n for n, m in modules.items() if is_linear(m)][:6]
            raise QLoRAError(f"skip_modules entry {pattern!r} matches no module of "
                             f"{type(model).__name__}; Linear layers are named like {sample}")
    to_quantize, kept = [], []
    for name, module in modules.items():
        if not is_linear(module) or isinstance(module, bnb.nn.Linear4bit):
            continue
        parent = modules[name.rpartition(".")[0]] if "." in name else model
        if (name in heads or any(h and name.startswith(h + ".") for h in heads)
                or any(p in _ADAPTER_PARTS for p in name.split("."))
                or isinstance(parent, nn.MultiheadAttention)  # reads out_proj.weight directly
                or any(_name_matches(name, p) for p in skip)):
            kept.append(name)
        else:
            to_quantize.append(name)
    return to_quantize, kept


def quantize_model(model: nn.Module, *, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                   skip_modules: list[str] | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` (and ``Conv1D``) of ``model`` by a 4-bit ``bitsandbytes.nn.Linear4bit``, in place.

    Kept as they are: the output head (``lm_head``/``classifier``/``score`` and whatever
    ``get_output_embeddings()`` returns), LoRA adapter matrices, ``nn.MultiheadAttention``'s
    out_proj, and every module matching ``skip_modules`` (whole dotted parts: 'down_proj',
    'mlp.down_proj', 'layers.0'). Weights are quantized from ``compute_dtype`` on their current
    device; biases are stored in ``compute_dtype``; everything else keeps its dtype. Layer by
    layer, so peak extra memory is one layer's weight in ``compute_dtype``.
    Returns ``model``.
    """
    quant_type = check_quant_type(quant_type)
    blocksize = check_blocksize(blocksize)
    compute_dtype = check_compute_dtype(compute_dtype)
    double_quant = check_double_quant(double_quant)
    skip = _check_skip_modules(skip_modules)
    if not isinstance(model, nn.Module):
        raise QLoRAError(f"quantize_model needs a torch.nn.Module; got {type(model).__name__}")

    to_quantize, kept = _plan(model, skip)
    if not to_quantize:
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
    return model


# --------------------------------------------------------------------------------------------
# load_4bit
# --------------------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _check_folder(folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise QLoRAError(f"model folder {folder!r} has no config.json; a Hugging Face model folder "
                         f"holds config.json plus weights ({', '.join(_WEIGHT_FILES)})")
    names = os.listdir(folder)
    if not any(n in _WEIGHT_FILES or n.endswith(".safetensors") for n in names):
        ggufs = [n for n in names if n.endswith(".gguf")]
        hint = (f" It holds GGUF file(s) {ggufs}: convert them to safetensors first (see "
                f"qlora.bundled.smollm2_path for how)." if ggufs else "")
        raise QLoRAError(f"model folder {folder!r} has config.json but no weights; accepted: "
                         f"{', '.join(_WEIGHT_FILES)} or *.safetensors shards.{hint}")


def _skeleton(path: str, model_class, kwargs: dict) -> nn.Module | None:
    """The model built on the meta device (no memory, no weights read), or None if that fails."""
    try:
        from transformers import AutoConfig
        keys = ("trust_remote_code", "revision", "token", "cache_dir", "local_files_only", "subfolder")
        config = AutoConfig.from_pretrained(path, **{k: kwargs[k] for k in keys if k in kwargs})
        factory = getattr(model_class, "from_config", None) or model_class._from_config
        with torch.device("meta"):
            return factory(config, **({"trust_remote_code": True} if kwargs.get("trust_remote_code") else {}))
    except Exception:  # noqa: BLE001 -- any failure: fall back to name patterns, from_pretrained reports
        return None


class _BlocksizeForTransformers:
    """Sets the block size of the Linear4bit placeholders transformers creates before it loads
    weights (BitsAndBytesConfig has no block size; its Bnb4bitQuantize copies the placeholder's
    Params4bit attributes, blocksize included). Only used for blocksize != 64 and verified after
    loading. It swaps a module attribute of transformers for the duration of one load, so it is
    not safe to run two such loads concurrently in threads of one process."""

    def __init__(self, blocksize: int):
        self.blocksize = blocksize

    def __enter__(self):
        import bitsandbytes as bnb
        import transformers.integrations as integrations
        self.integrations, self.original = integrations, integrations.replace_with_bnb_linear
        blocksize = self.blocksize

        def replace_with_bnb_linear(model, *args, **kwargs):
            model = self.original(model, *args, **kwargs)
            for module in model.modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    module.weight.blocksize = blocksize
            return model

        integrations.replace_with_bnb_linear = replace_with_bnb_linear
        return self

    def __exit__(self, *exc):
        self.integrations.replace_with_bnb_linear = self.original


def load_4bit(name_or_path, model_class=None, *, quant_type: str = "nf4", double_quant: bool = True,
              compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
              skip_modules: list[str] | None = None, **from_pretrained_kwargs) -> nn.Module:
    """Load a Hugging Face model with its Linear layers in 4-bit (bitsandbytes via transformers).

    ``name_or_path``: a model folder, a Hub id, or a bundled name ('smollm2', 'minilm'; see
    qlora.bundled). ``model_class``: ``AutoModelForCausalLM`` (default) or any ``AutoModelFor...``
    / concrete transformers class. Weights are streamed from disk and quantized tensor by tensor,
    so the full-precision model never sits in memory. The output head (lm_head / classifier /
    score, get_output_embeddings()), embeddings and norms stay in ``compute_dtype`` (the loading
    dtype; transformers quantizes from it, so it is recorded as ``quantized_from_dtype``).
    ``skip_modules`` keeps more modules unquantized (same matching as ``quantize_model``).
    Other keyword arguments (``device_map``, ``trust_remote_code``, ``revision``, ...) go to
    ``from_pretrained``; without ``device_map`` transformers picks the first CUDA GPU, else CPU.
    """
    quant_type = check_quant_type(quant_type)
    blocksize = check_blocksize(blocksize)
    compute_dtype = check_compute_dtype(compute_dtype)
    double_quant = check_double_quant(double_quant)
    skip = _check_skip_modules(skip_modules)
    if "quantization_config" in from_pretrained_kwargs:
        raise QLoRAError("load_4bit builds its own BitsAndBytesConfig; instead of quantization_config "
                         "pass quant_type=, double_quant=, compute_dtype=, blocksize=, skip_modules=")
    if from_pretrained_kwargs.get("load_in_4bit") or from_pretrained_kwargs.get("load_in_8bit"):
        raise QLoRAError("load_4bit already loads in 4-bit; drop load_in_4bit/load_in_8bit")
    if "torch_dtype" in from_pretrained_kwargs:  # the pre-v5 name
        from_pretrained_kwargs.setdefault("dtype", from_pretrained_kwargs.pop("torch_dtype"))
    if "dtype" in from_pretrained_kwargs:
        from_pretrained_kwargs["dtype"] = check_compute_dtype(from_pretrained_kwargs["dtype"])
    else:
        from_pretrained_kwargs["dtype"] = compute_dtype

    from qlora.bundled import resolve_model
    path = resolve_model(name_or_path)
    if os.path.isdir(path):
        _check_folder(path)
        from_pretrained_kwargs.setdefault("local_files_only", True)  # a local folder: never ask the Hub

    import transformers
    from transformers import BitsAndBytesConfig
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    if not callable(getattr(model_class, "from_pretrained", None)):
        raise QLoRAError(f"model_class={model_class!r} has no from_pretrained; accepted: a transformers "
                         f"class such as AutoModelForCausalLM, AutoModel, AutoModelForSequenceClassification")

    skeleton = _skeleton(path, model_class, from_pretrained_kwargs)
    transformers_converts = True      # whether transformers' loader has any layer of ours to quantize
    if skeleton is not None:
        to_quantize, kept = _plan(skeleton, skip)
        if not to_quantize:
            raise QLoRAError(f"load_4bit found nothing to quantize in {type(skeleton).__name__} from "
                             f"{path!r}: no torch.nn.Linear outside the output head and "
                             f"skip_modules={skip}; Linear layers kept: {kept[:8]}")
        # Exact module paths (regex-escaped: transformers matches them as patterns). An explicit
        # list also switches off transformers' own default skips, which would differ from ours.
        llm_int8_skip_modules = [re.escape(n) for n in kept]
        modules = dict(skeleton.named_modules())
        transformers_converts = any(type(modules[n]) is nn.Linear or is_conv1d(modules[n]) for n in to_quantize)
        del skeleton, modules
    else:
        llm_int8_skip_modules = list(OUTPUT_HEAD_NAMES) + skip

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=llm_int8_skip_modules)
    from qlora.loading import from_pretrained_quietly   # one line of ours instead of the load report
    try:
        if not transformers_converts:   # e.g. Falcon (all FalconLinear): a plain load, quantized below
            model = from_pretrained_quietly(model_class, path, **from_pretrained_kwargs)
        elif blocksize != _TRANSFORMERS_BLOCKSIZE:
            with _BlocksizeForTransformers(blocksize):
                model = from_pretrained_quietly(model_class, path, quantization_config=bnb_config,
                                                **from_pretrained_kwargs)
        else:
            model = from_pretrained_quietly(model_class, path, quantization_config=bnb_config, **from_pretrained_kwargs)
    except ValueError as e:
        if "GgufConfig" in str(e) or "quantized with" in str(e):
            raise QLoRAError(f"{path!r} is already quantized ({e}); load_4bit needs a float checkpoint. "
                             f"Remove quantization_config from its config.json after converting the "
                             f"weights to float (see qlora.bundled.smollm2_path)") from e
        raise

    # transformers' loader converts exact nn.Linear and Conv1D only: subclasses (Falcon's FalconLinear, ...)
    # arrive in compute_dtype and are quantized here from the same values (their float weights are in
    # memory until then: for Falcon that is the whole body, loaded in compute_dtype, not streamed)
    if _plan(model, skip)[0]:
        quantize_model(model, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
                       blocksize=blocksize, skip_modules=skip or None)
    layers = [m for m in model.modules() if is_linear4bit(m)]
    if not layers:
        raise QLoRAError(f"load_4bit: {type(model).__name__} from {path!r} has no 4-bit layer after "
                         f"loading (skip_modules={skip}); it needs at least one torch.nn.Linear")
    for layer in layers:
        qs = layer.weight.quant_state
        if qs.blocksize != blocksize or qs.quant_type != quant_type or qs.nested != double_quant:
            raise QLoRAError(f"transformers {transformers.__version__} quantized with blocksize="
                             f"{qs.blocksize}, quant_type={qs.quant_type}, double_quant={qs.nested} "
                             f"instead of the asked {blocksize}/{quant_type}/{double_quant}; load the "
                             f"float model and call qlora.quantize_model instead")
        _mark_layer(layer, compute_dtype)
    return model


# --------------------------------------------------------------------------------------------
# inspection
# --------------------------------------------------------------------------------------------
def _layer_of(module: nn.Module) -> nn.Module:
    base = getattr(module, "base_layer", None)  # a qlora LoRALinear around a Linear4bit
    return base if base is not None and not is_linear4bit(module) else module


def quant_settings(model: nn.Module) -> dict | None:
    """The 4-bit settings of ``model``, or None when it has no 4-bit layer.

    ``{"quant_type", "blocksize", "double_quant", "compute_dtype", "quantized_from_dtype"}``
    with dtypes as strings ('bfloat16'). Raises QLoRAError if the layers disagree (one dict
    could not describe them). The adapter saver stores this under "qlora" in adapter_config.json.
    """
    found: dict[tuple, list[str]] = {}
    for name, module in model.named_modules():
        if not is_linear4bit(module):
            continue
        qs = module.weight.quant_state
        if qs is None:
            raise QLoRAError(f"4-bit layer {name!r} was never quantized (its quant_state is None)")
        compute = module.compute_dtype
        source = getattr(module, "qlora_quantized_from", None) or dtype_name(
            getattr(qs, "original_dtype", None) or qs.dtype)
        nested = getattr(qs, "original_nested", qs.nested)
        key = (qs.quant_type, qs.blocksize, bool(nested),
               dtype_name(compute) if compute is not None else None, source)
        found.setdefault(key, []).append(name)
    if not found:
        return None
    if len(found) > 1:
        raise QLoRAError("the model's 4-bit layers use different settings "
                         "(quant_type, blocksize, double_quant, compute_dtype, quantized_from): "
                         + "; ".join(f"{k}: {v[:3]}" for k, v in found.items()))
    (quant_type, blocksize, double_quant, compute, source), = found
    return {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
            "compute_dtype": compute, "quantized_from_dtype": source}


def dequantize_weight(linear4bit: nn.Module) -> torch.Tensor:
    """The float [out, in] weight a 4-bit layer holds, in the dtype it was quantized from.

    Via ``bitsandbytes.functional.dequantize_4bit``; equal bit for bit to dequantizing a fresh
    ``quantize_4bit`` of the same input. (A weight bitsandbytes has repacked for its AVX512-BF16
    CPU kernel -- layers made by qlora never are -- is unpacked first; its absmax was rounded to
    bf16 by that repack, so it is then only approximately the original.)
    """
    import bitsandbytes.functional as F
    layer = _layer_of(linear4bit)
    if not is_linear4bit(layer):
        raise QLoRAError(f"dequantize_weight needs a bitsandbytes Linear4bit; got {type(linear4bit).__name__}")
    weight, qs = layer.weight, layer.weight.quant_state
    if qs is None:
        raise QLoRAError("dequantize_weight: this Linear4bit was never quantized (quant_state is None)")
    data = weight.data
    if getattr(qs, "packing_format_for_cpu", False):
        data, qs = F._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(qs))
    return F.dequantize_4bit(data, qs)  # [out, in], dtype = qs.dtype


def _quant_tensors(module: nn.Module):
    """Every tensor that stores a 4-bit layer: packed codes and the quant state."""
    for m in module.modules():
        if not is_linear4bit(m) or m.weight.quant_state is None:
            continue
        qs = m.weight.quant_state
        yield m, [m.weight.data, qs.absmax, qs.code, getattr(qs, "offset", None),
                  *((qs.state2.absmax, qs.state2.code) if getattr(qs, "state2", None) is not None else ())]


def quantized_bytes(module: nn.Module) -> int:
    """Bytes held by the 4-bit layers of ``module``: packed weights + quant state.

    Counts the packed uint8 codes [out*in/2], absmax (uint8 per block with double quantization,
    else fp32), the nested absmax (fp32 per 256 blocks), nested code (256 fp32), code (16 fp32)
    and offset (one fp32). Each tensor is counted once even if layers share it. Biases and
    non-4-bit modules are not counted.
    """
    seen, total = set(), 0
    for _, tensors in _quant_tensors(module):
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            key = (t.device, t.data_ptr(), t.numel() * t.element_size())
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def quantized_numel(module: nn.Module) -> int:
    """Number of weights stored in 4-bit in ``module`` (sum of out*in of its Linear4bit layers)."""
    n = 0
    for m, _ in _quant_tensors(module):
        shape = m.weight.quant_state.shape
        n += int(torch.Size(shape).numel())
    return n


def bits_per_weight(module: nn.Module) -> float:
    """8 * quantized_bytes / quantized_numel: 4.127 at blocksize 64 with double quantization."""
    n = quantized_numel(module)
    if n == 0:
        raise QLoRAError(f"{type(module).__name__} has no 4-bit layer to measure")
    return 8 * quantized_bytes(module) / n
