"""Loading a Hugging Face model with its linear layers in 4-bit: `load_4bit`, in named steps.

    model = qlora.load_4bit("smollm2")                      # folder, Hub id, or bundled name
    enc = qlora.load_4bit("minilm", AutoModel)              # any AutoModelFor... class
    vlm = qlora.load_4bit("path/to/qwen3-vl")               # image-text: its own class, the towers in float
    lm = qlora.load_4bit("path/to/qwen3.5", text_only=True)   # its language model alone (Qwen3_5ForCausalLM)

transformers' bitsandbytes loader streams the checkpoint and quantizes each tensor as it is read
(the float model never sits in memory); the modules to keep in compute_dtype come from our own
rule (qlora.quant.convert.conversion_plan on the model built on the meta device), and every loaded
layer is checked against the asked settings and marked like a layer quantize_model makes.
An image-text checkpoint loads as its own class (qlora.arch.multimodal.model_class_for): its language model
is 4-bit, its vision / audio towers and projector stay in compute_dtype (`quantize_vision=True`: 4-bit too).

FP8 and MXFP4 checkpoints (qlora.quant.formats) are read through transformers' own dequantization into
compute_dtype, and our hook on its set_param_for_module makes each Linear and experts module 4-bit as soon
as its weights are set: the same codes as dequantize-then-quantize_4bit, one module in float at a time.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import transformers
import transformers.integrations as integrations
from torch import nn
from transformers import AutoConfig, BitsAndBytesConfig

from qlora.arch.experts import expert_weight_names, is_experts_module
from qlora.arch.heads import OUTPUT_HEAD_NAMES
from qlora.arch.loading import from_pretrained_quietly, users_files
from qlora.arch.multimodal import in_towers, model_class_for, text_config_of, text_only_arguments, text_only_class
from qlora.arch.names import matches_parts
from qlora.arch.quantized import is_4bit, is_conv1d
from qlora.bundled import resolve_model
from qlora.errors import QLoRAError
from qlora.quant.bnb_fixes import import_bnb
from qlora.quant.convert import (
    conversion_plan,
    experts_plan,
    float_towers,
    make_linear4bit,
    mark_layer,
    quantize_model,
    say_float_matrices,
)
from qlora.quant.experts import quantize_experts
from qlora.quant.formats import (
    DEQUANTIZED,
    check_fp8_blocks,
    dequantizing_config,
    partial_fp8_blocks,
    quantization_config,
    sequential_loading,
    stored_format,
)
from qlora.quant.settings import (
    check_blocksize,
    check_compute_dtype,
    check_double_quant,
    check_quant_type,
    check_skip_modules,
)

# transformers' BitsAndBytesConfig has no block size: its Linear4bit placeholders use 64.
_TRANSFORMERS_BLOCKSIZE = 64

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


def _config(path: str, kwargs: dict):
    """The checkpoint's config (AutoConfig), with the caller's Hub / folder arguments."""
    keys = ("trust_remote_code", "revision", "token", "cache_dir", "local_files_only", "subfolder")
    return AutoConfig.from_pretrained(path, **{k: kwargs[k] for k in keys if k in kwargs})


def _skeleton(config, model_class, kwargs: dict) -> nn.Module | None:
    """The model built on the meta device (no memory, no weights read), or None if that fails."""
    if config is None:
        return None
    try:
        text = text_config_of(config)
        if text is not None and isinstance(text, getattr(model_class, "config_class", ())):
            config = text                # a language model alone (text_only): built from the nested text config
        factory = getattr(model_class, "from_config", None) or model_class._from_config
        with torch.device("meta"):
            return factory(config, **({"trust_remote_code": True} if kwargs.get("trust_remote_code") else {}))
    except Exception:  # noqa: BLE001 -- any failure: fall back to name patterns, from_pretrained reports
        return None


class _QuantizeWhileLoading:
    """Each experts module (qlora.arch.experts) quantized to 4-bit as soon as transformers has set its last 3-D
    matrix, and each Linear named in `linears` (a checkpoint transformers dequantizes: FP8, MXFP4) replaced by
    its 4-bit layer as soon as its weight (and bias) are set, while the checkpoint is still being read: the
    process holds one module's float weights at a time, never the whole model's. transformers' loader sets
    every parameter through `core_model_loading.set_param_for_module`, swapped here for the duration of one
    load (like _BlocksizeForTransformers: not for two concurrent loads in threads of one process)."""

    def __init__(self, settings: dict, skip: list[str], linears=frozenset(), quantize_vision: bool = False):
        self.settings, self.skip, self.linears = settings, skip, frozenset(linears)
        self.quantize_vision, self.towers = quantize_vision, None      # float_towers of the model being loaded

    def __enter__(self):
        from transformers import core_model_loading  # lazy: transformers >= 5 only
        self.module, self.original = core_model_loading, core_model_loading.set_param_for_module
        original = self.original

        def set_param_for_module(model, target_name, *args, **kwargs):
            original(model, target_name, *args, **kwargs)
            path = target_name.rpartition(".")[0]
            module = model.get_submodule(path) if path else model
            if self.towers is None:
                self.towers = float_towers(model, self.quantize_vision)
            if path in self.linears:
                self._linear(model, path, module)
            elif (is_experts_module(module) and not any(matches_parts(path, s) for s in self.skip)
                  and not in_towers(path, self.towers)):
                matrices = [module._parameters.get(n) for n in expert_weight_names(module)]
                if all(w is not None and w.device.type != "meta" and w.is_floating_point() for w in matrices):
                    quantize_experts(module, **self.settings)

        core_model_loading.set_param_for_module = set_param_for_module
        return self

    def _linear(self, model: nn.Module, path: str, linear: nn.Module) -> None:
        """Swap in the 4-bit layer once all of the Linear's parameters hold values: its float [out, in] weight
        is released with the old module (a bias still missing from the checkpoint: quantized after loading)."""
        if is_4bit(linear) or any(p.device.type == "meta" for p in linear.parameters(recurse=False)):
            return
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = make_linear4bit(linear, **self.settings)
        for param in layer.parameters():
            param._is_hf_initialized = True       # loaded: transformers' init of missing weights leaves it alone
        setattr(parent, child, layer)

    def __exit__(self, *exc):
        self.module.set_param_for_module = self.original


class _BlocksizeForTransformers:
    """Sets the block size of the Linear4bit placeholders transformers creates before it loads
    weights (BitsAndBytesConfig has no block size; its Bnb4bitQuantize copies the placeholder's
    Params4bit attributes, blocksize included). Only used for blocksize != 64 and verified after
    loading. It swaps a module attribute of transformers for the duration of one load, so it is
    not safe to run two such loads concurrently in threads of one process."""

    def __init__(self, blocksize: int):
        self.blocksize = blocksize

    def __enter__(self):
        self.integrations, self.original = integrations, integrations.replace_with_bnb_linear
        blocksize = self.blocksize

        def replace_with_bnb_linear(model, *args, **kwargs):
            model = self.original(model, *args, **kwargs)
            for module in model.modules():
                if is_4bit(module):
                    module.weight.blocksize = blocksize
            return model

        integrations.replace_with_bnb_linear = replace_with_bnb_linear
        return self

    def __exit__(self, *exc):
        self.integrations.replace_with_bnb_linear = self.original


def load_4bit(name_or_path, model_class=None, *, quant_type: str = "nf4", double_quant: bool = True,
              compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
              skip_modules: list[str] | None = None, quantize_vision: bool = False, text_only: bool = False,
              **from_pretrained_kwargs) -> nn.Module:
    """Load a Hugging Face model with its Linear layers in 4-bit (bitsandbytes via transformers).

    ``name_or_path``: a model folder, a Hub id, or a bundled name ('smollm2', 'minilm'; see
    qlora.bundled). ``model_class``: any ``AutoModelFor...`` / concrete transformers class; default: the
    checkpoint's own class for an image-text checkpoint (Qwen3-VL, Gemma 3, LLaVA, ...: qlora.arch.multimodal),
    else ``AutoModelForCausalLM``. Weights are streamed from disk and quantized tensor by tensor,
    so the full-precision model never sits in memory. The output head (lm_head / classifier /
    score, get_output_embeddings()), embeddings and norms stay in ``compute_dtype`` (the loading
    dtype; transformers quantizes from it, so it is recorded as ``quantized_from_dtype``).
    ``skip_modules`` keeps more modules unquantized (same matching as ``quantize_model``).
    An image-text model's vision / audio towers and projector stay in ``compute_dtype`` unless
    ``quantize_vision``; ``text_only=True`` loads its language model alone, as the causal-LM class transformers
    has for it (said in one line; refused in one line where there is none).
    A folder holding an FP8 or MXFP4 checkpoint is dequantized by transformers tensor by tensor into
    ``compute_dtype`` and made 4-bit as it is read (qlora.quant.formats); a bitsandbytes 4-bit one loads
    as it is; other quantizations are refused.
    Other keyword arguments (``device_map``, ``trust_remote_code``, ``revision``, ...) go to
    ``from_pretrained``; without ``device_map`` transformers picks the first CUDA GPU, else CPU.
    """
    quant_type = check_quant_type(quant_type)
    blocksize = check_blocksize(blocksize)
    compute_dtype = check_compute_dtype(compute_dtype)
    double_quant = check_double_quant(double_quant)
    skip = check_skip_modules(skip_modules)
    kwargs = _from_pretrained_kwargs(from_pretrained_kwargs, compute_dtype)
    path, model_class, config = _resolve(name_or_path, model_class, kwargs, text_only)
    fmt = stored_format(path) if os.path.isdir(path) else "float"     # a Hub id: transformers says
    skips, transformers_converts, to_quantize = _skips_for_transformers(path, config, model_class, kwargs, skip,
                                                                        quantize_vision)
    settings = dict(quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype, blocksize=blocksize)
    if fmt in DEQUANTIZED:
        model = _load_dequantized(path, model_class, kwargs, fmt, settings, skip, to_quantize, quantize_vision)
    else:
        with _QuantizeWhileLoading(settings, skip, quantize_vision=quantize_vision):
            model = _load(path, model_class, kwargs, skips=skips, transformers_converts=transformers_converts,
                          **settings)
    _say_text_only(model, path, config)
    # transformers' loader converts exact nn.Linear and Conv1D only: subclasses (Falcon's FalconLinear, ...)
    # arrive in compute_dtype and are quantized here from the same values (their float weights are in
    # memory until then: for Falcon that is the whole body, loaded in compute_dtype, not streamed)
    # (the fused 3-D experts of mixture-of-experts models were quantized while loading, one module at a time;
    # any left, e.g. a loader path that sets them otherwise, are quantized here)
    if conversion_plan(model, skip, quantize_vision)[0] or experts_plan(model, skip, quantize_vision):
        quantize_model(model, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
                       blocksize=blocksize, skip_modules=skip or None,      # says which experts stay float
                       quantize_vision=quantize_vision)
    else:
        say_float_matrices(model)
    _check_loaded(model, path, skip, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
                  blocksize=blocksize)
    return model


def _from_pretrained_kwargs(given: dict, compute_dtype: torch.dtype) -> dict:
    """The caller's from_pretrained keyword arguments, checked, with dtype = compute_dtype unless given
    (a new dict: the caller's is not changed)."""
    kwargs = dict(given)
    if "quantization_config" in kwargs:
        raise QLoRAError("load_4bit builds its own BitsAndBytesConfig; instead of quantization_config "
                         "pass quant_type=, double_quant=, compute_dtype=, blocksize=, skip_modules=")
    if kwargs.get("load_in_4bit") or kwargs.get("load_in_8bit"):
        raise QLoRAError("load_4bit already loads in 4-bit; drop load_in_4bit/load_in_8bit")
    if "torch_dtype" in kwargs:  # the pre-v5 name
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    kwargs["dtype"] = check_compute_dtype(kwargs["dtype"]) if "dtype" in kwargs else compute_dtype
    return kwargs


def _resolve(name_or_path, model_class, kwargs: dict, text_only: bool = False):
    """(local path or Hub id, transformers class, its config or None); a local folder is checked and never asks
    the Hub. No class given: the checkpoint's (qlora.arch.multimodal.model_class_for), or with `text_only` its
    language model's; a class given: the config when it reads (else from_pretrained says why)."""
    path = resolve_model(name_or_path)
    if os.path.isdir(path):
        _check_folder(path)
        kwargs.setdefault("local_files_only", True)
    if text_only and model_class is not None:
        raise QLoRAError(f"text_only=True picks the class itself (the language model's causal-LM class); drop "
                         f"model_class={getattr(model_class, '__name__', model_class)}")
    if model_class is not None:
        try:
            config = _config(path, kwargs)
        except Exception:  # noqa: BLE001 -- any failure: from_pretrained reads it again and reports
            config = None
        _check_auto_class(model_class, config)
    else:
        with users_files("model config", path):
            config = _config(path, kwargs)
        model_class = model_class_for(config)
        if text_only and text_config_of(config) is not None:
            model_class = text_only_class(config)
            if model_class is None:
                raise QLoRAError(f"text_only=True: transformers {transformers.__version__} has no causal-LM class "
                                 f"for the language model of {config.model_type!r} "
                                 f"({type(text_config_of(config)).__name__}); load the image-text model instead "
                                 "(without text_only)")
            kwargs.update({k: v for k, v in text_only_arguments(config).items() if k not in kwargs})
    if not callable(getattr(model_class, "from_pretrained", None)):
        raise QLoRAError(f"model_class={model_class!r} has no from_pretrained; accepted: a transformers "
                         f"class such as AutoModelForCausalLM, AutoModel, AutoModelForSequenceClassification")
    return path, model_class, config


def _check_auto_class(model_class, config) -> None:
    """An AutoModelFor... class that has no class for this config: one line naming the class that loads it."""
    mapping = getattr(model_class, "_model_mapping", None)
    if config is None or mapping is None or getattr(config, "auto_map", None) or type(config) in mapping:
        return
    try:
        hint = f"leave model_class out to load it as {model_class_for(config).__name__}"
    except QLoRAError:
        hint = "pass a transformers class that has one"
    raise QLoRAError(f"{model_class.__name__} has no class for model type {config.model_type!r}; {hint}")


def _skips_for_transformers(path: str, config, model_class, kwargs: dict, skip: list[str],
                            quantize_vision: bool = False) -> tuple[list[str], bool, list[str]]:
    """(llm_int8_skip_modules for BitsAndBytesConfig, whether transformers' loader has any layer of ours
    to quantize, the Linear layers to quantize), from the model built on the meta device (name patterns
    when that fails; then the layers to quantize are found after loading)."""
    skeleton = _skeleton(config, model_class, kwargs)
    if skeleton is None:
        return list(OUTPUT_HEAD_NAMES) + skip, True, []
    to_quantize, kept = conversion_plan(skeleton, skip, quantize_vision)
    if not to_quantize:
        raise QLoRAError(f"load_4bit found nothing to quantize in {type(skeleton).__name__} from "
                         f"{path!r}: no torch.nn.Linear outside the output head and "
                         f"skip_modules={skip}; Linear layers kept: {kept[:8]}")
    # Exact module paths (regex-escaped: transformers matches them as patterns). An explicit
    # list also switches off transformers' own default skips, which would differ from ours.
    modules = dict(skeleton.named_modules())
    converts = any(type(modules[n]) is nn.Linear or is_conv1d(modules[n]) for n in to_quantize)
    return [re.escape(n) for n in kept], converts, to_quantize


def _load_dequantized(path: str, model_class, kwargs: dict, fmt: str, settings: dict, skip: list[str],
                      to_quantize: list[str], quantize_vision: bool = False) -> nn.Module:
    """An FP8 / MXFP4 checkpoint (qlora.quant.formats): transformers dequantizes each weight into compute_dtype
    as it reads it, one tensor at a time, and the hook makes each Linear / experts module 4-bit as it is set."""
    if fmt == "fp8":
        check_fp8_blocks(path)
    import_bnb()
    block = quantization_config(path).get("weight_block_size") if fmt == "fp8" else None
    with _QuantizeWhileLoading(settings, skip, linears=to_quantize, quantize_vision=quantize_vision), \
            sequential_loading(), partial_fp8_blocks(block):
        model = from_pretrained_quietly(model_class, path, quantization_config=dequantizing_config(fmt), **kwargs)
    model.qlora_checkpoint_format = fmt     # export_merged says the export is in float, not fmt
    return model


def _load(path: str, model_class, kwargs: dict, *, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
          blocksize: int, skips: list[str], transformers_converts: bool) -> nn.Module:
    """transformers' from_pretrained with a BitsAndBytesConfig (one line of ours instead of its load report)."""
    import_bnb()   # transformers imports bitsandbytes itself: through our door first (qlora.quant.bnb_fixes)
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skips)
    try:
        if not transformers_converts:   # e.g. Falcon (all FalconLinear): a plain load, quantized by the caller
            return from_pretrained_quietly(model_class, path, **kwargs)
        if _is_bnb_4bit_checkpoint(path):  # already 4-bit (a "-bnb-4bit" download): its codes as they are,
            return from_pretrained_quietly(model_class, path, **kwargs)   # its settings checked by _check_loaded
        if blocksize != _TRANSFORMERS_BLOCKSIZE:
            with _BlocksizeForTransformers(blocksize):
                return from_pretrained_quietly(model_class, path, quantization_config=bnb_config, **kwargs)
        return from_pretrained_quietly(model_class, path, quantization_config=bnb_config, **kwargs)
    except ValueError as e:
        if "GgufConfig" in str(e) or "quantized with" in str(e):
            raise QLoRAError(f"{path!r} is already quantized ({e}); load_4bit reads float checkpoints, and FP8 / "
                             f"MXFP4 / bitsandbytes 4-bit ones from a local folder (download it first). Otherwise "
                             f"remove quantization_config from its config.json after converting the weights to "
                             f"float (see qlora.bundled.smollm2_path)") from e
        raise


def _say_text_only(model: nn.Module, path: str, config) -> None:
    """One line when an image-text checkpoint was loaded as its language model alone (text_only, or a causal-LM
    class given): the towers are not in the model, nor in what its adapter and export describe."""
    if text_config_of(config) is not None and text_config_of(getattr(model, "config", None)) is None:
        print(f"text only: {type(model).__name__}, the language model of {path} without its vision / audio towers")


def _is_bnb_4bit_checkpoint(path: str) -> bool:
    """Whether the folder's config.json says its weights are bitsandbytes 4-bit already."""
    config = Path(path) / "config.json"
    try:
        q = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def _check_loaded(model: nn.Module, path: str, skip: list[str], *, quant_type: str, double_quant: bool,
                  compute_dtype: torch.dtype, blocksize: int) -> None:
    """Every 4-bit layer has the asked settings; each is marked (qlora.quant.convert.mark_layer)."""
    layers = [m for m in model.modules() if is_4bit(m)]
    if not layers:
        raise QLoRAError(f"load_4bit: {type(model).__name__} from {path!r} has no 4-bit layer after "
                         f"loading (skip_modules={skip}); it needs at least one torch.nn.Linear")
    for layer in layers:
        qs = layer.weight.quant_state
        if qs.blocksize != blocksize or qs.quant_type != quant_type or qs.nested != double_quant:
            if _is_bnb_4bit_checkpoint(path):
                raise QLoRAError(f"{path!r} is already 4-bit with quant_type={qs.quant_type}, blocksize={qs.blocksize}, "
                                 f"double_quant={qs.nested}; load it with those settings (qlora.load_4bit(path, "
                                 f"quant_type={qs.quant_type!r}, blocksize={qs.blocksize}, double_quant={qs.nested})), "
                                 "or start from a float checkpoint")
            raise QLoRAError(f"transformers {transformers.__version__} quantized with blocksize="
                             f"{qs.blocksize}, quant_type={qs.quant_type}, double_quant={qs.nested} "
                             f"instead of the asked {blocksize}/{quant_type}/{double_quant}; load the "
                             f"float model and call qlora.quantize_model instead")
        mark_layer(layer, compute_dtype)
