"""qlora.quant.chunked against bitsandbytes' own whole-tensor quantize_4bit / dequantize_4bit."""
from __future__ import annotations

import pytest
import torch

from qlora.quant.chunked import dequantize_4bit_chunked, quantize_4bit_chunked


@pytest.mark.parametrize("shape, dtype, double_quant, quant_type, blocksize", [
    ((256, 512), torch.bfloat16, True, "nf4", 64),
    ((300, 77), torch.float32, True, "fp4", 64),        # 23,100 elements: a partial last block
    ((1000, 333), torch.float16, False, "nf4", 128),
    ((512, 512), torch.bfloat16, True, "nf4", 256),
])
@pytest.mark.parametrize("chunk", [1 << 20, 4096, 448])
def test_codes_state_and_dequantization_equal_bitsandbytes(shape, dtype, double_quant, quant_type, blocksize, chunk):
    import bitsandbytes.functional as bnbf
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    q, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    q2, state2 = quantize_4bit_chunked(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                                       chunk_elements=chunk)
    assert q2.shape == q.shape and torch.equal(q2, q)
    d1, d2 = state.as_dict(packed=True), state2.as_dict(packed=True)   # what a checkpoint stores
    assert d1.keys() == d2.keys() and all(torch.equal(d1[k], d2[k]) for k in d1)
    expected = bnbf.dequantize_4bit(q, state)
    assert torch.equal(dequantize_4bit_chunked(q2, state2, chunk), expected)
    assert torch.equal(bnbf.dequantize_4bit(q2, state2), expected)
