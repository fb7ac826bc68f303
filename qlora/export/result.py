"""What every export shares: the result it reports, its staging folder and config, the summary it prints."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora.errors import QLoRAError
from qlora.export.requantize import Requantizer
from qlora.util.dtypes import dtype_name
from qlora.util.staging import publish, staging_folder

# an image or video model's processor: what AutoProcessor / AutoImageProcessor read beside the weights
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                "chat_template.jinja", *PROCESSOR_FILES)


def copy_base_files(base, dest: Path, names=COPIED_FILES) -> None:
    """Copy the files `names` that the base folder has and `dest` does not have yet (a local folder only)."""
    base = Path(base)
    for name in names:
        if (base / name).is_file() and not (dest / name).exists():
            shutil.copy2(base / name, dest / name)



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

def staging_folder_for(out: Path, force: bool) -> Path:
    """The temp folder the export is written into (qlora.util.staging: stale ones of killed exports removed)."""
    if out.exists() and not force:
        raise QLoRAError(f"{out} already exists; pass --force (force=True) to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise QLoRAError(f"{out} is a file, not a model folder; remove it or choose another --out")
    return staging_folder(out)


def finish(tmp: Path, out: Path, result) -> None:
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


def check_requantize_layout(requantize, transposed) -> None:
    if requantize and transposed:
        raise QLoRAError(f"--requantize is not supported for layers stored [in, out] (transformers' Conv1D, e.g. "
                         f"{sorted(transposed)[0]!r}); export in bfloat16/float16 (without --requantize)")



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
    if v and v.get("mode") == "per-layer":
        lines.append(f"  verified layer by layer ({v['layers_checked']} layers): worst relative error "
                     f"{v['worst_relative_error']:.3g} ({v['worst_tensor']})  -> {'PASS' if v['passed'] else 'FAIL'} "
                     f"(limit {v['thresholds']['relative_error']:g}); skipped {v['skipped']}"
                     + (f"; adapters not merged into the export: {', '.join(v['not_merged'])}" if v.get("not_merged") else ""))
    elif v:
        r = v["vs_reference"]
        if v["passed"] is None:      # requantized output: no limit
            verdict = f"-> for information: {v['note']}"
        else:
            verdict = (f"-> {'PASS' if v['passed'] else 'FAIL'} (limits: relative <= {v['thresholds']['relative_error']:g}, "
                       f"agreement >= {v['thresholds']['top1_agreement_pct']:g}%)")
        lines.append(f"  vs unmerged reference: max |Δ| {r['max_abs_error']:.3g}, relative {r['relative_error']:.3g}, "
                     f"top-1 agreement {r['top1_agreement_pct']:.1f}%  {verdict}")
        if "pixel_values" in v.get("inputs", {}) and "input_ids" in v["inputs"]:
            lines.append(f"  inputs: {v['inputs']['input_ids'][0]} rows of text, one picture each")
        elif v.get("text_only"):
            lines.append(f"  inputs: text only ({v['text_only']})")
        if "vs_live_qlora" in v:
            r = v["vs_live_qlora"]
            lines.append(f"  vs live QLoRA model (bitsandbytes 4-bit forward, for information): relative "
                         f"{r['relative_error']:.3g}, top-1 agreement {r['top1_agreement_pct']:.1f}%")
    lines += [f"  warning: {w}" for w in result.warnings]
    return "\n".join(lines)
