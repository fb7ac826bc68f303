"""bitsandbytes through one door: `bnb = import_bnb()` imports it and corrects what it gets wrong for us.

    bnb = import_bnb()              # == `import bitsandbytes as bnb`, plus the fixes below (applied once)
    F = import_bnb().functional

qlora calls it wherever it first needs bitsandbytes for real values (quantize_model, load_4bit, add_lora
on a 4-bit model, dequantize_weight, the 4-bit experts, FSDP sharding, the export); the planner, which only
traces bitsandbytes' ops on fake tensors, does not need it.

The fix: 4-bit dequantization on CPU of a matrix whose rows do not end on a block boundary.
bitsandbytes 0.50 dequantizes a [m, n] 4-bit tensor on CPU with a native kernel that walks the
codes row by row (``cdequantize_blockwise_cpu_{nf4,fp4}_{fp32,bf16,fp16}(A, absmax, out, blocksize,
m, n)``). When ``n % blocksize != 0`` a quantization block spans two rows, and that kernel scales
the values with the wrong block's absmax: ``dequantize_4bit(quantize_4bit(randn(16, 96),
blocksize=64))`` is ~0.31 off (relative) instead of NF4's ~0.09. (Seen on an AVX512(-BF16) Xeon;
the same bitsandbytes gives the right values on the AMD machine the suite was written on. An odd ``n``
falls back to bitsandbytes' generic kernel and is right.) The same op called with the flat shape ``(m*n,)`` is correct. It hits
every Linear4bit whose in_features is not a multiple of the blocksize (tiny test models, but also
e.g. hidden 576 with blocksize 128): through ``bitsandbytes.functional.dequantize_4bit``, the
training path of ``bnb.matmul_4bit`` (forward and the backward's dequantized weight), and our export.

How: torch's dispatcher lets a kernel be replaced by one that calls the original
(``torch.library.get_kernel`` + ``Library.impl(..., "CPU", with_keyset=True)``, the documented
pattern). Ours calls bitsandbytes' own CPU kernel, with the flat shape when a block would span two
rows, and views the result as the asked shape: the same values the flat call gives, bit for bit; an
aligned shape is passed through unchanged. Only the CPU kernel is replaced: fake tensors (the planner)
and the meta device never reach it, CUDA's kernel is flat already, and it is in force under
``torch.inference_mode`` too. On torch without ``get_kernel`` (< 2.9) the same redirection is
registered at the AutogradCPU key instead, redispatching below autograd (then not under
``inference_mode``, where autograd keys are skipped).
"""
from __future__ import annotations

import math
import warnings

import torch

_OP = "bitsandbytes::dequantize_4bit"
_state: dict = {}     # "lib": the torch.library.Library holding our kernel (kept alive), "how": where it sits


def import_bnb():
    """`bitsandbytes`, imported, with qlora's fixes applied (once per process; cheap afterwards)."""
    import bitsandbytes  # lazy: the door: bitsandbytes (~1.8 s) is imported when first needed
    if "lib" not in _state:
        _fix_cpu_dequantize_4bit()
    return bitsandbytes


def misaligned(shape, blocksize: int) -> bool:
    """Whether a quantization block of a tensor of this shape spans two rows (more than one row, and the
    last dimension not a multiple of the block size): the case bitsandbytes' CPU kernel gets wrong."""
    return len(shape) > 1 and math.prod(shape[:-1]) > 1 and shape[-1] % blocksize != 0


def _fix_cpu_dequantize_4bit() -> None:
    op = torch.ops.bitsandbytes.dequantize_4bit.default
    lib = torch.library.Library("bitsandbytes", "IMPL")
    get_kernel = getattr(torch.library, "get_kernel", None)
    if get_kernel is not None:
        original = get_kernel(op, "CPU")

        def dequantize_4bit_cpu(keyset, A, absmax, blocksize, quant_type, shape, dtype):
            if misaligned(shape, blocksize):
                flat = original.call_boxed(keyset, A, absmax, blocksize, quant_type, [math.prod(shape)], dtype)
                return flat.view(shape)
            return original.call_boxed(keyset, A, absmax, blocksize, quant_type, shape, dtype)

        # torch warns (once per process, for any operator) that a kernel is being replaced: that is the point here
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
            lib.impl(op, dequantize_4bit_cpu, "CPU", with_keyset=True)
        _state.update(lib=lib, how="CPU")
        return

    below_autograd = torch._C._after_autograd_keyset

    def dequantize_4bit_autograd_cpu(keyset, A, absmax, blocksize, quant_type, shape, dtype):
        keyset = keyset & below_autograd
        if misaligned(shape, blocksize):
            return op.redispatch(keyset, A, absmax, blocksize, quant_type, [math.prod(shape)], dtype).view(shape)
        return op.redispatch(keyset, A, absmax, blocksize, quant_type, shape, dtype)

    lib.impl(op, dequantize_4bit_autograd_cpu, "AutogradCPU", with_keyset=True)
    _state.update(lib=lib, how="AutogradCPU")
