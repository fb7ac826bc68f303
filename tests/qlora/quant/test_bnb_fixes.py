"""qlora.quant.bnb_fixes: 4-bit dequantization on CPU of a matrix whose rows split a quantization block.

bitsandbytes 0.50's native CPU kernel for `dequantize_4bit` with an [m, n] shape, n % blocksize != 0, scales
values with the wrong block's absmax on some CPUs (seen on an AVX512 Xeon: ~0.31 relative error for
[16, 96] at blocksize 64 instead of ~0.09); the flat shape (m*n,) is right everywhere. These tests compare
against that flat call, so they fail on such a CPU without the fix and pass everywhere with it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

from qlora.quant.bnb_fixes import import_bnb, misaligned
from qlora.quant.convert import make_linear4bit

bnb = import_bnb()
F = bnb.functional


def flat_dequantize(packed: torch.Tensor, qs) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit called with the flat shape (right on every CPU), viewed as qs.shape."""
    absmax = qs.absmax
    if qs.nested:
        absmax = (F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    out = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, qs.blocksize, qs.quant_type,
                                                         [qs.shape.numel()], qs.dtype)
    return out.view(qs.shape)


def test_misaligned():
    assert misaligned((16, 96), 64) and misaligned((3, 5, 96), 64) and misaligned((8, 576), 128)
    assert not misaligned((16, 128), 64) and not misaligned((1536,), 64) and not misaligned((1, 96), 64)


@pytest.mark.parametrize("shape, blocksize", [((16, 96), 64), ((8, 576), 128), ((3, 5, 96), 64), ((16, 128), 64),
                                              ((4, 97), 64), ((24, 40), 32)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_4bit_equals_the_flat_shape(shape, blocksize, quant_type, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    q, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    got = F.dequantize_4bit(q, qs)
    want = flat_dequantize(q, qs)
    assert got.shape == w.shape and got.dtype == dtype
    assert torch.equal(got, want)
    # and the flat call is right: NF4/FP4 round trips of a Gaussian are ~0.09 / ~0.13 off
    assert ((got.float() - w.float()).norm() / w.float().norm()).item() < 0.16
    with torch.inference_mode():          # autograd keys are skipped there: the fix sits on the CPU kernel
        assert torch.equal(F.dequantize_4bit(q, qs), want)


def test_fake_tensors_trace_the_op_unchanged():
    """The planner traces bitsandbytes' ops on FakeTensorMode: they never reach the CPU kernel."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    q, qs = F.quantize_4bit(torch.randn(16, 96), blocksize=64, quant_type="nf4", compress_statistics=False)
    with FakeTensorMode() as mode:
        out = torch.ops.bitsandbytes.dequantize_4bit.default(
            mode.from_tensor(q), mode.from_tensor(qs.absmax), 64, "nf4", [16, 96], torch.bfloat16)
    assert isinstance(out, FakeTensor) and out.shape == (16, 96) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_96_to_16_trains_on_its_dequantized_weight(compute_dtype):
    """bitsandbytes' matmul_4bit training path (forward and backward) dequantizes the whole weight."""
    torch.manual_seed(0)
    layer = make_linear4bit(nn.Linear(96, 16), compute_dtype=compute_dtype, blocksize=64).train()
    w = flat_dequantize(layer.weight.data, layer.weight.quant_state).to(compute_dtype)     # [16, 96]
    x = torch.randn(2, 3, 96, dtype=compute_dtype, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = tF.linear(x_ref, w, layer.bias)
    y_ref.square().sum().backward()
    tol = 1e-5 if compute_dtype == torch.float32 else 1e-2      # bf16: rounding of the two matmuls
    for got, want in ((y, y_ref), (x.grad, x_ref.grad)):        # the misaligned kernel: ~0.2 off
        assert got.shape == want.shape and ((got - want).float().norm() / want.float().norm()).item() < tol


def test_import_bnb_is_quiet():
    """A fresh process: importing qlora and applying the fix prints nothing (torch warns when a kernel is
    replaced; that warning is ours to drop)."""
    code = ("import qlora\nfrom qlora.quant.bnb_fixes import import_bnb, _state\nimport_bnb(); import_bnb()\n"
            "print(_state['how'])\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("CPU", "AutogradCPU") and proc.stderr == "", proc.stderr
