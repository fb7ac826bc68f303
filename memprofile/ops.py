"""Shape-level torch ops for memprofile.symbolic: what each saves for backward, what backward allocates.

Each function mirrors one torch op (or one small HF/bitsandbytes/LoRA module) on `Sym`s. The
`saved=` lists are what autograd really keeps (checked with saved_tensors_hooks against the real
ops); `grads=` and `temp=` are what the backward formula allocates. Shapes in comments:
b batch, s sequence, h hidden, I MLP width, H heads, K key/value heads, d head dim, V vocab, r rank.

Device matters in three places: dropout (CPU multiplies by a noise tensor of the input's dtype,
which it saves; CUDA's fused kernel saves a 1-byte bool mask), SDPA kernels (CPU runs its flash
kernel only without dropout, else the math path in fp32; CUDA flash/efficient kernels handle
dropout), and LayerNorm statistics (CPU keeps mean/rstd in the input dtype, CUDA in fp32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memprofile.symbolic import PASS, VIEW, Sym, Tape, itemsize

F32, I64 = torch.float32, torch.int64


def _bcast(a, b):
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return tuple(max(x, y) for x, y in zip(a, b))


def _numel(shape) -> int:
    return math.prod(shape)


# --------------------------------------------------------------------------- elementwise
def to(t: Tape, x: Sym, dtype) -> Sym:
    """x.to(dtype): the same tensor when the dtype already matches, else a copy (ToCopyBackward
    saves nothing; its backward converts the gradient back: x-sized)."""
    if x.dtype == dtype:
        return x
    return t.op("to", [x], x.shape, dtype, contig=x.contig)  # keeps x's memory layout


def add(t: Tape, a: Sym, b: Sym) -> Sym:
    """a + b saves nothing; the gradient passes through unchanged, reduced (sum_to_size) for a
    broadcast input. Mixed dtypes (bf16 + fp32 LoRA output): the result has the wider dtype,
    the narrower input is cast to it in a temporary, and its gradient is cast back (its size)."""
    out = _bcast(a.shape, b.shape)
    dt = a.dtype if itemsize(a.dtype) >= itemsize(b.dtype) else b.dtype
    grads = [PASS if x.shape == out and x.dtype == dt else x.nbytes for x in (a, b)]
    cast = sum(x.numel * itemsize(dt) for x in (a, b) if x.dtype != dt)
    return t.op("add", [a, b], out, dt, grads=grads, fwd_temp=cast)


def mul(t: Tape, a: Sym, b: Sym, out_dtype=None) -> Sym:
    """a * b saves b when a needs grad and a when b needs grad; grad_a = grad * b (out-sized,
    then summed down if a was broadcast)."""
    out = _bcast(a.shape, b.shape)
    dt = out_dtype or (a.dtype if itemsize(a.dtype) >= itemsize(b.dtype) else b.dtype)
    saved = [b if a.rg else None, a if b.rg else None]
    temp = sum(_numel(out) * itemsize(dt) for x in (a, b) if x.rg and x.shape != out)
    return t.op("mul", [a, b], out, dt, saved=saved, temp=temp)


def scale(t: Tape, x: Sym, name="mul_scalar") -> Sym:
    """x * python_number: saves nothing; backward grad * c (x-sized). Keeps x's layout."""
    return t.op(name, [x], x.shape, x.dtype, contig=x.contig)


def neg(t: Tape, x: Sym) -> Sym:
    return t.op("neg", [x], x.shape, x.dtype)


def pow2(t: Tape, x: Sym) -> Sym:
    """x.pow(2) saves x; backward: grad * 2 * x.pow(1) -> two x-sized temporaries."""
    return t.op("pow", [x], x.shape, x.dtype, saved=[x], temp=x.nbytes)


def pow3(t: Tape, x: Sym) -> Sym:
    """torch.pow(x, 3.0) saves x; backward grad * 3 * x.pow(2)."""
    return t.op("pow", [x], x.shape, x.dtype, saved=[x], temp=x.nbytes)


def mean_last(t: Tape, x: Sym) -> Sym:
    """x.mean(-1, keepdim=True): saves only sizes; backward expands and divides (x-sized)."""
    return t.op("mean", [x], x.shape[:-1] + (1,), x.dtype)


def add_scalar(t: Tape, x: Sym) -> Sym:
    """x + python_number: saves nothing, the gradient passes through."""
    return t.op("add_scalar", [x], x.shape, x.dtype, grads=[PASS])


def unary_saving_input(t: Tape, x: Sym, name: str) -> Sym:
    """silu / gelu (erf form) / erf: save their input; backward allocates an x-sized grad."""
    return t.op(name, [x], x.shape, x.dtype, saved=[x])


def unary_saving_result(t: Tape, x: Sym, name: str) -> Sym:
    """tanh / rsqrt / softmax-like: save their output."""
    return t.op(name, [x], x.shape, x.dtype, save_outputs=[0])


def cat(t: Tape, xs: list[Sym], dim: int = -1) -> Sym:
    """torch.cat saves only sizes; backward hands each input a narrow view of the gradient."""
    dim = dim % len(xs[0].shape)
    shape = list(xs[0].shape)
    shape[dim] = sum(x.shape[dim] for x in xs)
    return t.op("cat", xs, tuple(shape), xs[0].dtype, grads=[VIEW] * len(xs))


def expand(t: Tape, x: Sym, shape) -> Sym:
    """x.expand(shape): a view; backward sums the gradient back to x's size -- unless the size
    did not change, when the gradient passes through as is."""
    if tuple(shape) == x.shape:
        return t.view(x)
    return t.op("expand", [x], tuple(shape), x.dtype, alias=x, contig=False)


def view_node(t: Tape, x: Sym, shape, name="slice", n: int = 1):
    """A view autograd records (slice, select, split into n pieces): no new memory in forward;
    backward builds an x-shaped gradient and copies the pieces' gradients into it."""
    outs = t.op(name, [x], [shape] * n, x.dtype, alias=x, contig=False)
    return outs[0] if n == 1 else outs


def merge_heads(t: Tape, o: Sym) -> Sym:
    """o.transpose(1, 2).reshape(b, s, H*d): free when o is laid out (b, s, H, d) (flash
    kernels), else a copy (math path); the copy's backward passes the gradient through."""
    b, H, s, d = o.shape
    if not o.contig:
        return t.view(o, (b, s, H * d), contig=True)
    return t.op("transpose.contiguous", [o], (b, s, H * d), o.dtype, grads=[PASS])


# --------------------------------------------------------------------------- modules
@dataclass
class LinearSpec:
    """One Linear (or GPT-2 Conv1D) as configured: plain, 4-bit, with or without LoRA."""

    fin: int
    fout: int
    weight: Sym  # a parameter Sym (trainable or frozen); unused when quantized
    bias: Sym | None = None
    quantized: bool = False
    compute_dtype: torch.dtype = torch.bfloat16
    blocksize: int = 64
    lora_A: Sym | None = None  # (r, fin)
    lora_B: Sym | None = None  # (fout, r)
    lora_dropout: float = 0.0


def _plain_linear(t: Tape, x: Sym, weight: Sym, bias: Sym | None, fout: int, name: str) -> Sym:
    """F.linear / addmm: saves the input (viewed 2-D, same storage) when the weight trains and the
    weight (a parameter: no new bytes) when the input needs grad. Backward: grad_x (x-sized),
    grad_W (fout, fin), grad_b (fout) -> parameter gradients."""
    inputs = [x, weight] + ([bias] if bias is not None else [])
    saved = [x if weight.rg else None, weight if x.rg else None]
    return t.op(name, inputs, x.shape[:-1] + (fout,), x.dtype, saved=saved,
                view_grads=len(x.shape) > 2)


def _linear_4bit(t: Tape, x: Sym, spec: LinearSpec, name: str) -> Sym:
    """bnb.matmul_4bit (MatMul4Bit): keeps only the packed weight (ctx.tensors, not a saved
    activation). Forward and backward both dequantize the whole weight first: the nested absmax
    back to fp32 (n/64 x 4 bytes) then W (fout, fin) in the compute dtype -- a transient the size
    of the bf16 weight. Backward: grad_x = grad @ W (x-sized)."""
    n = spec.fin * spec.fout
    scratch = n * itemsize(spec.compute_dtype) + 4 * math.ceil(n / spec.blocksize)
    inputs = [x] + ([spec.bias] if spec.bias is not None else [])
    return t.op(name + "(4bit)", inputs, x.shape[:-1] + (spec.fout,), x.dtype,
                temp=scratch, fwd_temp=scratch, view_grads=len(x.shape) > 2)


def linear(t: Tape, x: Sym, spec: LinearSpec, name: str = "linear") -> Sym:
    """peft's LoRA Linear.forward (the test-local LoRA does the same):
        result = base(x)                                              # (b, s, fout)
        x = x.to(lora_A.weight.dtype)                                 # a copy only if it differs
        result = result + lora_B(lora_A(dropout(x))) * scaling        # in the wider dtype
        return result.to(base dtype)"""
    if spec.quantized:
        result = _linear_4bit(t, x, spec, name)
    else:
        result = _plain_linear(t, x, spec.weight, spec.bias, spec.fout, name)
    if spec.lora_A is None:
        return result
    xa = to(t, x, spec.lora_A.dtype)                     # (b, s, fin): a copy only for other dtypes
    xa = dropout(t, xa, spec.lora_dropout, True)         # identity at p = 0
    r = spec.lora_A.shape[0]
    a = _plain_linear(t, xa, spec.lora_A, None, r, "lora_A")   # saves xa; a: (b, s, r)
    bo = _plain_linear(t, a, spec.lora_B, None, spec.fout, "lora_B")  # saves a; (b, s, fout)
    del a, xa
    bo = scale(t, bo, "lora_scaling")                    # * alpha / r: a new (b, s, fout)
    dt = result.dtype
    return to(t, add(t, result, bo), dt)


def embedding(t: Tape, ids: Sym, weight: Sym) -> Sym:
    """Embedding saves the indices (a batch tensor or an arange) when the table trains; backward
    builds a dense (V, h) gradient."""
    saved = [ids] if weight.rg else []
    return t.op("embedding", [weight], ids.shape + (weight.shape[1],), weight.dtype, saved=saved)


def rms_norm(t: Tape, x: Sym, weight: Sym) -> Sym:
    """LlamaRMSNorm (HF code, op by op):
        h = x.to(float32)               # (b, s, h) fp32 copy unless x is fp32 already
        var = h.pow(2).mean(-1, True)   # pow saves h; var (b, s, 1)
        h = h * torch.rsqrt(var + eps)  # rsqrt saves its (b, s, 1) result; mul saves h and it
        return weight * h.to(dtype)     # saves h.to(dtype) (b, s, h) only if the weight trains
    With a frozen weight and an input that needs no grad (LoRA, first layer) nothing is saved.
    """
    dt = x.dtype
    h = to(t, x, F32)
    var = mean_last(t, pow2(t, h))
    r = unary_saving_result(t, add_scalar(t, var), "rsqrt")
    del var
    h = mul(t, h, r)
    del r
    return mul(t, weight, to(t, h, dt), out_dtype=dt)


def layer_norm(t: Tape, x: Sym, weight: Sym, bias: Sym) -> Sym:
    """native_layer_norm saves the input and per-row mean and rstd (b, s, 1) -- in the input dtype
    on CPU, fp32 on CUDA -- whenever anything needs grad. Backward: grad_x, grad_w, grad_b."""
    stat_dt = x.dtype if t.device == "cpu" else F32
    y, mean, rstd = t.op("layer_norm", [x, weight, bias],
                         [x.shape, x.shape[:-1] + (1,), x.shape[:-1] + (1,)],
                         [x.dtype, stat_dt, stat_dt], saved=[x, weight, bias], save_outputs=[1, 2])
    return y


def dropout(t: Tape, x: Sym, p: float, training: bool) -> Sym:
    """F.dropout. p == 0 or eval: returns x itself. CPU: `x * noise` with noise = bernoulli/(1-p)
    in x's dtype, saved (x-sized). CUDA: fused native_dropout saves a bool mask (1 byte/elem)."""
    if p == 0 or not training:
        return x
    if t.device == "cpu":
        noise = t.tensor(x.shape, x.dtype)
        out = t.op("dropout", [x], x.shape, x.dtype, saved=[noise] if x.rg else [])
        return out
    mask = t.tensor(x.shape, torch.bool)
    return t.op("dropout", [x], x.shape, x.dtype, saved=[mask] if x.rg else [])


# --------------------------------------------------------------------------- attention
def bmm(t: Tape, a: Sym, b: Sym) -> Sym:
    """a @ b on (..., m, k) x (..., k, n): saves b if a needs grad and a if b needs grad;
    backward allocates grad_a = g @ b^T and grad_b = a^T @ g."""
    saved = [b if a.rg else None, a if b.rg else None]
    return t.op("bmm", [a, b], a.shape[:-1] + (b.shape[-1],), a.dtype, saved=saved)


def repeat_kv(t: Tape, x: Sym, n_rep: int) -> Sym:
    """repeat_kv / repeat_interleave: (b, K, s, d) -> a new (b, K*n_rep, s, d); backward sums
    the groups back (K-sized grad)."""
    if n_rep == 1:
        return x
    b, k, s, d = x.shape
    return t.op("repeat_kv", [x], (b, k * n_rep, s, d), x.dtype)


def _flash_scratch(t: Tape, q: Sym, k: Sym) -> tuple[int, int]:
    """Scratch of the flash kernels besides outputs and gradients, (forward, backward) bytes.

    CPU (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): per thread, blocks of qS query rows
    x kvS keys, qS = 32 / 64 / 256 for s < 192 / < 768 / longer, kvS = min(512, s):
      forward  fp32 qk block + row max + row sum + (qS, d) output block, and a half-precision
               copy of the qk block for bf16/fp16;
      backward fp32 attn + grad_attn blocks (and their half copies), and a (qS,) fp32 dsum.
    CUDA (flash-attention 2 backward): an fp32 dq accumulator the size of q and the fp32
    (b, H, s) softmax row sums; its forward needs no scratch.
    """
    b, H, s, d = q.shape
    kv_len = k.shape[2]
    if t.device != "cpu":
        return 0, b * H * s * d * 4 + b * H * s * 4
    qs = min(s, 32 if s < 192 else 64 if s < 768 else 256)
    kvs = min(kv_len, 512)
    half = itemsize(q.dtype) if q.dtype in (torch.bfloat16, torch.float16) else 0
    fwd = t.threads * ((qs * kvs + 2 * qs + qs * d) * 4 + qs * kvs * half)
    bwd = t.threads * (2 * qs * kvs * 4 + 2 * qs * kvs * half + qs * 4)
    return fwd, bwd


def _batch_merge(t: Tape, x: Sym) -> Sym:
    """x.reshape(b*H, ...) for a (b, H, ...) tensor laid out (b, s, H, d): a view if b == 1
    (or x is contiguous), else a copy (CloneBackward passes the gradient through)."""
    if x.contig or x.shape[0] == 1:
        return x
    return t.op("clone", [x], x.shape, x.dtype, grads=[PASS])


def sdpa(t: Tape, q: Sym, k: Sym, v: Sym, *, dropout_p: float, is_causal: bool,
         has_mask: bool = False, mask: Sym | None = None) -> Sym:
    """F.scaled_dot_product_attention on q (b, H, s, d), k/v (b, K, s, d) (GQA if K < H).
    Returns (b, H, s, d). Which kernel runs decides what is saved:

    CPU flash (no dropout): saves q, k, v as given (K heads: no repeat), the output and the
    logsumexp (b, H, s) fp32. The output is laid out (b, s, H, d), so HF's transpose(1, 2) then
    reshape is free. CUDA flash / memory-efficient: the same set (plus an RNG state).
    Otherwise the math path (CPU with dropout, or an explicit mask off CUDA), in fp32 on CPU for
    half inputs, saves q*sqrt(scale) and k^T*sqrt(scale) (b*H, s, d), the softmax (b, H, s, s),
    the dropout noise and the dropped probabilities (b, H, s, s) each, and v (b*H, s, d) -- the
    quadratic terms that dominate at long sequences.
    """
    b, H, s, d = q.shape
    n_rep = H // k.shape[1]
    flash = dropout_p == 0 or t.device != "cpu"
    if flash:
        fwd_temp, temp = _flash_scratch(t, q, k)
        rng = [t.tensor((2,), I64)] if dropout_p > 0 else []  # CUDA: philox seed, offset
        out, lse = t.op("sdpa_flash", [q, k, v], [(b, s, H, d), (b, H, s)], [q.dtype, F32],
                        saved=[q, k, v] + rng, save_outputs=[0, 1], fwd_temp=fwd_temp, temp=temp)
        del lse, rng
        return t.view(out, (b, H, s, d), contig=False)
    # ---- math path (aten::_scaled_dot_product_attention_math), CPU. Its C++ locals (the
    # fp32 copies of q/k/v, the scaled query) live until it returns.
    dt = q.dtype
    acc = F32 if t.device == "cpu" else dt
    qf, kf, vf = to(t, q, acc), to(t, k, acc), to(t, v, acc)     # half -> fp32 copies on CPU
    if n_rep > 1:
        kf, vf = repeat_kv(t, kf, n_rep), repeat_kv(t, vf, n_rep)
    query = scale(t, t.view(qf, contig=False), "q*sqrt(scale)")  # (b, H, s, d), strided
    kt = scale(t, t.view(kf, (b, H, d, s), contig=False), "k^T*sqrt(scale)")  # (b, H, d, s)
    # bmm needs (b*H, s, d) / (b*H, d, s) blocks; q/k/v arrive laid out (b, s, H, d), whose b
    # and H dims merge into one only when b == 1 -- otherwise matmul clones them, and the
    # clones are what bmm saves
    attn = bmm(t, _batch_merge(t, query), _batch_merge(t, kt))
    del kt
    if is_causal or has_mask:
        # the causal mask (s, s) fp32 built from a bool tril; added in place (nothing saved)
        t.transient(s * s * (itemsize(acc) + 1), "causal mask")
    # _safe_softmax: softmax, plus a bool (b, H, s, s) isneginf map and a row-wise all()
    attn = t.op("softmax", [attn], attn.shape, acc, fwd_temp=attn.numel + b * H * s,
                save_outputs=[0])                                # saved: (b, H, s, s)
    attn = dropout(t, attn, dropout_p, True)                     # noise saved: (b, H, s, s)
    # return (matmul(attn, v).to(dtype), attn.to(dtype)): GCC evaluates the second first, so
    # the (b, H, s, s) weights in the model dtype (dropped by the caller) coexist with the rest
    weights = t.tensor(attn.shape, dt) if acc != dt else None
    vc = _batch_merge(t, vf)                                     # (b*H, s, d), cloned if b > 1
    out = bmm(t, attn, vc)                                       # saves attn and v
    del vc
    out = to(t, out, dt)                                         # (b, H, s, d) contiguous
    del attn, qf, kf, vf, query, weights
    return out


# --------------------------------------------------------------------------- losses
def causal_lm_loss(t: Tape, logits: Sym, upcast: bool = True) -> Sym:
    """transformers' ForCausalLMLoss on logits (b, s, V):
        logits = logits.float()                 # (b, s, V) fp32 copy for half models
        labels = pad(labels); shift = labels[..., 1:].contiguous()   # (b, s+1), (b, s) int64
        log_softmax(logits.view(-1, V))         # (b*s, V) fp32, saved (by itself and nll_loss)
        nll_loss(...)                           # saves the shifted labels and total_weight
    Backward: nll_loss allocates a (b*s, V) fp32 gradient, log_softmax another, the upcast a
    (b, s, V) one in the model dtype: the logits gradients dominate at large vocabularies."""
    b, s, V = logits.shape
    x = to(t, logits, F32) if upcast else logits
    padded = t.tensor((b, s + 1), I64)
    # [..., 1:].contiguous() copies -- except at b == 1, where the slice is already contiguous
    # and the saved labels keep the whole padded (1, s+1) storage
    shift = padded if b == 1 else t.tensor((b, s), I64)
    del padded
    lsm = unary_saving_result(t, t.view(x, (b * s, V)), "log_softmax")
    del x
    total_weight = t.tensor((), lsm.dtype)
    loss = t.op("nll_loss", [lsm], (), lsm.dtype, saved=[lsm, shift, total_weight])
    return loss


def classification_loss(t: Tape, logits: Sym) -> Sym:
    """CrossEntropyLoss on (b, C) logits in the model dtype; labels are the batch's (a view)."""
    lsm = unary_saving_result(t, logits, "log_softmax")
    total_weight = t.tensor((), lsm.dtype)
    return t.op("nll_loss", [lsm], (), lsm.dtype, saved=[lsm, total_weight])
