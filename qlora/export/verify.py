"""Checks an exported folder against what was trained, on a few fixed inputs.

1. Reference: the exported model with every adapted weight put back to the weight the adapter
   saw in training (dequant(quant(W)) for 4-bit layers) and the adapter applied as a separate
   path, in the export's dtype. The merged export must match it to rounding level: with fp32,
   relative logit error <= 1e-4 and 100% teacher-forced top-1 agreement.
2. For information: the live QLoRA model (bitsandbytes' 4-bit forward + adapter). bitsandbytes'
   CPU 4-bit forward differs from x·dequant(W)ᵀ by ~0.3% per layer, so expect bf16-level noise.

3. A --requantize export has no limit: its logits against the same reference are reported for
   information (verify_requantized).

Memory: one model at a time; the reference is made from the exported model in place. When that model
does not fit in the memory available (`fits_in_memory`), `verify_layers` checks the export layer by layer
instead: each merged tensor read back from the folder (through transformers' conversion, as from_pretrained
reads it) against the weight training saw + s·B·A (from the live model, or the base and adapter files), one
layer at a time (its peak is about one layer for any model size); the end-to-end logits are then
skipped, and the report says so.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from qlora.arch.multimodal import text_config_of
from qlora.errors import QLoRAError
from qlora.export.checkpoint import tensor_specs
from qlora.export.layout import ModelLayout, model_class_for
from qlora.lora.files import load_adapter, read_adapter_config
from qlora.plan.images import image_inputs, image_tokens, with_images
from qlora.quant.load import load_4bit
from qlora.util.dtypes import parse_dtype

# relative logit error (||Δ||/||ref||) and top-1 agreement an export must reach against the reference
THRESHOLDS = {"float32": (1e-4, 100.0), "float16": (1e-2, 99.0), "bfloat16": (5e-2, 95.0)}
SENTENCES = ["The capital of France is Paris, and it is known for the Eiffel Tower.",
             "A surprisingly tender film that never quite finds its footing.",
             "def add(a, b):\n    return a + b",
             "Low-rank adapters train a small update beside a frozen, quantized base model."]
IMAGE_SIDE = 64     # pixels: an image-text model's picture where its tower takes any size (a few image tokens)


def sample_inputs(folder: Path, model, n: int = 4, seq: int = 24) -> dict:
    """Token ids of a few fixed sentences (random ids, seeded, without a tokenizer); pixels for vision; for an
    image-text model, one picture of random pixels in each row after its first token (`image_rows`)."""
    config = model.config
    gen = torch.Generator().manual_seed(0)
    if getattr(config, "model_type", "") == "vit" or hasattr(config, "image_size") and hasattr(config, "num_channels"):
        return {"pixel_values": torch.randn(n, config.num_channels, config.image_size, config.image_size,
                                            generator=gen)}
    vocab = (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(SENTENCES[:n], return_tensors="pt", padding="max_length", truncation=True, max_length=seq)
        if not enc["attention_mask"].any(-1).all() or enc["input_ids"].max() >= vocab:
            raise ValueError("no usable tokenizer")   # transformers 5 builds an empty one for a bare GPT-2 folder
        text = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    except Exception:  # noqa: BLE001 -- no tokenizer in the folder: seeded random ids
        ids = torch.randint(0, vocab, (n, seq), generator=gen)
        text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return image_rows(model, text, gen) if text_config_of(config) is not None else text


def image_rows(model, text: dict, gen: torch.Generator) -> dict:
    """The text rows with one picture each: its image tokens inserted after the first token, the processor's
    tensors for it (qlora.plan.images: the family's own image processor and token count, at IMAGE_SIDE pixels or
    the tower's resolution), float ones replaced by seeded random pixels. The rows alone, with `text_only` saying
    why, where the family's processor cannot be built here."""
    try:
        pixels = image_inputs(model.config, IMAGE_SIDE)
        tokens = image_tokens(model, pixels)
    except QLoRAError as e:
        return {**text, "text_only": str(e)}
    ids, mask = text["input_ids"], text["attention_mask"]
    room = torch.zeros(ids.shape[0], tokens, dtype=ids.dtype)        # [rows, tokens]: where the picture goes
    text = {"input_ids": torch.cat([ids[:, :1], room, ids[:, 1:]], 1),
            "attention_mask": torch.cat([mask[:, :1], room + 1, mask[:, 1:]], 1)}
    out = with_images(model, text, pixels, tokens, images=1)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) if k in pixels and v.is_floating_point() else v
            for k, v in out.items()}


@torch.no_grad()
def outputs(model, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


def compare(got: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> dict:
    diff = (got - ref)
    agree = got.argmax(-1) == ref.argmax(-1)
    if mask is not None and agree.dim() == mask.dim():
        agree = agree[mask.bool()]
    return {"max_abs_error": diff.abs().max().item(),
            "relative_error": (diff.norm() / ref.norm().clamp_min(1e-30)).item(),
            "top1_agreement_pct": 100.0 * agree.float().mean().item()}


def _against_reference(folder: Path, adapter, result, put_back, *, live_model=None, input_folder=None,
                       **load_kwargs) -> dict:
    """Logits of the export in `folder` vs the unmerged reference built from the same loaded model:
    `put_back(model, dtype)` restores what training saw in each adapted layer, then the adapter is
    attached as a separate path. Also vs `live_model`, if given (for information)."""
    cls = model_class_for(json.loads((Path(folder) / "config.json").read_text()))
    dtype = parse_dtype(result.dtype)
    model = cls.from_pretrained(folder, dtype=dtype, **load_kwargs).eval()
    inputs = sample_inputs(Path(input_folder or folder), model)
    text_only = inputs.pop("text_only", None)
    mask = inputs.get("attention_mask")
    exported = outputs(model, inputs)
    with torch.no_grad():
        put_back(model, dtype)
    load_adapter(model, adapter, dtype=dtype).eval()   # the new LoRA layers start in train mode: no dropout here
    reference = outputs(model, inputs)
    del model
    report = {"inputs": {k: list(v.shape) for k, v in inputs.items()},
              "vs_reference": compare(exported, reference, mask)}
    if text_only:
        report["text_only"] = text_only
    if live_model is not None:
        report["vs_live_qlora"] = compare(exported, outputs(live_model.eval(), inputs), mask)
    return report


def verify_export(folder: Path, adapter, result, seen_weight, *, live_model=None, input_folder=None) -> dict:
    """Compare the export in `folder` with the unmerged reference (and `live_model`, if given).

    `seen_weight(path)` gives the fp32 weight the adapter at module `path` saw in training."""
    def put_back(model, dtype):                 # adapted weights back to what training saw
        params = dict(model.named_parameters())
        for layer in result.layers:     # a module's weight, or an experts matrix (named by its own path)
            name = layer.name + ".weight" if layer.name + ".weight" in params else layer.name
            params[name].copy_(seen_weight(layer.name).to(dtype))
    report = _against_reference(folder, adapter, result, put_back, live_model=live_model, input_folder=input_folder)
    limit_rel, limit_agree = THRESHOLDS[result.dtype]
    report["thresholds"] = {"relative_error": limit_rel, "top1_agreement_pct": limit_agree}
    vs = report["vs_reference"]
    report["passed"] = vs["relative_error"] <= limit_rel and vs["top1_agreement_pct"] >= limit_agree
    return report


REQUANTIZED_NOTE = ("no pass/fail limit for requantized output: the 4-bit rounding of the merged weights is "
                    "a choice, its size is reported above")


def verify_requantized(folder: Path, adapter, result, seen_weight, *, live_model=None, input_folder=None) -> dict:
    """A --requantize export, loaded by transformers + bitsandbytes on CPU, against the unmerged
    reference: the same model with each 4-bit layer put back to a float Linear holding what training
    saw, plus the adapter as a separate path. For information: `passed` is None (no limit)."""
    def put_back(model, dtype):                 # 4-bit layers back to float Linears holding what training saw
        for layer in result.requantizer.layers:
            old = model.get_submodule(layer.name)
            new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, dtype=dtype)
            new.weight.copy_(seen_weight(layer.name).to(dtype))
            if old.bias is not None:
                new.bias.copy_(old.bias)
            model.set_submodule(layer.name, new)
    report = _against_reference(folder, adapter, result, put_back, live_model=live_model, input_folder=input_folder,
                                device_map="cpu")
    report.update(thresholds=None, passed=None, note=REQUANTIZED_NOTE)
    return report


def load_live_qlora(base_folder: Path, adapter, cls, settings: dict):
    """The trained QLoRA model as it ran: 4-bit base (same settings) + adapter."""
    labels = {k: v for k, v in (settings.get("config_overrides") or {}).items() if k in ("id2label", "label2id")}
    # modules trained in full (e.g. a pooler + classifier head) stayed in float during training
    keep = list(read_adapter_config(adapter).modules_to_save or []) or None
    live = load_4bit(str(base_folder), cls, quant_type=settings.get("quant_type", "nf4"),
                     double_quant=settings.get("double_quant", True),
                     compute_dtype=parse_dtype(settings.get("compute_dtype", "bfloat16")),
                     blocksize=int(settings.get("blocksize", 64)), skip_modules=keep,
                     quantize_vision=bool(settings.get("quantize_vision")), **labels)
    return load_adapter(live, adapter)


# relative error of a merged weight read back from the export against seen + s·B·A: the export dtype's rounding
LAYER_THRESHOLDS = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1e-2}


def available_memory() -> int | None:
    """Bytes of memory available to this process (Linux: MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def fits_in_memory(folder: Path) -> tuple[bool, int, int | None]:
    """(whether loading the exported model for the end-to-end check fits, its bytes, bytes available): the
    folder's weights plus half again for the check's activations and the reference's put-back layers."""
    size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    free = available_memory()
    return free is None or size * 3 // 2 < free, size, free


def verify_layers(folder: Path, result, expected, *, reason: str, missing=()) -> dict:
    """The export checked layer by layer: for each adapted weight (a module, or an experts matrix, by its path),
    `expected(name)` gives the model tensor it must hold (computed one at a time), compared with that tensor read
    back from the folder as from_pretrained reads it (qlora.export.layout: transformers' conversion, one group at
    a time). The worst relative error must be within the export dtype's rounding."""
    layout = ModelLayout(folder, tensor_specs(sorted(Path(folder).glob("*.safetensors"))))
    worst, worst_name = 0.0, None
    for layer in result.layers:
        name = layer.name + ".weight" if layer.name + ".weight" in layout.group_of else layer.name
        got, want = layout.tensor(name).float(), expected(layer.name).detach().float()
        rel = float((got - want).norm() / want.norm().clamp_min(1e-30))
        if rel >= worst:
            worst, worst_name = rel, name
        del got, want
    limit = LAYER_THRESHOLDS[result.dtype]
    return {"mode": "per-layer", "layers_checked": len(result.layers), "worst_relative_error": worst,
            "worst_tensor": worst_name, "thresholds": {"relative_error": limit},
            "passed": worst <= limit and not missing, "not_merged": list(missing),
            "skipped": f"end-to-end logits: {reason}"}
