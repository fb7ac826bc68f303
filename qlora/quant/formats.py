"""The stored format of a checkpoint folder (its config.json's quantization_config), as load_4bit reads it.

    fmt = stored_format(folder)        # 'float' | 'bnb-4bit' | 'fp8' | 'mxfp4'; QLoRAError for anything else
    check_fp8_blocks(folder)           # one FP8 scale per block of every weight (safetensors headers only)
    config = dequantizing_config(fmt)  # transformers' FineGrainedFP8Config / Mxfp4Config(dequantize=True)
    with sequential_loading(), partial_fp8_blocks(block): ...   # one tensor at a time; partial blocks right

How an FP8 or MXFP4 checkpoint becomes NF4: transformers' own loader dequantizes each weight as it is read
(its conversion ops: FP8 `weight` [out, in] e4m3 times `weight_scale_inv` [out/bo, in/bi] per block, or one
scale per tensor; MXFP4 `*_blocks` [E, out, in/32, 16] two e2m1 codes a byte times 2^(`*_scales` - 127) per
32 values) into the model's dtype (load_4bit's compute_dtype), and load_4bit's hook on transformers'
set_param_for_module quantizes each Linear / experts module to 4-bit as soon as its weights are set. So the
codes are exactly "transformers' dequantization, then bitsandbytes' quantize_4bit", and memory holds one
module's float weights at a time beyond the 4-bit model (transformers' merge of per-expert tensors holds
a layer's stored experts, their dequantized copies and the merged matrix at once). transformers reads a
pre-quantized checkpoint with a thread pool that copies tensors onto the target device ahead of the
conversions (on a GPU, up to the whole stored model): sequential_loading switches that off for the load,
as transformers itself does when it quantizes on the fly.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from safetensors import safe_open
from transformers import FineGrainedFP8Config, Mxfp4Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from qlora.errors import QLoRAError

FORMATS = ("float", "bnb-4bit", "fp8", "mxfp4")
DEQUANTIZED = ("fp8", "mxfp4")      # formats read through transformers' dequantization, then made 4-bit


def quantization_config(folder) -> dict:
    """The quantization_config of the folder's config.json ({} for a float checkpoint or no readable config)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config.get("quantization_config") or {}


def stored_format(folder) -> str:
    """'float', 'bnb-4bit', 'fp8' or 'mxfp4' from config.json; any other quantization is one QLoRAError line."""
    q = quantization_config(folder)
    method = q.get("quant_method")
    if not q:
        return "float"
    if method == "bitsandbytes" and (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        return "bnb-4bit"
    if method in DEQUANTIZED:
        return method
    what = "bitsandbytes 8-bit" if method == "bitsandbytes" else f"quant_method {method!r}"
    raise QLoRAError(f"{str(folder)!r} is quantized with {what}; load_4bit reads float, FP8 (quant_method 'fp8'), "
                     "MXFP4 ('mxfp4') and bitsandbytes 4-bit checkpoints: convert the weights to float first and "
                     "remove quantization_config from its config.json")


def dequantizing_config(fmt: str):
    """transformers' config that makes its loader dequantize `fmt` to the model's dtype as it reads."""
    return FineGrainedFP8Config(dequantize=True) if fmt == "fp8" else Mxfp4Config(dequantize=True)


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def check_fp8_blocks(folder) -> None:
    """Every `X.weight_scale_inv` has one scale per [bo, bi] block of `X.weight` (`weight_block_size`; the last
    block of a row or column may be partial: DeepSeek-V3's kv_a_proj_with_mqa has 576 rows, 5 row blocks of 128),
    or a single per-tensor scale. Reads headers only."""
    folder = Path(folder)
    block = quantization_config(folder).get("weight_block_size")
    for file in _safetensors_files(folder):
        with safe_open(file, "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        for key, scale in shapes.items():
            weight = shapes.get(key.removesuffix("_scale_inv"))
            if not key.endswith(".weight_scale_inv") or weight is None or len(weight) < 2:
                continue
            grid = scale[-2:] if len(scale) >= 2 else [1, 1]       # a per-tensor scale: [] or [1]
            whole = [-(-w // b) for w, b in zip(weight[-2:], block)] if block else None
            if grid == [1, 1] or grid == whole or (not block and not any(w % g for w, g in zip(weight[-2:], grid))):
                continue
            raise QLoRAError(
                f"FP8 checkpoint {str(folder)!r}: {key.removesuffix('_scale_inv')} {list(weight)} is not a whole "
                f"number of blocks of its scale grid {list(scale)} (weight_block_size {block}); load_4bit needs "
                "one scale per block (convert this checkpoint to bf16 first)")


@contextlib.contextmanager
def partial_fp8_blocks(block):
    """transformers' FP8 dequantization (`Fp8Dequantize._dequantize_one`) takes the block size from the scale
    grid (rows // grid rows), so a weight whose last block is partial raises (576 rows, 5 scales) or, worse, is
    scaled with the wrong blocks (192 rows, 2 scales: blocks of 96, not 128). For the load, such a weight is
    zero-padded to whole `block`s, dequantized by transformers, and cropped: the format's own definition,
    W[i, j] = q[i, j] * scale[i // bo, j // bi]. (A class attribute patched for one load, restored after.)"""
    if not block:
        yield
        return
    bo, bi = block
    original = Fp8Dequantize._dequantize_one

    def dequantize(self, quantized, scales, output_dtype=None):
        rows, cols = quantized.shape[-2:]
        if quantized.element_size() != 1 or not quantized.is_floating_point() or scales.dim() < 2 \
                or not (rows % bo or cols % bi):
            return original(self, quantized, scales, output_dtype)
        padded = quantized.new_zeros(*quantized.shape[:-2], -(-rows // bo) * bo, -(-cols // bi) * bi)
        padded[..., :rows, :cols] = quantized
        return original(self, padded, scales, output_dtype)[..., :rows, :cols].contiguous()

    Fp8Dequantize._dequantize_one = dequantize
    try:
        yield
    finally:
        Fp8Dequantize._dequantize_one = original


@contextlib.contextmanager
def sequential_loading():
    """transformers' loader without its read-ahead thread pool (HF_DEACTIVATE_ASYNC_LOAD) for one load: each
    checkpoint tensor is read when its conversion runs, so at most one module's tensors are in memory.
    (An environment variable of the process, restored after: not for two concurrent loads in threads.)"""
    before = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = before
