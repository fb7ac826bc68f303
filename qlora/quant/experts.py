"""4-bit mixture-of-experts matrices: every expert of a fused 3-D weight in NF4/FP4, run from 4 bits.

    quantize_experts(experts_module, compute_dtype=torch.bfloat16)    # in place; qlora.quantize_model calls it
    dequantize_experts(param, lo, hi)                                # experts lo..hi-1 -> [k, a, b], nothing else

Storage: each 3-D matrix ([E, a, b], qlora.arch.experts) becomes a frozen bitsandbytes `Params4bit` under
its own name, holding exactly what `bitsandbytes.functional.quantize_4bit(W)` gives for the whole tensor
(packed codes [E*a*b/2, 1], absmax per block of `blocksize`, double-quantized absmax; built in pieces by
qlora.quant.chunked, so the quantizer's scratch is ~14 MiB, not 3.4x the stack). Its `quant_state.shape`
is [E, a, b]: everything that counts 4-bit weights (quant_settings, quantized_bytes, memprofile) counts
the experts. Bytes: E*a*b/2 + one absmax byte per 64 weights + ~1 KiB: 4.127 bits per weight.
Expert e owns codes [e*a*b/2, (e+1)*a*b/2) and absmax [e*nb, (e+1)*nb), nb = a*b/blocksize, so any set of
experts dequantizes alone (a run of experts is a slice: nothing gathered).

Forward (`experts_forward`, bound to each quantized module in place of transformers' dispatch): routing
stays in the model's MoE block; here the S = T*K token-slots are sorted by expert on the device (row ends
per expert by `searchsorted`: no `.tolist()`, `.item()`, bincount or Python loop over experts), a layer's
matrix is dequantized at once ([E, a, b]; in groups of `qlora_chunk_experts` when it exceeds CHUNK_BYTES,
the only case that reads the row bounds on the host, once per layer), and each projection is one grouped
matmul over all rows (qlora.quant.grouped: torch's grouped kernel, or its fallback)

    y_e = x_e W_e^T (+ b_e) (+ delta_e(x_e))           x_e: the rows routed to expert e

then the module's own `_apply_gate` / `act_fn` (gpt-oss' clamp, interleaved gate/up), `post_expert_norm`,
the routing weights and the sum over top-k, as transformers' grouped_mm does. The frozen matmul saves no
weight for backward (it dequantizes the experts again). `delta_e` is whatever the module holds in
`expert_deltas[name]` (qlora.lora.experts puts LoRA there: s·(x_e A_eᵀ)B_eᵀ, two more grouped matmuls); a
module without 4-bit weights but with deltas (LoRA on 16-bit experts) runs the same code on its float
weights. Expert-parallel sentinel slots (ids >= E) ride with the last expert and get routing weight 0.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from qlora.arch.experts import expert_weight_names, is_experts_module
from qlora.arch.quantized import is_4bit_param
from qlora.quant.bnb_fixes import import_bnb
from qlora.quant.chunked import quant_state_from_bytes, quantize_4bit_chunked
from qlora.quant.grouped import group_ends, grouped_mm
from qlora.util.dtypes import dtype_name

CHUNK_BYTES = 1 << 30
"""Most bytes of dequantized expert weights of one matrix held at a time (forward, and again in backward): a
layer's whole matrix up to this (Qwen3-30B-A3B's gate_up in bf16 is 805 MB; one grouped matmul, no host sync),
groups of experts of this size above it (one host sync per layer to find their rows)."""


# --------------------------------------------------------------------------------------------- storage
def quantize_experts(module: nn.Module, *, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                     blocksize: int) -> nn.Module:
    """Replace the 3-D matrices of one experts module by 4-bit Params4bit (quantized from `compute_dtype`);
    biases are stored in compute_dtype; the module's forward becomes `experts_forward`. In place."""
    bnb = import_bnb()
    per_expert = 0
    for name in expert_weight_names(module):
        w = module._parameters[name]
        if is_4bit_param(w):
            continue
        E, a, b = w.shape
        if (a * b) % blocksize:
            raise ValueError(f"expert matrix {name} [{a}, {b}] is not a whole number of {blocksize}-weight blocks")
        with torch.no_grad():
            packed, state = quantize_4bit_chunked(w.detach().to(compute_dtype), quant_type=quant_type,
                                                  blocksize=blocksize, double_quant=double_quant)
        module._parameters[name] = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, blocksize=blocksize, compress_statistics=double_quant,
            quant_type=quant_type, quant_storage=torch.uint8, bnb_quantized=True)
        module._parameters[name]._is_hf_initialized = True     # a load in progress must not re-initialise it
        per_expert = max(per_expert, a * b * torch.finfo(compute_dtype).bits // 8)
        bias = module._parameters.get(name + "_bias")
        if bias is not None:
            module._parameters[name + "_bias"] = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
            module._parameters[name + "_bias"]._is_hf_initialized = getattr(bias, "_is_hf_initialized", False)
        del w
    module.compute_dtype = compute_dtype
    module.qlora_quantized_from = dtype_name(compute_dtype)
    module.qlora_chunk_experts = chunk_experts(module.num_experts, per_expert)
    use_qlora_forward(module)
    return module


def chunk_experts(num_experts: int, bytes_per_expert: int) -> int:
    """Experts dequantized at a time: all of them when they fit CHUNK_BYTES, else as many as fit."""
    return max(1, min(CHUNK_BYTES // max(bytes_per_expert, 1), num_experts))


def use_qlora_forward(module: nn.Module) -> None:
    """Bind `experts_forward` to this module (its instance, not the class: other models are untouched)."""
    if not is_experts_module(module):
        raise TypeError(f"{type(module).__name__} is not a transformers experts module")
    module.forward = types.MethodType(experts_forward, module)
    if not hasattr(module, "qlora_chunk_experts"):     # float experts with LoRA: their weights are there already
        module.qlora_chunk_experts = module.num_experts


def dequantize_experts(param, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Experts lo..hi-1 (default: all) of a 4-bit 3-D matrix (a Params4bit) -> [k, a, b] in the dtype
    quantized from. Bit-exact with `bitsandbytes.functional.dequantize_4bit` of the whole tensor, sliced."""
    return dequantize_codes(param.data, param.quant_state, lo, hi)


def dequantize_codes(codes: torch.Tensor, qs, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """The same from packed codes [E*a*b/2, 1] and their QuantState: a contiguous run of experts is a slice
    of the codes and block constants (nothing gathered). (Flat shapes: bitsandbytes' CPU kernel mis-scales
    a matrix whose rows do not end on a block boundary; qlora.quant.bnb_fixes.)"""
    E, a, b = qs.shape
    hi = E if hi is None else hi
    n, nb = a * b, a * b // qs.blocksize
    picked = codes.view(E, n // 2)[lo:hi].reshape(-1)
    blocks = slice(lo * nb, hi * nb)
    if qs.nested:   # bitsandbytes' dequantize_blockwise of the absmax, on these blocks only: code[q] * scale + offset
        s2 = qs.state2
        pos = torch.arange(blocks.start, blocks.stop, device=codes.device) // s2.blocksize
        absmax = s2.code[qs.absmax[blocks].long()] * s2.absmax[pos] + qs.offset
    else:
        absmax = qs.absmax[blocks]
    out = torch.ops.bitsandbytes.dequantize_4bit.default(picked, absmax.float(), qs.blocksize, qs.quant_type,
                                                         ((hi - lo) * n,), qs.dtype)
    return out.view(hi - lo, a, b)


def matrix_4bit(module: nn.Module, name: str):
    """(packed codes, QuantState) of a 4-bit experts matrix, or None for a float one: a Params4bit's own, or
    rebuilt from the plain uint8 tensors qlora.fsdp shards (`qlora_4bit_layout`: its constants)."""
    w = module.get_parameter(name)
    if is_4bit_param(w):
        return w.data, w.quant_state
    layout = module.__dict__.get("qlora_4bit_layout", {}).get(name)
    if layout is None:
        return None
    nested = layout["nested"]
    qs = quant_state_from_bytes(
        module.get_parameter(name + "_absmax"), module.get_buffer(name + "_code"), layout["shape"],
        blocksize=layout["blocksize"], quant_type=layout["quant_type"], dtype=layout["dtype"], nested=nested,
        offset=module.get_buffer(name + "_offset") if nested else None,
        absmax2=module.get_buffer(name + "_absmax2") if nested else None,
        code2=module.get_buffer(name + "_code2") if nested else None, blocksize2=layout["blocksize2"])
    return w, qs


# --------------------------------------------------------------------------------------------- forward
class _Frozen4bitExperts(torch.autograd.Function):
    """x [rows, in] sorted by expert -> x W_eᵀ [rows, out] for 4-bit experts lo..hi-1 (rows split by offs).
    Saves no weight: backward dequantizes the experts again. Gradient to x only (the weights are frozen)."""

    @staticmethod
    def forward(ctx, x, codes, qs, lo, hi, offs, transposed):
        ctx.qs, ctx.lo, ctx.hi, ctx.transposed = qs, lo, hi, transposed
        ctx.save_for_backward(codes, offs)
        return grouped_mm(x, _as_in_out(dequantize_codes(codes, qs, lo, hi), transposed), offs)

    @staticmethod
    def backward(ctx, dy):
        codes, offs = ctx.saved_tensors
        w = _as_in_out(dequantize_codes(codes, ctx.qs, ctx.lo, ctx.hi), ctx.transposed)     # [k, in, out]
        return grouped_mm(dy, w.transpose(1, 2), offs), None, None, None, None, None, None


def _as_in_out(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """An experts matrix as [k, in, out] (a view): stored [k, out, in] unless `is_transposed`."""
    return w if transposed else w.transpose(1, 2)


def _project(module, name: str, x, lo: int, hi: int, offs, expert_of_row):
    """One matrix for experts lo..hi-1: base (4-bit or float) (+ bias) (+ delta)."""
    four_bit = matrix_4bit(module, name)
    if four_bit is not None:
        y = _Frozen4bitExperts.apply(x, *four_bit, lo, hi, offs, module.is_transposed)
    else:
        y = grouped_mm(x, _as_in_out(module.get_parameter(name)[lo:hi], module.is_transposed), offs)
    if module.has_bias:
        y = y + module.get_parameter(name + "_bias")[expert_of_row]
    deltas = getattr(module, "expert_deltas", None)
    delta = deltas[name](x, lo, hi, offs) if deltas is not None and name in deltas else None
    return y if delta is None else y + delta.to(y.dtype)      # None: the adapter is disabled or merged


def _expert_groups(module, ends: torch.Tensor, rows: int) -> list[tuple[int, int, int, int]]:
    """(first expert, end expert, first row, end row) of each group of experts dequantized together.
    One group (a whole layer's matrix fits `qlora_chunk_experts`): the row bounds are not needed, no host
    sync. Several: their row bounds are read once per layer (a trace's fake tensors: balanced routing)."""
    E, step = module.num_experts, module.qlora_chunk_experts
    if step >= E:
        return [(0, E, 0, rows)]
    if is_fake(ends):
        bounds = [rows * e // E for e in range(E + 1)]
    else:
        bounds = [0] + ends.tolist()           # the one host sync, only when a layer is dequantized in groups
    return [(lo, min(lo + step, E), bounds[lo], bounds[min(lo + step, E)]) for lo in range(0, E, step)]


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [T, H], top_k_index / top_k_weights [T, K] -> [T, H], as transformers' experts do."""
    up, down = expert_weight_names(self)
    T, K = top_k_index.shape
    E = self.num_experts
    ids, order = torch.sort(top_k_index.reshape(-1), stable=True)    # [S] token-slots by expert, S = T*K
    kept = ids < E                           # expert-parallel sentinels (ids >= E) sort last; weight 0 below
    ids = ids.clamp(max=E - 1)               # ... and ride with the last expert: every row has a group
    ends = group_ends(ids, E)                # [E] int32 row ends, on the device
    x = hidden_states[order // K]            # [S, H] sorted by expert
    outs = []
    for lo, hi, r0, r1 in _expert_groups(self, ends, x.shape[0]):
        if r1 == r0 and outs:    # an empty group adds nothing (the first always runs: T = 0 is an empty output)
            continue
        rows = slice(r0, r1)
        offs = ends[lo:hi] - r0 if r0 else ends[lo:hi]
        h = _project(self, up, x[rows], lo, hi, offs, ids[rows])               # [rows, 2I] or [rows, I]
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)           # the model's own activation
        y = _project(self, down, h, lo, hi, offs, ids[rows])                   # [rows, H]
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        outs.append(y)
    y = (outs[0] if len(outs) == 1 else torch.cat(outs)) * (top_k_weights.reshape(-1)[order] * kept).unsqueeze(-1)
    out = y.new_zeros(T * K, y.shape[-1]).index_copy(0, order, y)    # back to slot order
    return out.view(T, K, -1).sum(dim=1).to(hidden_states.dtype)
