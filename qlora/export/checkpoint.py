"""Reading a base model's checkpoint the way an export needs it: headers, one tensor at a time, key names.

    folder, config, files = base_weight_files("smollm2")     # safetensors only (never unpickled)
    specs = tensor_specs(files)                              # key -> (file, shape, dtype), headers only
    w = training_weight(path, read_tensor(specs[key][0], key), settings)       # what the adapter saw

Checkpoint keys are turned into the model's tensor names by qlora.export.layout (transformers' own
conversion mapping). Memory: nothing here holds more than one tensor.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from qlora.bundled import resolve_model
from qlora.errors import QLoRAError
from qlora.export.writer import SAFETENSORS_DTYPES
from qlora.quant.chunked import CHUNK_ELEMENTS, dequantize_4bit_chunked, quantize_4bit_chunked
from qlora.util.dtypes import parse_dtype

_ST_TORCH = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def base_weight_files(base) -> tuple[Path, dict, list[Path]]:
    """(folder, config.json as dict, safetensors files) of a Hugging Face model folder."""
    folder = Path(resolve_model(str(base)))
    if not folder.is_dir():
        raise QLoRAError(f"base model folder {str(base)!r} does not exist (export needs the weights on disk)")
    if not (folder / "config.json").is_file():
        raise QLoRAError(f"{folder} has no config.json; give the Hugging Face model folder the adapter was trained on")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise QLoRAError(f"{index} is not a valid safetensors index ({e}); re-save the model") from None
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        extra = " (only pickled .bin weights: qlora never unpickles; re-save them as safetensors)" \
            if list(folder.glob("*.bin")) else ""
        raise QLoRAError(f"{folder} has no .safetensors weights{extra}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QLoRAError(f"{folder / 'config.json'} is not valid JSON ({e}); give an intact model folder") from None
    return folder, config, files


def tensor_specs(files: list[Path]) -> dict[str, tuple[Path, tuple, torch.dtype]]:
    """checkpoint key -> (file, shape, dtype), from the headers only (no tensor is read)."""
    specs = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = _ST_TORCH.get(sl.get_dtype())
                if dtype is None:
                    raise QLoRAError(f"{path}: tensor {key!r} has dtype {sl.get_dtype()}, which qlora cannot "
                                     f"export; known: {', '.join(_ST_TORCH)}")
                specs[key] = (path, tuple(sl.get_shape()), dtype)
    return specs


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor, its file opened just for it. safetensors memory-maps the file and every page read
    through an open handle stays in this process's RSS until the handle closes: handles kept open for
    the whole export grew RSS to the size of the model."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def stream_tensor(path: Path, key: str, out_dtype: torch.dtype, piece_bytes: int = 16 << 20):
    """Pieces (flat, cast to `out_dtype` when floating) of one tensor, read with plain file reads.

    A tensor copied through unchanged (embeddings, the head, norms) is the largest thing an export
    touches: reading it whole costs its size in memory, and through safetensors' memory map its pages
    stay in RSS as well. Here at most `piece_bytes` of it is in memory. None for a dtype we don't know
    (the caller then reads it whole)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        entry = json.loads(f.read(n))[key]
    dtype = _ST_TORCH.get(entry["dtype"])
    if dtype is None:
        return None
    start, end = entry["data_offsets"]
    item = torch.empty((), dtype=dtype).element_size()
    step = max(item, piece_bytes // item * item)

    def pieces():
        with open(path, "rb") as f:
            f.seek(8 + n + start)
            remaining = end - start
            while remaining > 0:
                raw = bytearray(f.read(min(step, remaining)))
                if not raw:
                    raise QLoRAError(f"{path} ends inside tensor {key!r}: the file is truncated")
                remaining -= len(raw)
                t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                yield t.to(out_dtype) if t.is_floating_point() else t
    return pieces()


def training_weight(path: str, w: torch.Tensor, settings: dict) -> torch.Tensor:
    """The fp32 weight the adapter at `path` saw in training: dequant(quant(W)) for a 4-bit layer,
    W in the training dtype otherwise. In the checkpoint's layout: a layer in `transposed_modules`
    (transformers' Conv1D, stored [in, out]) was quantized as Wᵀ [out, in], so it is round-tripped so."""
    if path in set(settings.get("quantized_modules", [])):
        if path in set(settings.get("transposed_modules", [])):
            return roundtrip_4bit(w.T, settings).T.contiguous()
        return roundtrip_4bit(w, settings)
    train_dtype = parse_dtype(settings.get("base_dtype") or settings.get("compute_dtype")) if settings else None
    return w.to(train_dtype).float() if train_dtype is not None else w.float()


def roundtrip_4bit(weight: torch.Tensor, settings: dict, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """dequant(quant(W)) exactly as the 4-bit layer held it during training, returned in fp32.

    In pieces (qlora.quant.chunked): bit-exact with bitsandbytes' whole-tensor round trip without its
    ~3.4x-the-layer fp32 scratch, which was the export's peak."""
    from_dtype = parse_dtype(settings.get("quantized_from_dtype") or settings.get("compute_dtype") or "bfloat16")
    packed, state = quantize_4bit_chunked(weight.to(from_dtype), quant_type=settings.get("quant_type", "nf4"),
                                          blocksize=int(settings.get("blocksize", 64)),
                                          double_quant=bool(settings.get("double_quant", True)),
                                          chunk_elements=chunk_elements)
    return dequantize_4bit_chunked(packed, state, chunk_elements).float()
