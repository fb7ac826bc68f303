"""Grouped matmul over rows sorted by group: the one primitive the experts path (and its LoRA) runs on.

    y = grouped_mm(a, b, offs)            # a [S, K] sorted by group, b [G, K, N], offs [G] int32 -> [S, N]
    y[r] = a[r] @ b[g]                    # for offs[g-1] <= r < offs[g] (offs[-1] = S: every row has a group)

One op for every device and dtype: torch's grouped kernel (`F.grouped_mm`: CUTLASS on CUDA SM80+, a CPU
kernel since torch 2.9) where there is one, else a loop over the groups that reads `offs` on the host once
(older torch, older GPUs). Either way it is the custom op `qlora::grouped_mm`, so that:
  - a memory trace (fake tensors) sees one op with the output's bytes, in any dtype (torch's own meta
    function accepts bf16 only);
  - autograd is ours: d a = dy @ b_gᵀ per group (the same op), d b_g = a_gᵀ dy_g (`qlora::grouped_mm_wgrad`,
    only when b needs a gradient: the LoRA matrices; frozen 4-bit weights never do).
torch's kernel wants every row stride a multiple of 16 bytes (K and N of 4 bf16 values do not qualify, nor
a LoRA rank of 4 in bf16): such operands are zero-padded along K / N inside the op, which is exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_NATIVE = getattr(F, "grouped_mm", None)          # torch >= 2.10


def _native_ok(t: torch.Tensor) -> bool:
    if _NATIVE is None:
        return False
    if t.device.type == "cuda":
        return torch.cuda.get_device_capability(t.device) >= (8, 0)
    return t.device.type == "cpu"


def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    pad = [0, 0] * (t.dim() - dim % t.dim())
    pad[-1] = size - t.shape[dim]
    return F.pad(t, pad)


def _aligned(n: int, t: torch.Tensor) -> int:
    step = 16 // t.element_size()
    return -(-n // step) * step


def _fits(t: torch.Tensor) -> bool:
    """torch's grouped kernel's layout rule: the last two dims row- or column-major with a 16-byte stride."""
    step = 16 // t.element_size()
    s, n = t.stride(), t.shape
    if s[-1] == 1 and s[-2] >= max(1, n[-1]):
        return s[-2] % step == 0 and t.storage_offset() % step == 0
    if s[-2] == 1 and s[-1] >= max(1, n[-2]):
        return s[-1] % step == 0 and t.storage_offset() % step == 0
    return False


def _mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [S, K] @ b [G, K, N], rows grouped by offs -> [S, N]."""
    if _native_ok(a):
        K, N = a.shape[1], b.shape[2]
        if not (_fits(a) and _fits(b)):   # zero-pad K and N to 16 bytes: exact; only tiny or odd shapes
            Kp, Np = _aligned(K, a), _aligned(N, b)
            a, b = _pad_to(a, 1, Kp).contiguous(), _pad_to(_pad_to(b, 1, Kp), 2, Np).contiguous()
            return _NATIVE(a, b, offs=offs)[:, :N].contiguous()
        return _NATIVE(a, b, offs=offs)
    out = a.new_empty(a.shape[0], b.shape[-1])
    for g, (s, e) in enumerate(_spans(offs)):
        torch.mm(a[s:e], b[g], out=out[s:e])
    return out


def _wgrad(a: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [S, K], dy [S, N] -> [G, K, N]: a_gᵀ dy_g per group (zeros for an empty group)."""
    if _native_ok(a):
        K, N = a.shape[1], dy.shape[1]
        if not (_fits(a.t()) and _fits(dy)):
            a, dy = _pad_to(a, 1, _aligned(K, a)).contiguous(), _pad_to(dy, 1, _aligned(N, dy)).contiguous()
            return _NATIVE(a.t(), dy, offs=offs)[:, :K, :N].contiguous()
        return _NATIVE(a.t(), dy, offs=offs)
    return torch.stack([a[s:e].t() @ dy[s:e] for s, e in _spans(offs)])


def _spans(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()                             # the fallback's one host sync
    return list(zip([0] + ends[:-1], ends))


@torch.library.custom_op("qlora::grouped_mm", mutates_args=())
def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _mm(a, b, offs)


@_grouped_mm.register_fake
def _(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("qlora::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(a: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _wgrad(a, dy, offs)


@_grouped_mm_wgrad.register_fake
def _(a, dy, offs):
    return a.new_empty(offs.shape[0], a.shape[1], dy.shape[1])


def _setup(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b, offs)


def _backward(ctx, dy):
    a, b, offs = ctx.saved_tensors
    dy = dy.contiguous()
    da = _grouped_mm(dy, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    db = _grouped_mm_wgrad(a, dy, offs) if ctx.needs_input_grad[1] else None
    return da, db, None


_grouped_mm.register_autograd(_backward, setup_context=_setup)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [S, K] (rows sorted by group) @ b [G, K, N] per group -> [S, N]; offs [G] int32 cumulative row
    ends, offs[-1] = S. a is cast to b's dtype; differentiable in a and b."""
    return _grouped_mm(a.to(b.dtype), b, offs)


def group_ends(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sorted group ids [S] -> offs [num_groups] int32 (rows with id <= g), on the device: no host sync."""
    bounds = torch.arange(num_groups, device=groups.device, dtype=groups.dtype)
    return torch.searchsorted(groups, bounds, right=True).to(torch.int32)
