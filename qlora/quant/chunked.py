"""4-bit (NF4/FP4) quantization of one tensor in pieces, bit-exact with bitsandbytes' whole-tensor call.

    codes, state = quantize_4bit_chunked(w, quant_type="nf4", blocksize=64, double_quant=True)
    w_hat = dequantize_4bit_chunked(codes, state)          # == bitsandbytes.functional.dequantize_4bit

Why: bitsandbytes' CPU ``quantize_4bit`` needs about 3.4x its input in fp32 scratch, so quantizing
a whole [5632, 2048] MLP weight was the peak of a streaming export. The pieces are whole
quantization blocks, so each block's codes and absmax are those of the whole-tensor call; the
second-level ("double") quantization of the absmax vector needs the whole vector (its offset is
the vector's mean) and is done once, the way ``bitsandbytes.functional.quantize_4bit`` does it.
Used by the export (qlora.export.from_files, qlora.export.requantize); training layers are built by
``qlora.quant.convert.make_params4bit``. Tests compare both functions with bitsandbytes' own.
"""
from __future__ import annotations

import torch

from qlora.quant.bnb_fixes import import_bnb

CHUNK_ELEMENTS = 1 << 20     # 4 MiB of fp32 per piece: ~14 MiB of quantizer scratch


def _step(blocksize: int, chunk_elements: int) -> int:
    return max(blocksize, chunk_elements // blocksize * blocksize)


def quantize_4bit_chunked(weight: torch.Tensor, *, quant_type: str, blocksize: int, double_quant: bool,
                          chunk_elements: int = CHUNK_ELEMENTS):
    """(packed uint8 codes [(n+1)//2, 1], bitsandbytes QuantState) of `weight` in its own dtype."""
    F = import_bnb().functional
    flat = weight.reshape(-1)
    step = _step(blocksize, chunk_elements)
    codes, absmax = [], []
    for i in range(0, flat.numel(), step):
        c, a = torch.ops.bitsandbytes.quantize_4bit.default(flat[i:i + step], blocksize, quant_type, torch.uint8)
        codes.append(c.reshape(-1))
        absmax.append(a)
    packed = torch.cat(codes).reshape(-1, 1)
    absmax = torch.cat(absmax)
    code = F.get_4bit_type(quant_type, device=weight.device)
    common = dict(shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code, quant_type=quant_type)
    if not double_quant:
        return packed, F.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    q_absmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, F.QuantState(absmax=q_absmax, offset=offset, state2=state2, **common)


def dequantize_4bit_chunked(packed: torch.Tensor, state, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """The weight in ``state.dtype`` and ``state.shape``, dequantized piece by piece."""
    F = import_bnb().functional
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        absmax = absmax.float()
    n, bs = state.shape.numel(), state.blocksize
    step = _step(bs, chunk_elements)
    codes = packed.reshape(-1)
    out = torch.empty(n, dtype=state.dtype, device=packed.device)
    for i in range(0, n, step):
        m = min(step, n - i)
        out[i:i + m] = torch.ops.bitsandbytes.dequantize_4bit.default(
            codes[i // 2:(i + m + 1) // 2], absmax[i // bs:(i + m + bs - 1) // bs], bs, state.quant_type, (m,),
            state.dtype)
    return out.view(state.shape)


def quant_state_from_bytes(absmax: torch.Tensor, code: torch.Tensor, shape, *, blocksize: int, quant_type: str,
                           dtype: torch.dtype, nested: bool, offset=None, absmax2=None, code2=None,
                           blocksize2: int = 256):
    """A bitsandbytes QuantState from plain tensors (how qlora.fsdp ships a 4-bit weight: `absmax` as uint8
    bytes, the fp32 absmax viewed as bytes when not nested; the nested constants replicated)."""
    import bitsandbytes.functional as F  # lazy: import_bnb() ran (the 4-bit layers passed here were made through it)
    state2 = F.QuantState(absmax=absmax2, code=code2, blocksize=blocksize2, dtype=torch.float32) if nested else None
    return F.QuantState(absmax=absmax if nested else absmax.view(torch.float32), shape=torch.Size(shape), code=code,
                        blocksize=blocksize, quant_type=quant_type, dtype=dtype, offset=offset if nested else None,
                        state2=state2)
