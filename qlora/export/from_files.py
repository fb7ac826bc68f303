"""Dequantize-and-merge export: base folder + adapter -> one plain bf16/fp16/fp32 model folder.

    qlora export --base BASE --adapter ADAPTER --out OUT [--dtype bfloat16] [--merge-onto dequantized]
                 [--requantize nf4]                              # 4-bit output (qlora/requantize.py)
    export_adapter(base, adapter, out, dtype="bfloat16")         # the function behind it
    export_merged(model, out, dtype="bfloat16")                   # from an in-memory QLoRA model

The adapter was trained against dequant(quant(W)), not W: by default each adapted weight is
re-quantized with the exact settings recorded in the adapter's config (quant type, blocksize,
double quantization, and the dtype it was quantized from), dequantized, and s·B·A is added in
fp32. The base is read as `from_pretrained` reads it, through transformers' conversion mapping for its
model class (qlora.export.layout: renamed keys, a fused `query_key_value` split into q/k/v, per-expert
tensors stacked), so adapter names meet the model's tensors; each group goes out as `save_pretrained` writes
it (the conversion reverted). Memory stays flat: the base is read one converted group at a time (a tensor,
one layer's q/k/v or experts) and the output streamed one tensor at a time (writer.py), so peak memory is a
few layers in fp32, whatever the model size. The check afterwards loads the merged model when it fits in
memory, else goes layer by layer (qlora.export.verify). Everything is written into a temporary folder beside `out`
and renamed at the end; a killed export leaves no `out`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlora.errors import QLoRAError
from qlora.export import verify as ev
from qlora.export.checkpoint import base_weight_files, roundtrip_4bit, stream_tensor, tensor_specs, training_weight
from qlora.export.experts import add_expert_delta_, expert_updates
from qlora.export.layout import ModelLayout, model_class_for
from qlora.export.requantize import Requantizer, check_requantize
from qlora.export.result import (
    ExportResult,
    LayerUpdate,
    check_requantize_layout,
    copy_base_files,
    finish,
    staging_folder_for,
    write_config,
)
from qlora.export.writer import ShardedWriter, plan_shards
from qlora.lora.experts import peft_stems
from qlora.lora.files import read_adapter_config, read_adapter_tensors
from qlora.quant.formats import DEQUANTIZED
from qlora.util.dtypes import dtype_name, parse_dtype
from qlora.util.sizes import human


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

class MergedBase:
    """The base checkpoint with an adapter merged in, read one converted group at a time: what every export
    from files writes (the folder here, the GGUF file in qlora.export.gguf). `adapter=None`: the base as is.

        src = MergedBase(base, adapter)
        for group in src.layout.groups:
            tensors = src.group_tensors(group)     # {model tensor name: merged tensor}, one group in memory
        src.layers                                 # a LayerUpdate per merged weight, as they were made

    Everything that can be refused (a mismatched adapter, an FP8 base) is refused here, before any writing."""

    def __init__(self, base, adapter=None, *, merge_onto: str = "dequantized", requantize: str | None = None):
        if merge_onto not in ("dequantized", "original"):
            raise QLoRAError(f"merge_onto={merge_onto!r}: use 'dequantized' (the weights the adapter was trained "
                             "against, default) or 'original' (the unquantized base weights)")
        self.merge_onto = merge_onto
        self.folder, self.hf_config, files = base_weight_files(base)
        _refuse_dequantized_base(self.folder, self.hf_config)
        self.adapter = adapter
        self.config = read_adapter_config(adapter) if adapter is not None else None
        self.tensors = read_adapter_tensors(adapter) if adapter is not None else {}
        self.settings = settings = (self.config.qlora if self.config is not None else None) or {}
        self.layout = layout = ModelLayout(self.folder, tensor_specs(files), _config_overrides(settings, self.hf_config))
        self.experts = _experts_of(layout, adapter, settings, merge_onto, requantize) if adapter is not None else None
        tensors, experts = self.tensors, self.experts
        lora_paths = {k.split(".lora_")[0] for k in tensors if ".lora_" in k} - (experts.stems if experts else set())
        self.saved = {k.replace(".modules_to_save.default.", "."): v for k, v in tensors.items() if ".lora_" not in k}
        self.transposed = transposed_paths(adapter, settings, lora_paths) if adapter is not None else set()
        self.updates = adapter_updates(tensors, lora_paths, self.transposed)
        _check_shapes(self.updates, layout.shapes)      # everything fits before anything is written
        self.quantized = set(settings.get("quantized_modules", []))
        self.new_heads = {n: v for n, v in self.saved.items() if n not in layout.group_of}  # modules_to_save only
        self.layers: list[LayerUpdate] = []

    def seen(self, path: str, w: torch.Tensor) -> torch.Tensor:
        """The fp32 weight the adapter at `path` (a module, or an experts matrix) saw in training."""
        if self.merge_onto == "original":
            return w.float()
        if self.experts and path in self.experts.quantized:
            return roundtrip_4bit(w, self.settings)
        return training_weight(path, w, self.settings)

    def merged(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, LayerUpdate | None]:
        """What the export holds for model tensor `name` (read as `w`), and the update added to it, if any."""
        path = name.removesuffix(".weight")
        if self.experts and name in self.experts.matrices:
            return self.experts.merge(name, w, self.seen(name, w), self.tensors, self.config)
        if name.endswith(".weight") and path in self.updates:
            return _merge_one(path, w, self.updates[path], self.config.scaling_for(path), self.settings,
                              self.merge_onto)
        if name.endswith(".weight") and path in self.quantized and self.merge_onto == "dequantized":
            return self.seen(path, w), None      # a frozen 4-bit layer: written as the weights training used
        return w, None

    def touched(self, name: str) -> bool:
        """Whether model tensor `name` differs from the base's (else it may be copied through as stored)."""
        path = name.removesuffix(".weight")
        return (name in self.saved or bool(self.experts and name in self.experts.matrices)
                or name.endswith(".weight") and (path in self.updates
                                                 or path in self.quantized and self.merge_onto == "dequantized"))

    def group_tensors(self, group) -> dict[str, torch.Tensor]:
        """{model tensor name: merged tensor} of one group (fp32 where merged, as stored otherwise); each
        update made is appended to `self.layers`."""
        made = {}
        for name, w in self.layout.read(group).items():
            made[name], update = (self.saved[name], None) if name in self.saved else self.merged(name, w)
            if update is not None:
                self.layers.append(update)
        return made

    def base_tensor(self, path: str) -> tuple[str, torch.Tensor]:
        """(model tensor name, tensor as stored) of an adapted path: a module (its weight) or an experts matrix."""
        name = path + ".weight" if path + ".weight" in self.layout.group_of else path
        return name, self.layout.tensor(name)


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
    if out.exists() and not force:     # before any reading: refused in one line, nothing else said
        staging_folder_for(out, force)
    src = MergedBase(base, adapter, merge_onto=merge_onto, requantize=requantize)
    layout, saved, updates = src.layout, src.saved, src.updates
    check_requantize_layout(requantize, src.transposed)
    result = ExportResult(out=out, dtype=dtype_name(dtype), merge_onto=merge_onto)
    src.layers = result.layers
    rq = result.requantizer = Requantizer.create(requantize, src.settings, dtype, src.quantized) if requantize else None
    if rq is not None:
        _check_requantize_names(layout, rq)

    out_specs = {}
    for group in layout.groups:
        for key, (shape, in_dtype) in group.out.items():
            if group.converter is None and group.name in saved:
                shape, in_dtype = tuple(saved[group.name].shape), saved[group.name].dtype
            out_specs[key] = (shape, dtype if in_dtype.is_floating_point else in_dtype)
    for name, value in src.new_heads.items():
        out_specs[name] = (tuple(value.shape), dtype if value.dtype.is_floating_point else value.dtype)
    plan = plan_shards(rq.expand(out_specs) if rq else out_specs, max_shard_size)

    tmp = staging_folder_for(out, force)
    try:
        with ShardedWriter(tmp, plan) as writer:
            for group in tqdm(layout.groups, desc="export", unit="group", disable=not progress):
                if group.converter is None and not src.touched(group.name) and not (rq is not None
                                                                                     and rq.wants(group.name)):
                    (key, _), out_key = group.sources[0], next(iter(group.out))
                    pieces = stream_tensor(layout.specs[key][0], key, out_specs[out_key][1])
                    if pieces is not None:      # copied through in pieces: never whole in memory
                        writer.write_stream(out_key, pieces)
                        continue
                made = src.group_tensors(group)
                if rq is not None and rq.wants(group.name):
                    path = group.name.removesuffix(".weight")
                    rq.write(writer, path, made[group.name].float(), result.layers[-1].update_norm
                             if path in updates else 0.0)
                    continue
                for key, t in layout.revert(group, made).items():   # the checkpoint's layout, as save_pretrained
                    writer.write(key, t.to(out_specs[key][1]) if t.is_floating_point() else t)
                del made
            for name, value in src.new_heads.items():
                writer.write(name, value.to(out_specs[name][1]))
        write_config(tmp, src.hf_config, dtype, _config_overrides(src.settings, src.hf_config),
                     rq.quantization_config(out_specs) if rq else None)
        copy_base_files(src.folder, tmp)
        _warn_small_updates(result)
        if verify:
            result.verification = _verify(tmp, src.folder, adapter, src.settings, result, verify_live,
                                          lambda path: src.seen(path, src.base_tensor(path)[1]),
                                          lambda path: src.merged(*src.base_tensor(path))[0])
        finish(tmp, out, result)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _refuse_dequantized_base(folder: Path, hf_config: dict) -> None:
    """An FP8 / MXFP4 base (qlora.quant.formats): its tensors are read here by name, as stored, so the merge from
    files would not see the weights the adapter was trained on; the live model has them."""
    stored = (hf_config.get("quantization_config") or {}).get("quant_method")
    if stored in DEQUANTIZED:
        raise QLoRAError(f"qlora export --base {folder}: the base is an {stored.upper()} checkpoint, and the export "
                         "from files reads float checkpoints only; export from the live model instead (bf16): "
                         "model = qlora.load_4bit(BASE); qlora.load_adapter(model, ADAPTER); "
                         "qlora.export_merged(model, OUT) -- what train's export=true does")


def _verify(tmp: Path, folder: Path, adapter, settings: dict, result: ExportResult, verify_live: bool,
            seen, merged) -> dict:
    """The export against the unmerged model on sample inputs (qlora.export.verify) when the merged model fits
    in memory; otherwise layer by layer: each merged tensor read back from `tmp` through transformers'
    conversion against what training saw + s·B·A, recomputed from the base and the adapter, one at a time."""
    fits, size, free = ev.fits_in_memory(tmp)
    if not fits and result.requantizer is None:
        dtype = parse_dtype(result.dtype)
        return ev.verify_layers(tmp, result, lambda path: merged(path).to(dtype),
                                reason=f"the merged model ({human(size)}) does not fit in the memory available "
                                       f"({human(free)})")
    live = None
    if verify_live and (settings.get("quantized_modules") or settings.get("quantized_experts")):
        live = ev.load_live_qlora(folder, adapter, model_class_for(json.loads((tmp / "config.json").read_text())),
                                  settings)
    check = ev.verify_requantized if result.requantizer else ev.verify_export
    return check(tmp, adapter, result, seen, live_model=live, input_folder=folder)


def _check_requantize_names(layout: ModelLayout, rq: Requantizer) -> None:
    """--requantize writes a 4-bit layer under its model name: only where the checkpoint stores it so."""
    moved = [n for g in layout.groups for n in g.shapes if rq.wants(n) and list(g.out) != [n]]
    if moved:
        raise QLoRAError(f"--requantize writes 4-bit layers in the model's own layout, and this checkpoint stores "
                         f"{moved[0]!r} otherwise (transformers converts it when loading); export without "
                         "--requantize")


def _check_shapes(updates: dict, shapes: dict) -> None:
    """Every adapted module has a weight in the base, of the shape its A and B imply (else nothing is written)."""
    for path, (a, b, kind) in updates.items():
        if path + ".weight" not in shapes:
            raise QLoRAError(f"adapter module {path!r} has no weight {path}.weight in the base; "
                             "the adapter was trained on another model. Nothing was written.")
        shape = shapes[path + ".weight"]
        expect = {"linear": (b.shape[0], a.shape[1]), "linear_t": (a.shape[1], b.shape[0]),
                  "embedding": (a.shape[1], b.shape[0]),
                  "conv": (b.shape[0], *a.shape[1:])}[kind]
        if tuple(shape) != tuple(expect):
            raise QLoRAError(f"adapter for {path!r} expects a weight of shape {expect} but the base has {shape}; "
                             "the adapter was trained on another model size. Nothing was written.")


def _experts_of(layout: ModelLayout, adapter, settings: dict, merge_onto: str, requantize):
    """The experts matrices this export merges or rebuilds (an adapter with target_parameters, or a base whose
    experts were 4-bit in training), or None for a model without."""
    raw = json.loads((Path(adapter) / "adapter_config.json").read_text())
    if not (raw.get("target_parameters") or settings.get("quantized_experts")):
        return None
    if merge_onto != "dequantized":
        raise QLoRAError("--merge-onto original is not supported for mixture-of-experts adapters yet; use the "
                         "default (dequantized: the weights the adapter was trained against)")
    if requantize:
        raise QLoRAError("--requantize does not write 4-bit experts matrices yet; export in bfloat16/float16 "
                         "(without --requantize)")
    return _Experts(layout, raw.get("target_parameters") or [], settings)


class _Experts:
    """The experts matrices of an export from files: which are adapted (PEFT's `target_parameters`) or were 4-bit
    in training, and the merge of one (the matrix comes converted by ModelLayout: one layer's experts at a time)."""

    def __init__(self, layout: ModelLayout, target_parameters, settings):
        self.targets, self.quantized = list(target_parameters), set(settings.get("quantized_experts", []))
        self.matrices = set(self.targets) | self.quantized
        missing = sorted(m for m in self.matrices if m not in layout.group_of)
        if missing:
            raise QLoRAError(f"the adapter's experts matrix {missing[0]!r} is not in the base checkpoint; the adapter "
                             "was trained on another model. Nothing was written.")
        self.model = layout.model
        modules = dict(self.model.named_modules())
        by_module: dict[str, list[str]] = {}
        for path in self.targets:
            module, _, name = path.rpartition(".")
            by_module.setdefault(module, []).append(name)
        self.stems = {stem for m, names in by_module.items()
                      for stem in peft_stems(m, modules[m], names).values()}

    def merge(self, matrix: str, w: torch.Tensor, seen: torch.Tensor, tensors: dict, config):
        """(seen + s·B_e·A_e per expert in fp32, its LayerUpdate) for an adapted matrix; (seen, None) otherwise."""
        qerr = _diff_norm(w, seen) if matrix in self.quantized else 0.0
        if matrix not in self.targets:
            return seen, None
        module = matrix.rpartition(".")[0]
        a, b = expert_updates(tensors, [t for t in self.targets if t.rpartition(".")[0] == module], self.model)[matrix]
        norm = add_expert_delta_(seen, a, b, config.scaling_for(matrix), bool(self.model.get_submodule(module)
                                                                               .is_transposed))
        if not _all_finite(seen):
            raise QLoRAError(f"merging {matrix} gives non-finite weights; the adapter holds inf/NaN. Nothing was written.")
        return seen, LayerUpdate(matrix, norm, qerr)


def _merge_one(path, w, update, scaling, settings, merge_onto) -> tuple[torch.Tensor, LayerUpdate]:
    """(the merged fp32 weight of one adapted layer, its norms for the report)."""
    # Memory: one fp32 copy of the layer (the round trip is chunked, the update added in place),
    # plus the layer as read and as written in the output dtype.
    seen = training_weight(path, w, settings)                       # fp32, W's layout ([out, in]; Conv1D [in, out])
    qerr = _diff_norm(w, seen)                                     # chunked: no whole-layer temporary
    merged = seen if merge_onto == "dequantized" else w.float()
    del seen
    a, b, kind = update
    update_norm = add_delta_(merged, a, b, kind, scaling)            # in place: no [out, in] temporary
    if not _all_finite(merged):
        raise QLoRAError(f"merging {path} gives non-finite weights; the adapter holds inf/NaN. Nothing was written.")
    return merged, LayerUpdate(path, update_norm, qerr)


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


