"""Image-text models: the one rule for which part of a model is its language model and which its other towers.

    language_model_path(model)    # 'model.language_model' (Qwen3-VL, Gemma 3, LLaVA, ...); None: a text model
    tower_paths(model)            # ['model.visual'] / ['model.vision_tower', 'model.multi_modal_projector']
    in_towers("model.visual.blocks.0.attn.qkv", towers)     # True: a module inside one of them
    model_class_for(config)       # the class a checkpoint loads as: its image-text class, else AutoModelForCausalLM
    checkpoint_class("folder")    # the same, from a model folder or Hub id
    text_only_class(config)       # the causal-LM class of its language model alone, or None
    text_only_arguments(config)   # {config, key_mapping}: from_pretrained's arguments that read the language model alone

The rule. A model whose config nests a text config (`config.get_text_config()` is not the config itself:
transformers 5's composite models, whatever their family) has a language model: the module its
`get_decoder()` returns (transformers' own lookup: `language_model` / `text_model` / the base model's).
Everything else that holds weights, outside the language model and the output head (qlora.arch.heads), is a
tower: the vision and audio encoders, the projector / merger / connector, multimodal embedders. The towers
stay in the compute dtype (not 4-bit) and get no LoRA from `all-linear` unless asked (quant, lora); the
language model's Linear layers and experts are 4-bit. A text model has no towers: nothing changes for it.
"""
from __future__ import annotations

import copy
import re

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
)

from qlora.arch.heads import output_embedding, output_head_paths
from qlora.arch.loading import users_files
from qlora.errors import QLoRAError


def text_config_of(config):
    """The config's nested text config, or None when the config is a text model's own (or names several)."""
    get = getattr(config, "get_text_config", None)
    try:
        text = get() if callable(get) else config
    except ValueError:          # several text configs (transformers: "ambiguous")
        return None
    return None if text is config else text


def language_model_path(model: nn.Module) -> str | None:
    """Path of the language model inside a composite model (the module get_decoder() returns); None for a text
    model (its config nests no text config) or when transformers names no decoder below the model."""
    if text_config_of(getattr(model, "config", None)) is None or not callable(getattr(model, "get_decoder", None)):
        return None
    body = model.get_decoder()
    if body is None or body is model:
        return None
    return next((name for name, m in model.named_modules() if m is body and name), None)


def tower_paths(model: nn.Module) -> list[str]:
    """The outermost modules with weights outside the language model and the output head: beside each module on
    the way down to the language model, every other child (vision / audio tower, projector, merger). [] for a
    text model. Works on a model built on the meta device."""
    path = language_model_path(model)
    if path is None:
        return []
    heads = output_head_paths(model)
    parts, towers = path.split("."), []
    for depth, step in enumerate(parts):
        parent = ".".join(parts[:depth])
        for name, child in (model.get_submodule(parent) if parent else model).named_children():
            full = f"{parent}.{name}" if parent else name
            if name != step and full not in heads and next(child.parameters(), None) is not None:
                towers.append(full)
    return towers


def in_towers(path: str, towers) -> bool:
    """Whether module path `path` is one of `towers` (tower_paths) or inside one."""
    return any(path == t or path.startswith(t + ".") for t in towers)


def model_class_for(config):
    """The transformers class a checkpoint with this config loads as by default: for a composite (image-text)
    config the class its `architectures` names (the checkpoint's own), else AutoModelForImageTextToText's class
    for it; for a text model AutoModelForCausalLM. QLoRAError when transformers has no class for it."""
    if text_config_of(config) is None:
        return transformers.AutoModelForCausalLM
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and callable(getattr(cls, "from_pretrained", None)):
            return cls
    if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    raise QLoRAError(f"transformers {transformers.__version__} has no image-text class for model type "
                     f"{config.model_type!r} (architectures={getattr(config, 'architectures', None)}); pass "
                     "model_class= (a transformers class), or text_only=True for its language model alone")


def checkpoint_class(path, **config_kwargs):
    """model_class_for the config of a model folder or Hub id (its config unreadable: one QLoRAError line)."""
    with users_files("model config", path):
        config = transformers.AutoConfig.from_pretrained(path, **config_kwargs)
    return model_class_for(config)


def text_only_class(config):
    """The causal-LM class of a composite config's language model alone (Qwen3.5's Qwen3_5ForCausalLM, Gemma 3's
    Gemma3ForCausalLM), or None when transformers has none for its text config."""
    text = text_config_of(config)
    if text is None or type(text) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return None
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(text)]


def text_only_arguments(config) -> dict:
    """from_pretrained's arguments under which the causal-LM class of a composite config's language model reads it
    from the composite checkpoint: `config`, its text config (a copy, its head tied where the composite model ties
    it), and `key_mapping` (regex -> replacement): the checkpoint's names of the language model's tensors (the
    composite model's conversion mapping reverted, as save_pretrained writes them: `language_model.model.` in
    Gemma 3's, `model.language_model.` in Qwen3.5's) -> `model.`, of the head's -> `lm_head.`."""
    from transformers.core_model_loading import revert_weight_conversion  # lazy: transformers >= 5 only
    with torch.device("meta"):
        model = model_class_for(config)._from_config(config)
    body, head = language_model_path(model), output_embedding(model)
    text = copy.deepcopy(text_config_of(config))
    text.tie_word_embeddings = head is not None and head.weight is model.get_input_embeddings().weight
    paths = {body: "model."} if body else {}
    paths.update({n: "lm_head." for n, m in model.named_modules() if head is not None and m is head and n})
    mapping = {}
    for path, target in paths.items():
        name, p = next(iter(model.get_submodule(path).named_parameters()))
        key = next(iter(revert_weight_conversion(model, {f"{path}.{name}": torch.empty(p.shape, device="meta")})))
        if key.endswith("." + name):
            mapping["^" + re.escape(key[:-len(name)])] = target
    return {"config": text, "key_mapping": mapping}
