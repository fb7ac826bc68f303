"""Dequantize-and-merge export of an in-memory (Q)LoRA model: one weight at a time, to a plain model folder.

    qlora.export_merged(model, "runs/merged", dtype="bfloat16")     # what the recipes' export=true calls

Each 4-bit weight is dequantized (a Linear4bit, or a whole 4-bit experts matrix [E, a, b]), s·B·A added in
fp32 (per expert for an experts matrix), cast to `dtype` (or re-quantized: `requantize="nf4"`) and streamed
to disk. Names and layout are the checkpoint's as transformers writes it (`revert_weight_conversion`, what
`save_pretrained` does): a fused experts matrix goes out as the family's per-expert tensors (Mixtral's
`block_sparse_moe.experts.{e}.w1/w3`, Qwen3-MoE's `mlp.experts.{e}.gate_proj/up_proj`, ...) or stays fused
where the family's checkpoints are fused (gpt-oss). Memory: one weight in fp32 (for an experts matrix, that
layer's experts).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlora.arch.experts import is_experts_module
from qlora.arch.quantized import is_4bit, is_4bit_param, is_transposed
from qlora.errors import QLoRAError
from qlora.export import verify as ev
from qlora.export.requantize import Requantizer, check_requantize
from qlora.export.result import (
    PROCESSOR_FILES,
    ExportResult,
    LayerUpdate,
    check_requantize_layout,
    copy_base_files,
    finish,
    staging_folder_for,
    write_config,
)
from qlora.export.writer import ShardedWriter, plan_shards
from qlora.fsdp.shard import is_sharded
from qlora.lora.experts import LoRAExperts
from qlora.lora.files import save_adapter
from qlora.lora.inject import lora_layers
from qlora.quant.bnb_fixes import import_bnb
from qlora.quant.experts import dequantize_experts
from qlora.quant.formats import DEQUANTIZED
from qlora.quant.inspect import quant_settings
from qlora.util.dtypes import dtype_name, parse_dtype
from qlora.util.sizes import human


def _clean_name(key: str) -> str | None:
    """Our module's state-dict key -> the plain model's key (None: not part of the plain model)."""
    parts = key.split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts or "expert_deltas" in parts:
        return None
    if parts[-2:-1] == ["weight"] or "quant_state" in key:   # Linear4bit's weight.absmax, ... entries
        return None
    return ".".join(p for p in parts if p not in ("base_layer", "modules_to_save"))


def _plain_weight(module) -> torch.Tensor:
    """A module's weight in fp32 in its checkpoint layout: dequantized for a 4-bit layer (what its
    forward uses; [out, in], transposed back to [in, out] for one made from a Conv1D)."""
    if is_4bit(module):
        bnbf = import_bnb().functional
        w = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        return w.T.contiguous() if is_transposed(module) else w
    return module.weight.detach().float()


def _plain_matrix(experts, name: str) -> torch.Tensor:
    """An experts matrix [E, a, b] in fp32: dequantized when 4-bit (what the experts forward computes with); a
    float32 one is the live parameter itself (detached): read it, never write into it."""
    w = experts.get_parameter(name)
    if is_4bit_param(w):
        return dequantize_experts(w).float()
    return w.detach().float()


def _checkpoint_layout(model, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """{checkpoint key: tensor} for one model tensor, as save_pretrained lays it out (renamed, and a fused
    experts matrix split into the family's per-expert tensors where its checkpoints have them)."""
    from transformers.core_model_loading import revert_weight_conversion  # lazy: transformers >= 5 only
    return revert_weight_conversion(_PlainShapes(model), {name: tensor})


class _PlainShapes:
    """The live model as transformers' revert sees it, its parameters at their plain shapes: a shape-checked
    Transpose (Qwen3-VL-MoE's experts) keeps a tensor whose shape is the model's, and a 4-bit parameter's packed
    shape made it transpose every experts matrix (a square one then loaded transposed: wrong logits)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def get_parameter(self, name: str):
        p = self._model.get_parameter(name)
        return torch.empty(p.quant_state.shape, device="meta") if is_4bit_param(p) else p


def _entries(model, dtype) -> dict:
    """{model name: (state key, owner module, shape, output dtype)} of every tensor the plain model has."""
    modules = dict(model.named_modules())
    entries, seen_ids = {}, set()
    for key, value in model.state_dict(keep_vars=True).items():
        name = _clean_name(key)
        if name is None or id(value) in seen_ids:          # tied weights are written once
            continue
        seen_ids.add(id(value))
        owner = modules.get(key.rsplit(".", 1)[0])
        if name.endswith(".weight") and owner is not None and is_4bit(owner):
            shape = tuple(owner.weight.quant_state.shape)[::-1 if is_transposed(owner) else 1]
        elif is_4bit_param(value):                          # a 4-bit experts matrix
            shape = tuple(value.quant_state.shape)
        else:
            shape = tuple(value.shape)
        floating = value.dtype.is_floating_point or shape != tuple(value.shape)
        entries[name] = (key, owner, shape, dtype if floating else value.dtype)
    return entries


def export_merged(model, out, *, dtype="bfloat16", force: bool = False, verify: bool = True, tokenizer=None,
                  max_shard_size: int = 2 << 30, progress: bool = True, requantize: str | None = None,
                  extra_files=()) -> ExportResult:
    """Export an in-memory (Q)LoRA model as a plain model folder, one weight at a time (module docstring).
    `extra_files` (paths) are copied into the folder (a base folder's tokenizer files); the processor files of
    the folder the model was loaded from (preprocessor_config.json, ...) are copied too."""
    dtype = parse_dtype(dtype)
    requantize = check_requantize(requantize)
    out = Path(out)
    if getattr(model, "config", None) is None:
        raise QLoRAError("export_merged needs a transformers model (with .config); for other models use "
                         "qlora.unload_lora on a non-quantized model and save its state_dict")
    if is_sharded(model):   # FSDP (qlora.fsdp): no rank holds the whole model in memory
        raise QLoRAError("export_merged needs the whole model in memory, and this one is sharded (FSDP): export "
                         "the adapter train() wrote instead, from one process: qlora export --base BASE_FOLDER "
                         "--adapter OUT_DIR/adapter --out MERGED")
    _say_stored_format(model, dtype, requantize)
    layers = lora_layers(model)
    modules = dict(model.named_modules())
    check_requantize_layout(requantize, {n for n, m in modules.items() if is_4bit(m) and is_transposed(m)})
    entries = _entries(model, dtype)
    state = model.state_dict(keep_vars=True)
    experts_4bit = {n for n, e in entries.items() if is_experts_module(e[1]) and is_4bit_param(state[e[0]])}
    if requantize and experts_4bit:
        raise QLoRAError(f"--requantize does not write 4-bit experts matrices yet (e.g. {sorted(experts_4bit)[0]!r}); "
                         "export in bfloat16/float16 (without --requantize)")
    out_specs = {}
    for name, (_, _, shape, out_dtype) in entries.items():        # checkpoint names and shapes (meta: no memory)
        meta = torch.empty(shape, dtype=out_dtype, device="meta")
        out_specs.update({k: (tuple(v.shape), out_dtype) for k, v in _checkpoint_layout(model, name, meta).items()})
    four_bit = {n.removesuffix(".weight"): e[1] for n, e in entries.items()
                if n.endswith(".weight") and e[1] is not None and is_4bit(e[1])}
    result = ExportResult(out=out, dtype=dtype_name(dtype), merge_onto="dequantized")
    rq = result.requantizer = Requantizer.create(requantize, quant_settings(model) or {}, dtype, four_bit) \
        if requantize else None
    plan = plan_shards(rq.expand(out_specs) if rq else out_specs, max_shard_size)
    lora_by_base = {id(layer.base_layer): (path, layer) for path, layer in layers.items()
                    if not isinstance(layer, LoRAExperts)}
    lora_by_matrix = {(id(layer.base_layer), layer.weight_name): layer for layer in layers.values()
                      if isinstance(layer, LoRAExperts)}
    tmp = staging_folder_for(out, force)
    try:
        with ShardedWriter(tmp, plan) as writer, torch.no_grad():
            for name in tqdm(list(entries), desc="export", unit="tensor", disable=not progress):
                key, owner, shape, out_dtype = entries[name]
                update_norm = 0.0
                matrix = name.rpartition(".")[2]
                if name.endswith(".weight") and owner is not None and id(owner) in lora_by_base:
                    path, layer = lora_by_base[id(owner)]
                    seen = _plain_weight(owner)
                    delta = layer.delta_weight()
                    update_norm = delta.norm().item()
                    # the unquantized W is not in memory: its rounding error is unknown, not 0
                    result.layers.append(LayerUpdate(path, update_norm, None))
                    tensor = seen if layer.merged else seen + delta
                elif owner is not None and (id(owner), matrix) in lora_by_matrix:   # an adapted experts matrix
                    layer = lora_by_matrix[(id(owner), matrix)]
                    tensor = _plain_matrix(owner, matrix)   # float experts: the live parameter itself
                    if not layer.merged:
                        delta = layer.delta_weight()
                        update_norm = delta.norm().item()
                        tensor = tensor + delta             # a new tensor: never into the live model's weights
                        del delta
                    result.layers.append(LayerUpdate(name, update_norm, None))
                elif name.endswith(".weight") and owner is not None and is_4bit(owner):
                    tensor = _plain_weight(owner)
                elif name in experts_4bit:
                    tensor = _plain_matrix(owner, matrix)
                else:
                    tensor = state[key].detach()
                if rq is not None and rq.wants(name):
                    rq.write(writer, name.removesuffix(".weight"), tensor.float(), update_norm)
                    continue
                for ckpt_name, piece in _checkpoint_layout(model, name, tensor).items():
                    writer.write(ckpt_name, piece.to(out_dtype) if piece.is_floating_point() else piece)
                del tensor
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        write_config(tmp, config, dtype, quantization_config=rq.quantization_config(out_specs) if rq else None)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
        base = getattr(model, "name_or_path", None)
        if base and Path(base).is_dir():        # an image-text model's processor, from the folder it was loaded from
            copy_base_files(base, tmp, PROCESSOR_FILES)
        if verify and layers:
            _verify(model, layers, four_bit, rq, result, tmp)
        finish(tmp, out, result)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _say_stored_format(model, dtype, requantize) -> None:
    """One line when the base was loaded from an FP8 / MXFP4 checkpoint: the export is not in that format."""
    stored = getattr(model, "qlora_checkpoint_format", None)
    if stored in DEQUANTIZED:
        written = f"{dtype_name(dtype)} (4-bit layers re-quantized to {requantize})" if requantize else dtype_name(dtype)
        print(f"note: the base was an {stored.upper()} checkpoint; the export is {written}: the dequantized 4-bit "
              "weights the adapter was trained on, merged")


def adapted_weights(layers: dict) -> dict:
    """{the adapted tensor's owner path (a module, or an experts matrix): (its LoRA layer, the model tensor name,
    a function giving the fp32 weight training saw)} for `layers` (qlora.lora.lora_layers)."""
    out = {}
    for path, layer in layers.items():
        if isinstance(layer, LoRAExperts):
            matrix = path.replace(".expert_deltas.", ".")
            out[matrix] = (layer, matrix, lambda e=layer.base_layer, n=layer.weight_name: _plain_matrix(e, n))
        else:
            out[path] = (layer, path + ".weight", lambda m=layer.base_layer: _plain_weight(m))
    return out


def merged_tensors(model, name: str, dtype) -> torch.Tensor:
    """The model tensor the export of `model` must hold for the adapted weight `name` (a key of
    adapted_weights): the weight training saw + s·B·A, in the model's layout, in `dtype`."""
    layer, _, seen = adapted_weights(lora_layers(model))[name]
    return (seen() if layer.merged else seen() + layer.delta_weight()).to(dtype)


def _verify(model, layers, four_bit, rq, result, folder: Path) -> None:
    """The export against the unmerged model: what each adapted (and, for --requantize, each 4-bit) weight
    held in training put back, the adapter as a separate path (qlora.export.verify)."""
    adapted = adapted_weights(layers)
    sources = {**{p: (lambda m=m: _plain_weight(m)) for p, m in four_bit.items()},
               **{name: seen for name, (_, _, seen) in adapted.items()}}
    fits, size, free = ev.fits_in_memory(folder)
    if not fits and rq is None:        # the whole merged model would not fit beside the live one: layer by layer
        dtype = parse_dtype(result.dtype)
        missing = sorted(set(adapted) - {layer.name for layer in result.layers})
        result.verification = ev.verify_layers(
            folder, result, lambda name: merged_tensors(model, name, dtype), missing=missing,
            reason=f"the merged model ({human(size)}) does not fit in the memory available ({human(free)})")
        return
    check = ev.verify_requantized if rq else ev.verify_export
    with tempfile.TemporaryDirectory() as adapter_dir:
        save_adapter(model, adapter_dir)
        result.verification = check(folder, adapter_dir, result, lambda p: sources[p](), live_model=model,
                                    input_folder=folder)
