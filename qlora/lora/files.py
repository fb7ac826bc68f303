"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors` (+ ours: `qlora_adapter.json`).

    save_adapter(model, "out/adapter")      # PEFT's PeftModel.from_pretrained(base, folder) reads it
    load_adapter(model, "out/adapter")      # reads folders written by us or by PEFT

Keys: `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (Linear, Conv2d),
`.lora_embedding_A` / `.lora_embedding_B` (Embedding), and `base_model.model.<path>.<param>`
for `modules_to_save` copies. `adapter_config.json` holds PEFT's own fields only (an unknown key
makes PEFT and transformers warn "upgrade the PEFT version" on every load); `qlora_adapter.json`
beside it records what qlora needs besides: the 4-bit settings the adapter was trained on and the
model's facts, so an export can rebuild the exact training-time weights. Adapters written before
that split (a `qlora` section inside adapter_config.json) still load.
Weights are read with safetensors only; pickled `adapter_model.bin` files are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from memprofile.tensors import unpacked_shape
from qlora.arch.experts import expert_features, matrix_name
from qlora.arch.multimodal import tower_paths
from qlora.arch.quantized import is_4bit, is_transposed, linear_features
from qlora.errors import QLoRAError
from qlora.lora.config import LoraConfig
from qlora.lora.experts import LoRAExperts, from_peft, peft_stems, to_peft
from qlora.lora.inject import add_lora, find_modules_to_save, find_targets, lora_layers
from qlora.lora.layers import LoRAEmbedding, ModulesToSave, lora_class_for
from qlora.util.dtypes import dtype_name, parse_dtype
from qlora.util.staging import atomic_write

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
QLORA_NAME = "qlora_adapter.json"      # ours, beside PEFT's files: LoraConfig.qlora
_UNSUPPORTED = {"use_dora": True, "lora_bias": True}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names."""
    out = {}
    for path, layer in lora_layers(model).items():
        if isinstance(layer, LoRAExperts):     # PEFT's target_parameters layout
            experts_path = path.rpartition(".expert_deltas.")[0]
            stem = peft_stems(experts_path, layer.base_layer, list(layer.base_layer.expert_deltas))[layer.weight_name]
            a, b = to_peft(layer)
            out[f"{PREFIX}{stem}.lora_A.weight"] = a
            out[f"{PREFIX}{stem}.lora_B.weight"] = b
        elif isinstance(layer, LoRAEmbedding):
            out[f"{PREFIX}{path}.lora_embedding_A"] = layer.lora_embedding_A
            out[f"{PREFIX}{path}.lora_embedding_B"] = layer.lora_embedding_B
        else:
            out[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight
            out[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            for name, p in module.modules_to_save.named_parameters():
                out[f"{PREFIX}{path}.{name}"] = p
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _config_json(model: nn.Module, config: LoraConfig) -> dict:
    return {**_peft_fields(model, config), **_explicit_targets(model)}


def _explicit_targets(model: nn.Module) -> dict:
    """The adapted modules by path where PEFT would resolve the config's targets to others: a model with adapted
    experts matrices (PEFT resolves 'all-linear' differently on mixtures of experts, and would drop some of ours;
    the matrices go as PEFT's `target_parameters`, with lora_dropout 0: PEFT refuses dropout on parameters, the
    trained value is in qlora_adapter.json), and an image-text model (PEFT's 'all-linear' and module names
    reach into the vision tower, qlora's only when asked: LoraConfig.vision)."""
    layers = lora_layers(model)
    matrices = sorted(f"{p.rpartition('.expert_deltas.')[0]}.{layer.weight_name}" for p, layer in layers.items()
                      if isinstance(layer, LoRAExperts))
    modules = sorted(p for p, layer in layers.items() if not isinstance(layer, LoRAExperts))
    if matrices:
        return {"target_modules": modules, "target_parameters": matrices, "lora_dropout": 0.0}
    return {"target_modules": modules} if tower_paths(model) else {}


def _peft_fields(model: nn.Module, config: LoraConfig) -> dict:
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "target_modules": config.target_modules,
        "exclude_modules": config.exclude_modules,
        "modules_to_save": config.modules_to_save,
        "init_lora_weights": config.init_lora_weights,
        "base_model_name_or_path": name,
        "bias": "none",
        # PEFT's flag for targets stored [in, out] (transformers' Conv1D): PEFT sets it itself, with a
        # warning, when it disagrees with the layer type, so it is written as PEFT would write it
        "fan_in_fan_out": any(is_transposed(layer.base_layer) for layer in lora_layers(model).values()),
        "inference_mode": True,
    }


def _model_facts(model: nn.Module) -> dict:
    """What an export needs to rebuild the trained model from the base folder alone."""
    facts = {"architecture": _architecture(model), "adapter_dtype": dtype_name(_adapter_dtype_of(model))}
    config = getattr(model, "qlora_config", None)
    if config is not None and any(isinstance(layer, LoRAExperts) for layer in lora_layers(model).values()):
        facts["lora_dropout"] = config.lora_dropout     # adapter_config.json says 0 for PEFT (see _experts_fields)
    frozen = [p.dtype for p in model.parameters() if not p.requires_grad and p.dtype.is_floating_point]
    if frozen:
        facts["base_dtype"] = dtype_name(frozen[0])   # dtype of the unquantized frozen weights
    hf_config = getattr(model, "config", None)
    if not type(model).__name__.endswith("Classification"):
        return facts
    for key in ("id2label", "label2id", "problem_type", "num_labels"):
        value = getattr(hf_config, key, None)
        if value is not None:
            facts.setdefault("config_overrides", {})[key] = value
    return facts


def _architecture(model: nn.Module) -> str:
    """The model's class name; FSDP2's fully_shard swaps in a subclass named FSDP<name> (qlora.fsdp)."""
    cls = type(model)
    while cls.__name__.startswith("FSDP") and any(b.__name__ == cls.__name__[4:] for b in cls.__bases__):
        cls = next(b for b in cls.__bases__ if b.__name__ == cls.__name__[4:])
    return cls.__name__


def _adapter_dtype_of(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.requires_grad:
            return p.dtype
    return torch.float32


def save_adapter(model: nn.Module, folder) -> Path:
    """Write adapter_config.json, adapter_model.safetensors and qlora_adapter.json (each to a temp
    name, then renamed)."""
    config = getattr(model, "qlora_config", None)
    if config is None:
        raise QLoRAError("this model has no LoRA adapters to save; attach them with qlora.add_lora first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(_config_json(model, config), indent=2, sort_keys=True)
    atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(text))
    facts = json.dumps({**(config.qlora or {}), **_model_facts(model)}, indent=2, sort_keys=True)
    atomic_write(folder / QLORA_NAME, lambda p: p.write_text(facts))
    return folder


def read_adapter_config(folder) -> LoraConfig:
    """LoraConfig from a PEFT/qlora adapter folder, refusing features we don't implement."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if folder.is_file():
        raise QLoRAError(f"adapter {str(folder)!r} is a file; give the adapter folder (with {CONFIG_NAME} and "
                         f"{WEIGHTS_NAME}) that holds it")
    if not folder.is_dir():
        raise QLoRAError(f"adapter folder {str(folder)!r} does not exist")
    if not path.is_file():
        raise QLoRAError(f"{str(folder)!r} has no {CONFIG_NAME}; is this a LoRA adapter folder?")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QLoRAError(f"{path} is not valid JSON ({e}); the adapter folder is corrupt") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise QLoRAError(f"{path} describes a {raw.get('peft_type')} adapter; qlora reads LoRA adapters only")
    for key, bad in _UNSUPPORTED.items():
        if raw.get(key) == bad:
            raise QLoRAError(f"{path}: {key}={bad} is not supported by qlora (plain LoRA only)")
    if raw.get("bias", "none") != "none":
        raise QLoRAError(f"{path}: bias={raw['bias']!r} is not supported (only 'none')")
    init = raw.get("init_lora_weights", True)
    facts = _read_qlora_facts(folder, raw)
    targets = raw.get("target_modules")
    return LoraConfig(target_parameters=list(raw.get("target_parameters") or []) or None,
        r=raw.get("r", 8), lora_alpha=raw.get("lora_alpha", 8),
        rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
        lora_dropout=facts.get("lora_dropout", raw.get("lora_dropout", 0.0)),
        use_rslora=raw.get("use_rslora", False), target_modules=targets,
        vision=True,        # PEFT's rule: a file's names match everywhere (qlora writes an image-text model's by path)
        exclude_modules=raw.get("exclude_modules"), modules_to_save=raw.get("modules_to_save"),
        init_lora_weights=init if init in (True, False, "gaussian") else True,
        task_type=raw.get("task_type"), qlora={k: v for k, v in facts.items() if k != "lora_dropout"})


def _read_qlora_facts(folder: Path, raw: dict) -> dict:
    """qlora_adapter.json, or the `qlora` section older adapters kept in adapter_config.json, or {}
    (an adapter written by PEFT)."""
    path = folder / QLORA_NAME
    if not path.is_file():
        return raw.get("qlora") or {}
    try:
        facts = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QLoRAError(f"{path} is not valid JSON ({e}); the adapter folder is corrupt") from None
    if not isinstance(facts, dict):
        raise QLoRAError(f"{path} must hold a JSON object; the adapter folder is corrupt")
    return facts


def read_adapter_tensors(folder) -> dict[str, torch.Tensor]:
    """All tensors of adapter_model.safetensors, keys without PEFT's `base_model.model.` prefix."""
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickled = folder / "adapter_model.bin"
        if pickled.exists():
            raise QLoRAError(f"{folder} holds only a pickled adapter_model.bin; qlora never unpickles files. "
                             "Convert it where you trust it: PeftModel.from_pretrained(...).save_pretrained(out, "
                             "safe_serialization=True)")
        raise QLoRAError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise QLoRAError(f"{path} is corrupt or not a safetensors file ({e})") from None


def _expected_shapes(targets: dict, to_save: dict, config: LoraConfig) -> dict[str, tuple]:
    shapes = {}
    for path, key in _expert_keys(targets).items():
        r = config.r_for(path)
        experts, name = targets[path], path.rpartition(".")[2]
        E = experts.num_experts
        n_in, n_out = expert_features(experts, name, _matrix_shape(experts, name))
        shapes[f"{key}.lora_A.weight"], shapes[f"{key}.lora_B.weight"] = (E * r, n_in), (n_out, r * E)
    for path, module in targets.items():
        if path in _expert_keys(targets):
            continue
        r = config.r_for(path)
        cls = lora_class_for(module)
        if cls is LoRAEmbedding:
            shapes[f"{path}.lora_embedding_A"] = (r, module.num_embeddings)
            shapes[f"{path}.lora_embedding_B"] = (module.embedding_dim, r)
        elif isinstance(module, nn.Conv2d):
            shapes[f"{path}.lora_A.weight"] = (r, module.in_channels, *module.kernel_size)
            shapes[f"{path}.lora_B.weight"] = (module.out_channels, r, 1, 1)
        else:
            n_in, n_out = linear_features(module)
            shapes[f"{path}.lora_A.weight"] = (r, n_in)
            shapes[f"{path}.lora_B.weight"] = (n_out, r)
        if not is_4bit(module):
            # PEFT also saves the base weights of a targeted embed_tokens / lm_head
            # (save_embedding_layers="auto"); PeftModel loads them into the base layer, so do we.
            for name, p in module.named_parameters():
                shapes[f"{path}.base_layer.{name}"] = tuple(p.shape)
    for path, module in to_save.items():
        for name, p in module.named_parameters():
            shapes[f"{path}.{name}"] = tuple(p.shape)
    return shapes


def _matrix_shape(experts: nn.Module, name: str) -> tuple:
    return tuple(unpacked_shape(experts.get_parameter(name)))


def _expert_keys(targets: dict) -> dict[str, str]:
    """{experts matrix path: PEFT's key stem (the experts path + its `base_layer.` nesting)} among `targets`."""
    matrices = {p: m for p, m in targets.items() if matrix_name(p, m)}
    out = {}
    for path, experts in matrices.items():
        base, _, name = path.rpartition(".")
        names = [q.rpartition(".")[2] for q, m in matrices.items() if m is experts]
        out[path] = peft_stems(base, experts, names)[name]
    return out


def _normalise_key(key: str) -> str:
    # older PEFT files: "<path>.modules_to_save.default.<param>" and ".lora_A.default.weight"
    key = key.replace(".modules_to_save.default.", ".").replace(".default.", ".")
    return key.removesuffix(".default")


def load_adapter(model: nn.Module, folder, dtype=None) -> nn.Module:
    """Attach the adapters described by `folder` to `model` (which has none yet) and load their
    weights. Every key and shape is checked first: on a mismatch nothing in the model changes."""
    config = read_adapter_config(folder)
    tensors = read_adapter_tensors(folder)
    if lora_layers(model):
        raise QLoRAError("this model already has LoRA adapters; load into a fresh base model")
    config.dtype = parse_dtype(dtype)
    targets = find_targets(model, config)
    to_save = find_modules_to_save(model, config)
    expected = _expected_shapes(targets, to_save, config)
    got = {_normalise_key(k): v for k, v in tensors.items()}
    for key, value in got.items():
        if key not in expected:
            raise QLoRAError(f"adapter key {key!r} has no matching module in {type(model).__name__} "
                             f"(the adapter was trained on another model?); the model was left as it was")
        if tuple(value.shape) != expected[key]:
            raise QLoRAError(f"adapter key {key!r} has shape {tuple(value.shape)} but the model needs "
                             f"{expected[key]}; the adapter was trained on another model size, "
                             "the model was left as it was")
    lora_keys = [k for k in expected if ".lora_" in k and k.rsplit(".lora_", 1)[0] in targets]
    missing = [k for k in lora_keys if k not in got]
    if missing:
        raise QLoRAError(f"adapter file lacks {missing[0]!r} (and {len(missing) - 1} more) that its config "
                         "targets; the file is incomplete; the model was left as it was")
    stems = {stem: path for path, stem in _expert_keys(targets).items()}
    add_lora(model, config)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights: every name
    layers = lora_layers(model)
    with torch.no_grad():
        for stem, path in stems.items():           # experts matrices: PEFT's 2-D layout -> ours
            base, _, name = path.rpartition(".")
            layer = layers[f"{base}.expert_deltas.{name}"]
            a, b = from_peft(got.pop(f"{stem}.lora_A.weight"), got.pop(f"{stem}.lora_B.weight"), layer.lora_A.shape[0])
            layer.lora_A.copy_(a.to(layer.lora_A.dtype))
            layer.lora_B.copy_(b.to(layer.lora_B.dtype))
        for key, value in got.items():
            name = _param_name(key, to_save)
            params[name].copy_(value.to(params[name].dtype))
    return model


def _param_name(key: str, to_save: dict) -> str:
    """Our parameter name for a (normalised) adapter key."""
    for path in to_save:
        if key.startswith(path + "."):
            return f"{path}.modules_to_save.{key[len(path) + 1:]}"
    return key  # lora_A.weight, lora_B.weight, lora_embedding_A/B: the same names as ours
