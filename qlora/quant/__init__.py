"""The 4-bit base: NF4 (or FP4) weights through bitsandbytes, on CPU or CUDA.

    settings.py  the settings and their checks          convert.py  quantize_model (any nn.Module, in place)
    load.py      load_4bit (a Hugging Face folder)      inspect.py  quant_settings, bytes, dequantized weights
    chunked.py   4-bit (de)quantization of a large tensor in pieces (export)
    experts.py   4-bit mixture-of-experts matrices (fused 3-D weights), run from 4 bits
    grouped.py   grouped_mm: rows sorted by group times one matrix per group (experts and their LoRA)
    formats.py   the stored format of a checkpoint (float, bnb 4-bit, FP8, MXFP4) and how load_4bit reads it
    bnb_fixes.py import_bnb: bitsandbytes imported through one door, with qlora's fixes (misaligned CPU dequantize)
"""
from qlora.arch.quantized import is_4bit
from qlora.quant.convert import make_linear4bit, make_params4bit, quantize_model
from qlora.quant.inspect import bits_per_weight, dequantize_weight, quant_settings, quantized_bytes, quantized_numel
from qlora.quant.load import load_4bit
from qlora.quant.settings import (
                                  BLOCKSIZES,
                                  QUANT_TYPES,
                                  check_blocksize,
                                  check_compute_dtype,
                                  check_double_quant,
                                  check_quant_type,
)

is_linear4bit = is_4bit   # the 0.1.0 name

__all__ = ["BLOCKSIZES", "QUANT_TYPES", "bits_per_weight", "check_blocksize", "check_compute_dtype",
           "check_double_quant", "check_quant_type", "dequantize_weight", "is_4bit", "is_linear4bit", "load_4bit",
           "make_linear4bit", "make_params4bit", "quant_settings", "quantize_model", "quantized_bytes",
           "quantized_numel"]
