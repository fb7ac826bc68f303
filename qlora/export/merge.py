"""Dequantize-and-merge export: base folder + adapter -> one plain bf16/fp16/fp32 model folder.

    qlora export --base BASE --adapter ADAPTER --out OUT [--dtype bfloat16] [--merge-onto dequantized]
                 [--requantize nf4]                              # 4-bit output (qlora/requantize.py)
    export_adapter(base, adapter, out, dtype="bfloat16")         # the function behind it
    export_merged(model, out, dtype="bfloat16")                   # from an in-memory QLoRA model

The adapter was trained against dequant(quant(W)), not W: by default each adapted weight is
re-quantized with the exact settings recorded in the adapter's config (quant type, blocksize,
double quantization, and the dtype it was quantized from), dequantized, and s·B·A is added in
fp32. Memory stays flat: the base is read one tensor at a time (safetensors' lazy `safe_open`)
and the output streamed one tensor at a time (`shard_writer`), so peak memory is a few layers
in fp32, whatever the model size. Everything is written into a temporary folder beside `out`
and renamed at the end; a killed export leaves no `out`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlora.arch.quantized import is_4bit, is_transposed
from qlora.errors import QLoRAError
from qlora.export.checkpoint import (  # noqa: F401
    base_weight_files,
    key_prefix_fix,
    read_tensor,
    roundtrip_4bit,
    stream_tensor,
    tensor_specs,
    training_weight,
)
from qlora.export.requantize import Requantizer, check_requantize
from qlora.export.writer import ShardedWriter, plan_shards
from qlora.lora.files import read_adapter_config, read_adapter_tensors
from qlora.quant.bnb_fixes import import_bnb
from qlora.util.dtypes import dtype_name, parse_dtype
from qlora.util.staging import publish, staging_folder

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                "chat_template.jinja", "preprocessor_config.json")


@dataclass
class LayerUpdate:
    """One adapted weight: what was added and how big the NF4 rounding was next to it."""
    name: str
    update_norm: float          # ||s·B·A||_F
    quant_error_norm: float | None   # ||W - dequant(quant(W))||_F (W's rounding to the training dtype when
                                     # not 4-bit); None when W is not at hand (export_merged: in memory)

    @property
    def ratio(self) -> float | None:
        if self.quant_error_norm is None:
            return None
        return self.quant_error_norm / max(self.update_norm, 1e-30)


@dataclass
class ExportResult:
    out: Path
    dtype: str
    merge_onto: str
    layers: list[LayerUpdate] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    verification: dict = field(default_factory=dict)
    requantizer: Requantizer | None = None     # --requantize: its settings and per-layer added error


# ---------------------------------------------------------------- reading the inputs

def adapter_updates(tensors: dict, paths: set[str],
                    transposed=frozenset()) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    """module path -> (A, B, kind) with kind 'linear' | 'linear_t' (a `transposed` path: the weight is
    stored [in, out], transformers' Conv1D) | 'embedding' | 'conv'."""
    out = {}
    for path in paths:
        if f"{path}.lora_embedding_A" in tensors:
            out[path] = (tensors[f"{path}.lora_embedding_A"], tensors[f"{path}.lora_embedding_B"], "embedding")
        else:
            a, b = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
            out[path] = (a, b, "conv" if a.dim() == 4 else "linear_t" if path in transposed else "linear")
    return out


def transposed_paths(adapter, settings: dict, lora_paths: set[str]) -> set[str]:
    """Module paths whose base weight is stored [in, out]: qlora's record, else (an adapter written by
    PEFT) every LoRA target when its adapter_config.json says fan_in_fan_out."""
    if "transposed_modules" in settings:
        return set(settings["transposed_modules"])
    raw = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return set(lora_paths) if raw.get("fan_in_fan_out") else set()


def add_delta_(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kind: str, scaling: float) -> float:
    """weight += s·B·A in place (fp32 `weight`), without a whole-layer temporary; returns ||s·B·A||_F.

    The norm comes from the r×r Gram matrices: ||B·A||² = trace((BᵀB)(AAᵀ)), in float64."""
    a, b = a.float(), b.float()
    a2, b2 = a.flatten(1), b.flatten(1)                                  # [r, in...], [out, r]
    if kind == "embedding":
        weight.addmm_(a2.T, b2.T, alpha=scaling)                       # (B·A)ᵀ: [n, d]
    elif kind == "linear_t":
        weight.T.addmm_(b2, a2, alpha=scaling)                         # weight [in, out]: its view [out, in]
    else:
        weight.view(weight.shape[0], -1).addmm_(b2, a2, alpha=scaling)  # [out, in] (conv: flattened)
    gram = (b2.double().T @ b2.double()) * (a2.double() @ a2.double().T)
    return abs(scaling) * max(gram.sum().item(), 0.0) ** 0.5


def _all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """torch.isfinite(t).all() in pieces: on a whole layer it allocates an fp32 |t| plus two masks."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _diff_norm(a: torch.Tensor, b: torch.Tensor, chunk_rows: int = 256) -> float:
    """||a - b||_F with fp32 temporaries of `chunk_rows` rows, not a whole-layer copy."""
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    total = 0.0
    for i in range(0, a2.shape[0], chunk_rows):
        total += torch.linalg.vector_norm(a2[i:i + chunk_rows].float() - b2[i:i + chunk_rows]).item() ** 2
    return total ** 0.5


# ---------------------------------------------------------------- writing

def _staging_folder(out: Path, force: bool) -> Path:
    """The temp folder the export is written into (qlora.util.staging: stale ones of killed exports removed)."""
    if out.exists() and not force:
        raise QLoRAError(f"{out} already exists; pass --force (force=True) to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise QLoRAError(f"{out} is a file, not a model folder; remove it or choose another --out")
    return staging_folder(out)


def _finish(tmp: Path, out: Path, result) -> None:
    (tmp / "export_report.json").write_text(json.dumps(report_dict(result), indent=2))
    publish(tmp, out)


def write_config(folder: Path, config: dict, dtype: torch.dtype, overrides: dict | None = None,
                 quantization_config: dict | None = None) -> None:
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config.update(overrides or {})
    config["dtype"] = dtype_name(dtype)
    config.pop("torch_dtype", None)
    if quantization_config:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def export_adapter(base, adapter, out, *, dtype="bfloat16", merge_onto: str = "dequantized", force: bool = False,
                   verify: bool = True, verify_live: bool = True, max_shard_size: int = 2 << 30,
                   progress: bool = True, requantize: str | None = None) -> ExportResult:
    """Merge the adapter in `adapter` into the base folder `base` and write a plain model to `out`.

    `requantize="nf4"` (or "fp4"): the layers that were 4-bit in training are written re-quantized
    (bitsandbytes' 4-bit format with a quantization_config; see qlora.export.requantize), the rest in `dtype`."""
    dtype = parse_dtype(dtype)
    requantize = check_requantize(requantize)
    if merge_onto not in ("dequantized", "original"):
        raise QLoRAError(f"merge_onto={merge_onto!r}: use 'dequantized' (the weights the adapter was trained "
                         "against, default) or 'original' (the unquantized base weights)")
    out = Path(out)
    folder, hf_config, files = base_weight_files(base)
    config = read_adapter_config(adapter)
    tensors = read_adapter_tensors(adapter)
    settings = config.qlora or {}
    lora_paths = {k.split(".lora_")[0] for k in tensors if ".lora_" in k}
    saved = {k.replace(".modules_to_save.default.", "."): v for k, v in tensors.items() if ".lora_" not in k}
    transposed = transposed_paths(adapter, settings, lora_paths)
    _check_requantize_layout(requantize, transposed)
    updates = adapter_updates(tensors, lora_paths, transposed)
    specs = tensor_specs(files)
    strip, add = key_prefix_fix(list(specs), sorted(lora_paths))
    name_of = {key: add + key.removeprefix(strip) for key in specs}

    # Check that everything fits before writing anything.
    by_name = {name_of[k]: (k, *specs[k][1:]) for k in specs}
    for path, (a, b, kind) in updates.items():
        if path + ".weight" not in by_name:
            raise QLoRAError(f"adapter module {path!r} has no weight {path}.weight in the base; "
                             "the adapter was trained on another model. Nothing was written.")
        shape = by_name[path + ".weight"][1]
        expect = {"linear": (b.shape[0], a.shape[1]), "linear_t": (a.shape[1], b.shape[0]),
                  "embedding": (a.shape[1], b.shape[0]),
                  "conv": (b.shape[0], *a.shape[1:])}[kind]
        if tuple(shape) != tuple(expect):
            raise QLoRAError(f"adapter for {path!r} expects a weight of shape {expect} but the base has {shape}; "
                             "the adapter was trained on another model size. Nothing was written.")
    result = ExportResult(out=out, dtype=dtype_name(dtype), merge_onto=merge_onto)
    quantized = set(settings.get("quantized_modules", []))
    rq = result.requantizer = Requantizer.create(requantize, settings, dtype, quantized) if requantize else None

    out_specs = {}
    for key, (path, shape, in_dtype) in specs.items():
        out_specs[name_of[key]] = (shape, dtype if in_dtype.is_floating_point else in_dtype)
    for name, value in saved.items():   # modules_to_save: new heads may not exist in the base at all
        out_specs[name] = (tuple(value.shape), dtype if value.dtype.is_floating_point else value.dtype)
    plan = plan_shards(rq.expand(out_specs) if rq else out_specs, max_shard_size)

    tmp = _staging_folder(out, force)
    try:
        ckpt_key = {v: k for k, v in name_of.items()}
        with ShardedWriter(tmp, plan) as writer:
            for name in tqdm(out_specs, desc="export", unit="tensor", disable=not progress):
                if name in saved:
                    writer.write(name, saved[name].to(out_specs[name][1]))
                    continue
                key = ckpt_key[name]
                path = name.removesuffix(".weight")
                adapted = name.endswith(".weight") and path in updates
                # a frozen 4-bit layer: written as the weights training used
                roundtrip = (name.endswith(".weight") and not adapted and path in quantized
                             and merge_onto == "dequantized")
                if not (adapted or roundtrip or (rq is not None and rq.wants(name))):
                    pieces = stream_tensor(specs[key][0], key, out_specs[name][1])
                    if pieces is not None:      # copied through in pieces: never whole in memory
                        writer.write_stream(name, pieces)
                        continue
                w = read_tensor(specs[key][0], key)
                if adapted:
                    w = _merge_one(path, w, updates[path], config.scaling, settings, merge_onto, result)
                elif roundtrip:
                    w = training_weight(path, w, settings)   # dequant(quant(W)), in W's layout
                if rq is not None and rq.wants(name):
                    rq.write(writer, path, w.float(), result.layers[-1].update_norm if path in updates else 0.0)
                else:
                    writer.write(name, w.to(out_specs[name][1]) if w.is_floating_point() else w)
        write_config(tmp, hf_config, dtype, _config_overrides(settings, hf_config),
                     rq.quantization_config(out_specs) if rq else None)
        for extra in COPIED_FILES:
            if (folder / extra).is_file():
                shutil.copy2(folder / extra, tmp / extra)
        _warn_small_updates(result)
        if verify:
            from qlora.export import verify as ev
            live = None
            if verify_live and settings.get("quantized_modules"):
                live = ev.load_live_qlora(folder, adapter, ev.model_class_for(json.loads(
                    (tmp / "config.json").read_text())), settings)
            check = ev.verify_requantized if rq else ev.verify_export
            result.verification = check(tmp, adapter, result, ev.seen_weight_from_files(folder, settings, merge_onto),
                                        live_model=live, input_folder=folder)
        _finish(tmp, out, result)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _check_requantize_layout(requantize, transposed) -> None:
    if requantize and transposed:
        raise QLoRAError(f"--requantize is not supported for layers stored [in, out] (transformers' Conv1D, e.g. "
                         f"{sorted(transposed)[0]!r}); export in bfloat16/float16 (without --requantize)")


def _merge_one(path, w, update, scaling, settings, merge_onto, result) -> torch.Tensor:
    """The merged fp32 weight of one adapted layer, recording the norms for the report."""
    # Memory: one fp32 copy of the layer (the round trip is chunked, the update added in place),
    # plus the layer as read and as written in the output dtype.
    seen = training_weight(path, w, settings)                       # fp32, W's layout ([out, in]; Conv1D [in, out])
    qerr = _diff_norm(w, seen)                                     # chunked: no whole-layer temporary
    merged = seen if merge_onto == "dequantized" else w.float()
    del seen
    a, b, kind = update
    update_norm = add_delta_(merged, a, b, kind, scaling)            # in place: no [out, in] temporary
    result.layers.append(LayerUpdate(path, update_norm, qerr))
    if not _all_finite(merged):
        raise QLoRAError(f"merging {path} gives non-finite weights; the adapter holds inf/NaN. Nothing was written.")
    return merged


def _config_overrides(settings: dict, hf_config: dict) -> dict:
    overrides = dict(settings.get("config_overrides") or {})
    arch = settings.get("architecture")
    if arch and arch not in (hf_config.get("architectures") or []):
        overrides["architectures"] = [arch]
    return overrides


def _warn_small_updates(result: ExportResult) -> None:
    if result.merge_onto != "original":
        return
    big = [l for l in result.layers if l.quant_error_norm is not None and l.quant_error_norm > l.update_norm]
    if big:
        worst = max(big, key=lambda l: l.ratio)
        result.warnings.append(
            f"--merge-onto original: in {len(big)} of {len(result.layers)} layers the NF4 quantization error is "
            f"larger than the LoRA update (worst {worst.name}: {worst.ratio:.1f}x); the merged model will not "
            "behave like the trained one. Use --merge-onto dequantized.")


def report_dict(result: ExportResult) -> dict:
    report = {
        "out": str(result.out), "dtype": result.dtype, "merge_onto": result.merge_onto,
        "layers": [{"name": l.name, "update_norm": l.update_norm, "quant_error_norm": l.quant_error_norm,
                    "ratio": l.ratio} for l in result.layers],
        "warnings": result.warnings, "verification": result.verification,
    }
    if result.requantizer is not None:
        report["requantize"] = result.requantizer.report()
    return report


# ---------------------------------------------------------------- from an in-memory model

def _clean_name(key: str) -> str | None:
    """Our module's state-dict key -> the plain model's key (None: not part of the plain model)."""
    parts = key.split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
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


def export_merged(model, out, *, dtype="bfloat16", force: bool = False, verify: bool = True, tokenizer=None,
                  max_shard_size: int = 2 << 30, progress: bool = True, requantize: str | None = None) -> ExportResult:
    """Export an in-memory (Q)LoRA model as a plain model folder, one layer at a time: each 4-bit
    weight is dequantized, s·B·A added in fp32, cast to `dtype` (or re-quantized, with
    `requantize="nf4"`/"fp4") and streamed to disk."""
    import tempfile

    from qlora.lora.files import save_adapter
    from qlora.lora.inject import lora_layers
    from qlora.quant.inspect import quant_settings
    dtype = parse_dtype(dtype)
    requantize = check_requantize(requantize)
    out = Path(out)
    if getattr(model, "config", None) is None:
        raise QLoRAError("export_merged needs a transformers model (with .config); for other models use "
                         "qlora.unload_lora on a non-quantized model and save its state_dict")
    from qlora.fsdp.shard import is_sharded
    if is_sharded(model):   # FSDP (qlora.fsdp): no rank holds the whole model in memory
        raise QLoRAError("export_merged needs the whole model in memory, and this one is sharded (FSDP): export "
                         "the adapter train() wrote instead, from one process: qlora export --base BASE_FOLDER "
                         "--adapter OUT_DIR/adapter --out MERGED")
    layers = lora_layers(model)
    modules = dict(model.named_modules())
    _check_requantize_layout(requantize, {n for n, m in modules.items() if is_4bit(m) and is_transposed(m)})
    entries, seen_ids = {}, set()
    for key, value in model.state_dict(keep_vars=True).items():
        name = _clean_name(key)
        if name is None or id(value) in seen_ids:          # tied weights are written once
            continue
        seen_ids.add(id(value))
        owner = modules.get(key.rsplit(".", 1)[0])
        if name.endswith(".weight") and owner is not None and is_4bit(owner):
            shape = tuple(owner.weight.quant_state.shape)[::-1 if is_transposed(owner) else 1]
        else:
            shape = tuple(value.shape)
        entries[name] = (key, owner, shape, dtype if value.dtype.is_floating_point or shape != tuple(value.shape)
                         else value.dtype)
    out_specs = {n: (e[2], e[3]) for n, e in entries.items()}
    four_bit = {n.removesuffix(".weight"): e[1] for n, e in entries.items()
                if n.endswith(".weight") and e[1] is not None and is_4bit(e[1])}
    result = ExportResult(out=out, dtype=dtype_name(dtype), merge_onto="dequantized")
    rq = result.requantizer = Requantizer.create(requantize, quant_settings(model) or {}, dtype, four_bit) \
        if requantize else None
    plan = plan_shards(rq.expand(out_specs) if rq else out_specs, max_shard_size)
    lora_by_base = {id(layer.base_layer): (path, layer) for path, layer in layers.items()}
    tmp = _staging_folder(out, force)
    try:
        state = model.state_dict(keep_vars=True)
        with ShardedWriter(tmp, plan) as writer, torch.no_grad():
            for name in tqdm(out_specs, desc="export", unit="tensor", disable=not progress):
                key, owner, shape, out_dtype = entries[name]
                update_norm = 0.0
                if name.endswith(".weight") and owner is not None and id(owner) in lora_by_base:
                    path, layer = lora_by_base[id(owner)]
                    seen = _plain_weight(owner)
                    delta = layer.delta_weight()
                    update_norm = delta.norm().item()
                    # the unquantized W is not in memory: its rounding error is unknown, not 0
                    result.layers.append(LayerUpdate(path, update_norm, None))
                    tensor = seen if layer.merged else seen + delta
                elif name.endswith(".weight") and owner is not None and is_4bit(owner):
                    tensor = _plain_weight(owner)
                else:
                    tensor = state[key].detach()
                if rq is not None and rq.wants(name):
                    rq.write(writer, name.removesuffix(".weight"), tensor.float(), update_norm)
                else:
                    writer.write(name, tensor.to(out_dtype) if tensor.is_floating_point() else tensor)
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        write_config(tmp, config, dtype, quantization_config=rq.quantization_config(out_specs) if rq else None)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if verify and layers:
            from qlora.export import verify as ev
            # what each adapted (and, for --requantize, each 4-bit) layer held in training, read when asked
            sources = {**four_bit, **{path: layer.base_layer for path, layer in layers.items()}}
            check = ev.verify_requantized if rq else ev.verify_export
            with tempfile.TemporaryDirectory() as adapter_dir:
                save_adapter(model, adapter_dir)
                result.verification = check(tmp, adapter_dir, result, lambda p: _plain_weight(sources[p]),
                                            live_model=model, input_folder=tmp)
        _finish(tmp, out, result)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def summary(result: ExportResult) -> str:
    """A few lines for the terminal: the layers, the verification, and any warning."""
    lines = [f"exported {len(result.layers)} merged layers to {result.out} ({result.dtype}, "
             f"merged onto {result.merge_onto} weights)"]
    if result.layers:
        mean_upd = sum(l.update_norm for l in result.layers) / len(result.layers)
        known = [l for l in result.layers if l.ratio is not None]
        if known:
            worst = max(known, key=lambda l: l.ratio)
            lines.append(f"  LoRA update ||s·B·A||_F: mean {mean_upd:.4g}; NF4 error / update: worst {worst.ratio:.3g} "
                         f"({worst.name})")
        else:      # export_merged: the unquantized weights were never in memory
            lines.append(f"  LoRA update ||s·B·A||_F: mean {mean_upd:.4g} (NF4 error unknown: the unquantized "
                         "weights are not in memory; `qlora export` from the base folder reports it)")
    if result.requantizer is not None:
        lines += result.requantizer.summary()
    v = result.verification
    if v:
        r = v["vs_reference"]
        if v["passed"] is None:      # requantized output: no limit
            verdict = f"-> for information: {v['note']}"
        else:
            verdict = (f"-> {'PASS' if v['passed'] else 'FAIL'} (limits: relative <= {v['thresholds']['relative_error']:g}, "
                       f"agreement >= {v['thresholds']['top1_agreement_pct']:g}%)")
        lines.append(f"  vs unmerged reference: max |Δ| {r['max_abs_error']:.3g}, relative {r['relative_error']:.3g}, "
                     f"top-1 agreement {r['top1_agreement_pct']:.1f}%  {verdict}")
        if "vs_live_qlora" in v:
            r = v["vs_live_qlora"]
            lines.append(f"  vs live QLoRA model (bitsandbytes 4-bit forward, for information): relative "
                         f"{r['relative_error']:.3g}, top-1 agreement {r['top1_agreement_pct']:.1f}%")
    lines += [f"  warning: {w}" for w in result.warnings]
    return "\n".join(lines)
