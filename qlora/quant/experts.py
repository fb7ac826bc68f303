"""4-bit mixture-of-experts matrices: every expert of a fused 3-D weight in NF4/FP4, run from 4 bits.

    quantize_experts(experts_module, compute_dtype=torch.bfloat16)    # in place; qlora.quantize_model calls it
    dequantize_experts(param, idx)                                   # experts idx -> [k, a, b], nothing else

Storage: each 3-D matrix ([E, a, b], qlora.arch.experts) becomes a frozen bitsandbytes `Params4bit` under
its own name, holding exactly what `bitsandbytes.functional.quantize_4bit(W)` gives for the whole tensor
(packed codes [E*a*b/2, 1], absmax per block of `blocksize`, double-quantized absmax; built in pieces by
qlora.quant.chunked, so the quantizer's scratch is ~14 MiB, not 3.4x the stack). Its `quant_state.shape`
is [E, a, b]: everything that counts 4-bit weights (quant_settings, quantized_bytes, memprofile) counts
the experts. Bytes: E*a*b/2 + one absmax byte per 64 weights + ~1 KiB: 4.127 bits per weight.
Expert e owns codes [e*a*b/2, (e+1)*a*b/2) and absmax [e*nb, (e+1)*nb), nb = a*b/blocksize, so any set of
experts dequantizes alone.

Forward (`experts_forward`, bound to each quantized module in place of transformers' dispatch): routing
stays in the model's MoE block; here the token-slots are sorted by expert and the experts that received
tokens are dequantized `qlora_chunk_experts` at a time (<= 64 MiB of 16/32-bit weights per matrix, never
a whole layer), each projection

    y_e = x_e W_e^T (+ b_e) (+ delta_e(x_e))           x_e: the rows routed to expert e

then the module's own `_apply_gate` / `act_fn` (gpt-oss' clamp, interleaved gate/up), `post_expert_norm`,
the routing weights and the sum over top-k, as transformers' grouped_mm does. The frozen matmul saves no
weight for backward (it dequantizes the chunk again). `delta_e` is whatever the module holds in
`expert_deltas[name]` (qlora.lora.experts puts LoRA there: s·(x_e A_eᵀ)B_eᵀ); a module without 4-bit
weights but with deltas (LoRA on 16-bit experts) runs the same code on its float weights.
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
from qlora.util.dtypes import dtype_name

CHUNK_BYTES = 64 << 20
"""Most bytes of dequantized expert weights of one matrix held at a time (forward, and again in backward)."""


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
    """Experts dequantized at a time: CHUNK_BYTES of one matrix at most, never more than half of them."""
    return max(1, min(CHUNK_BYTES // max(bytes_per_expert, 1), (num_experts + 1) // 2))


def use_qlora_forward(module: nn.Module) -> None:
    """Bind `experts_forward` to this module (its instance, not the class: other models are untouched)."""
    if not is_experts_module(module):
        raise TypeError(f"{type(module).__name__} is not a transformers experts module")
    module.forward = types.MethodType(experts_forward, module)
    if not hasattr(module, "qlora_chunk_experts"):
        module.qlora_chunk_experts = max(1, (module.num_experts + 1) // 2)


def dequantize_experts(param, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Experts `idx` (LongTensor [k]; None: all) of a 4-bit 3-D matrix (a Params4bit) -> [k, a, b] in the dtype
    quantized from. Bit-exact with `bitsandbytes.functional.dequantize_4bit` of the whole tensor, sliced."""
    return dequantize_codes(param.data, param.quant_state, idx)


def dequantize_codes(codes: torch.Tensor, qs, idx: torch.Tensor | None = None) -> torch.Tensor:
    """The same from packed codes [E*a*b/2, 1] and their QuantState: only the codes and block constants of
    experts `idx` are read. (Flat shapes: bitsandbytes' CPU kernel mis-scales a matrix whose rows do not end on
    a block boundary; qlora.quant.bnb_fixes.)"""
    E, a, b = qs.shape
    idx = torch.arange(E, device=codes.device) if idx is None else idx
    k, n, nb = len(idx), a * b, a * b // qs.blocksize
    picked = codes.view(E, n // 2)[idx].reshape(-1)
    pos = (idx[:, None] * nb + torch.arange(nb, device=idx.device)).reshape(-1)          # [k*nb] block numbers
    if qs.nested:   # bitsandbytes' dequantize_blockwise of the absmax, on these blocks only: code[q] * scale + offset
        s2 = qs.state2
        absmax = s2.code[qs.absmax[pos].long()] * s2.absmax[pos // s2.blocksize] + qs.offset
    else:
        absmax = qs.absmax[pos]
    out = torch.ops.bitsandbytes.dequantize_4bit.default(picked, absmax.float(), qs.blocksize, qs.quant_type,
                                                         (k * n,), qs.dtype)
    return out.view(k, a, b)


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
    """x [rows, in] sorted by expert -> x W_e^T [rows, out] for the 4-bit experts `idx` (sizes[j] rows each).
    Saves no weight: backward dequantizes the chunk again. Gradient to x only (the weights are frozen)."""

    @staticmethod
    def forward(ctx, x, codes, qs, idx, sizes, transposed):
        ctx.qs, ctx.sizes, ctx.transposed = qs, sizes, transposed
        ctx.save_for_backward(codes, idx)
        return _grouped(x, dequantize_codes(codes, qs, idx), sizes, transposed)

    @staticmethod
    def backward(ctx, dy):
        codes, idx = ctx.saved_tensors
        w = dequantize_codes(codes, ctx.qs, idx)
        return _grouped(dy.to(w.dtype), w, ctx.sizes, not ctx.transposed), None, None, None, None, None


def _grouped(x: torch.Tensor, w: torch.Tensor, sizes: list[int], transposed: bool) -> torch.Tensor:
    """Rows of x (sizes[j] for expert j of the chunk) times w [k, out, in] ([k, in, out] if transposed)."""
    x = x.to(w.dtype)
    if uniform_fake(x, sizes):   # the planner's balanced routing: one batched matmul, the same bytes as the loop
        y = torch.bmm(x.view(len(sizes), sizes[0], -1), w if transposed else w.transpose(1, 2))
        return y.reshape(x.shape[0], -1).clone()                   # the loop's per-expert outputs, then its cat
    parts = x.split(sizes)
    return torch.cat([xj @ w[j] if transposed else xj @ w[j].T for j, xj in enumerate(parts)])


def uniform_fake(x: torch.Tensor, sizes: list[int]) -> bool:
    """Fake tensors (a memory trace) with as many rows for every expert of the chunk: the per-expert loop can be
    traced as one batched op (the same tensors' bytes, a hundred times fewer traced ops on a 128-expert model)."""
    return len(set(sizes)) == 1 and is_fake(x)


def _project(module, name: str, x, idx, sizes, expert_of_row):
    """One matrix of the chunk: base (4-bit or float) (+ bias) (+ delta)."""
    four_bit = matrix_4bit(module, name)
    if four_bit is not None:
        y = _Frozen4bitExperts.apply(x, *four_bit, idx, sizes, module.is_transposed)
    else:
        y = _grouped(x, module.get_parameter(name)[idx], sizes, module.is_transposed)
    if module.has_bias:
        y = y + module.get_parameter(name + "_bias")[expert_of_row]
    deltas = getattr(module, "expert_deltas", None)
    delta = deltas[name](x, idx, sizes) if deltas is not None and name in deltas else None
    return y if delta is None else y + delta.to(y.dtype)      # None: the adapter is disabled or merged


def _routed_counts(ids: torch.Tensor, num_experts: int) -> list[int]:
    """Token-slots per expert. On fake tensors (the planner's trace) the routing is unknown: balanced."""
    if is_fake(ids):
        n = ids.numel()
        return [n // num_experts + (e < n % num_experts) for e in range(num_experts)]
    return torch.bincount(ids.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts].tolist()


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [T, H], top_k_index / top_k_weights [T, K] -> [T, H], as transformers' experts do."""
    up, down = expert_weight_names(self)
    T, K = top_k_index.shape
    ids = top_k_index.reshape(-1)                                   # [S] token-slots, S = T*K
    order = torch.argsort(ids, stable=True)                         # slots sorted by expert (sentinels >= E last)
    counts = _routed_counts(ids, self.num_experts)
    hit = [e for e, c in enumerate(counts) if c]                    # experts that received tokens
    rows = sum(counts)
    order = order[:rows]
    x = hidden_states[order // K]                                   # [rows, H], sorted by expert
    expert_of_row = ids[order]
    outs, start, step = [], 0, self.qlora_chunk_experts
    for i in range(0, len(hit), step):
        chunk = hit[i:i + step]
        sizes = [counts[e] for e in chunk]
        idx = torch.tensor(chunk, device=hidden_states.device)
        part = slice(start, start + sum(sizes))
        h = _project(self, up, x[part], idx, sizes, expert_of_row[part])          # [rows, 2I] or [rows, I]
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)               # the model's own activation
        y = _project(self, down, h, idx, sizes, expert_of_row[part])               # [rows, H]
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        outs.append(y)
        start = part.stop
    if not outs:       # every slot routed elsewhere (expert-parallel sentinels): nothing for these experts
        return torch.zeros_like(hidden_states)
    y = torch.cat(outs) * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    out = y.new_zeros(T * K, y.shape[-1]).index_copy(0, order, y)   # slot order; dropped slots stay 0
    return out.view(T, K, -1).sum(dim=1).to(hidden_states.dtype)
