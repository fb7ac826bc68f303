"""Predict the memory of one training step from a model config, without weights or a device.

    from memprofile.estimate import estimate, plan, CONFIGURATIONS
    e = estimate("path/to/config.json", "qlora-ckpt", batch=4, seq=512, rank=8, device="cuda")
    e.bytes()   # same seven keys as memprofile.measure.StepMemory.bytes()
    e.peak_at   # where the peak happens, e.g. "backward: log_softmax"
    plan(llama3_8b_config, 24 * 2**30, seq=2048)   # largest batch per configuration that fits

Configurations (the same conventions as the test-local toolkit, and what qlora.profile sweeps):
    full        every parameter trains
    head        only the task head trains (lm_head / classifier; a tied lm_head trains the
                embedding it shares)
    lora        base frozen; LoRA (A: r x in, B: out x r, adapter dtype) on `lora_targets`
    qlora       as lora, and every Linear except the head stored as NF4 4-bit (bitsandbytes,
                blocksize 64, double-quantized absmax)
    *-ckpt      plus non-reentrant activation checkpointing of every transformer block
`lora_targets` is "all-linear" (every nn.Linear / GPT-2 Conv1D except the head: for BERT and ViT
this is query/key/value/dense resp. q/k/v/o_proj + fc1/fc2) or a list of module-name suffixes.
`train_head` (default: True for classification tasks, whose head is new, False for causal LM)
trains the head alongside the adapters.

How each category is predicted:
* weights: exact, from the meta-device model (memprofile.layout); 4-bit bytes per quantized
  Linear with n = in*out weights: n/2 packed + n/64 absmax (uint8 when double-quantized, fp32
  otherwise) + 16 fp32 NF4 code + fp32 offset + (n/64)/256 fp32 second-level absmax + 256 fp32
  second-level code -- exactly what a bitsandbytes Params4bit and its quant_state hold.
* gradients: one per trainable parameter, same dtype.  optimizer: AdamW keeps exp_avg and
  exp_avg_sq like the parameter plus a 4-byte fp32 `step` per parameter tensor.
* activations and peak: the forward pass is replayed on shapes (memprofile.architectures on
  memprofile.ops / memprofile.symbolic), recording what autograd saves and when every
  intermediate is freed; backward and the AdamW step are replayed the same way. The peak adds
  the bytes that exist before the step: weights, optimizer state (steady state: after the first
  step) and the batch tensors. `peak_at` names the op at the worst moment.

Scope and limits: transformers' default "sdpa" attention, no padding mask, HF's own
activation checkpointing (non-reentrant, every block; for text models it also makes the input
embeddings require grad). Calibrated on CPU against memprofile.measure (within 1.2%
on the test sweep). device="cuda" switches to the CUDA kernels' rules (bool dropout masks,
flash/efficient attention with dropout and its backward scratch, fp32 LayerNorm statistics,
foreach AdamW, no checkpoint RNG stash in device memory) taken from the kernels' code but not
yet checked on a GPU; the CUDA caching allocator's 512-byte rounding and the cuBLAS/CUDA
context are not included.
"""
from __future__ import annotations

import copy
import gc
import math
from dataclasses import asdict, dataclass

import torch

from memprofile import ops
from memprofile.architectures import ARCHITECTURES, Model
from memprofile.layout import Layout, layout, load_config
from memprofile.symbolic import Tape, itemsize
from memprofile.tensors import CATEGORIES

CONFIGURATIONS = ("full", "head", "lora", "lora-ckpt", "qlora", "qlora-ckpt")
SUPPORTED = {("llama", "causal-lm"), ("mistral", "causal-lm"), ("qwen2", "causal-lm"),
             ("gpt2", "causal-lm"), ("bert", "sequence-classification"),
             ("roberta", "sequence-classification"), ("vit", "image-classification")}
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


@dataclass
class Estimate:
    configuration: str
    batch: int
    seq: int
    rank: int
    weights_quantized: int
    weights_frozen: int
    weights_trainable: int
    gradients: int
    optimizer: int
    activations: int
    peak: int
    inputs: int
    peak_at: str
    trainable_params: int
    total_params: int
    device: str

    def bytes(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in CATEGORIES}

    def to_dict(self) -> dict:
        return asdict(self)


def quantized_bytes(n: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes a bitsandbytes NF4 Params4bit of n weights holds, quant_state included."""
    blocks = math.ceil(n / blocksize)
    packed = (n + 1) // 2                      # two 4-bit values per uint8
    code = 16 * 4                              # the NF4 levels, fp32
    if not double_quant:
        return packed + blocks * 4 + code      # fp32 absmax per block
    return (packed + blocks                    # uint8 absmax per block
            + code + 4                         # + fp32 offset (mean of the absmax)
            + math.ceil(blocks / 256) * 4      # state2: fp32 absmax per 256 blocks
            + 256 * 4)                         # state2: the 8-bit dynamic code, fp32


def _dtype(d) -> torch.dtype:
    return _DTYPES[d] if isinstance(d, str) else d


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tokens_and_inputs(lay: Layout, batch: int, seq: int | None) -> tuple[int, int]:
    """(tokens per example, bytes of the batch tensors: ids/pixels and labels)."""
    c = lay.config
    if lay.task == "image-classification":
        n = (c.image_size // c.patch_size) ** 2 + 1
        pixels = batch * c.num_channels * c.image_size ** 2 * itemsize(lay.dtype)
        return n, pixels + batch * 8
    labels = batch * seq * 8 if lay.task == "causal-lm" else batch * 8
    return seq, batch * seq * 8 + labels


def estimate(config, configuration: str, batch: int, seq: int | None = None, rank: int = 8, *,
             task: str | None = None, dtype="bf16", adapter_dtype=None,
             lora_targets="all-linear", lora_dropout: float = 0.0, train_head: bool | None = None,
             quantize_targets="all-linear", head=None,
             quant_blocksize: int = 64, double_quant: bool = True, device: str | None = None,
             training: bool = True, input_bytes: int | None = None,
             input_requires_grad: bool | None = None, cpu_threads: int | None = None) -> Estimate:
    """Predicted bytes of one steady-state training step (see the module docstring).

    config: PretrainedConfig, dict or path. seq: tokens (causal LM / BERT); for ViT the image
    side in pixels (default: config.image_size). dtype: weights and compute ("bf16", "fp32").
    adapter_dtype: LoRA A/B dtype (default: dtype). lora_targets / quantize_targets:
    "all-linear" (every Linear but the head) or module-name suffixes. head: module names of the
    task head (default lm_head / classifier). device: "cpu" or "cuda" (default: this
    machine's) -- it picks the dropout, attention and optimizer kernels. input_bytes overrides
    the batch tensors' bytes (default: ids + labels, or pixels + labels). input_requires_grad:
    whether the input embedding's output requires grad (default: with checkpointing on a text
    model, which is what HF's activation_checkpointing_enable() arranges). cpu_threads: for
    the per-thread scratch of CPU attention kernels (default: torch.get_num_threads()).
    """
    base, _, ckpt = configuration.partition("-")
    if base not in ("full", "head", "lora", "qlora") or ckpt not in ("", "ckpt"):
        raise ValueError(f"configuration {configuration!r} is not one of {CONFIGURATIONS}")
    dtype = _dtype(dtype)
    adapter_dtype = _dtype(adapter_dtype) if adapter_dtype is not None else dtype
    device = torch.device(device or _default_device()).type  # "cuda:0" -> "cuda"
    config = load_config(config)
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl != "sdpa":
        raise ValueError(f"attention implementation {impl!r} is not modelled; only transformers' "
                         "default 'sdpa' is (see memprofile.ops.sdpa)")
    if config.model_type == "vit" and seq is not None and seq != config.image_size:
        config = copy.deepcopy(config)
        config.image_size = seq
    lay = layout(config, task, dtype)
    if (config.model_type, lay.task) not in SUPPORTED:
        raise ValueError(f"{config.model_type} for {lay.task} is not modelled; supported: "
                         + ", ".join(f"{m} ({t})" for m, t in sorted(SUPPORTED)))
    if seq is None and lay.task != "image-classification":
        raise ValueError("seq is required for text models")
    if train_head is None:
        train_head = lay.task != "causal-lm"

    # ---- which modules are quantized / get adapters / train
    heads = list(head) if head is not None else lay.head

    def is_head(module: str) -> bool:
        return any(module == h or module.startswith(h + ".") or module.endswith("." + h) for h in heads)

    def targets(spec, what) -> list[str]:
        body = [n for n in lay.linears if not is_head(n)]
        names = body if spec == "all-linear" else [n for n in lay.linears if _matches(n, spec)]
        if not names:
            raise ValueError(f"{what} {spec!r} match no Linear layer of {sorted(lay.linears)[:6]}...")
        return names

    adapters = set(targets(lora_targets, "lora_targets")) if base in ("lora", "qlora") else set()
    quantized = set(targets(quantize_targets, "quantize_targets")) if base == "qlora" else set()

    def trains(pname: str) -> bool:
        if base == "full":
            return True
        return (base == "head" or train_head) and is_head(pname.rpartition(".")[0])

    # tied parameters: one Sym per canonical name, trainable if any alias trains
    canon_trains: dict[str, bool] = {}
    for n, info in lay.params.items():
        canon_trains[info.canonical] = canon_trains.get(info.canonical, False) or trains(n)
    tape = Tape(device, cpu_threads or torch.get_num_threads())
    syms = {c: tape.param(lay.params[c].shape, lay.params[c].dtype, tr) for c, tr in canon_trains.items()}
    params = {n: syms[info.canonical] for n, info in lay.params.items()}

    w_q = w_frozen = w_train = 0
    n_total = n_train = 0
    trainable_tensors: list[int] = []  # bytes per trainable tensor (optimizer step temporaries)
    skip = {n + ".weight" for n in quantized}
    for c, tr in canon_trains.items():
        info = lay.params[c]
        nbytes = info.numel * itemsize(info.dtype)
        n_total += info.numel
        if c in skip:
            w_q += quantized_bytes(info.numel, quant_blocksize, double_quant)
        elif tr:
            w_train += nbytes
            n_train += info.numel
            trainable_tensors.append(nbytes)
        else:
            w_frozen += nbytes
    w_frozen += lay.buffer_bytes

    specs = {}
    for n, li in lay.linears.items():
        spec = ops.LinearSpec(li.fin, li.fout, params[n + ".weight"], params.get(n + ".bias"),
                              quantized=n in quantized, compute_dtype=dtype, blocksize=quant_blocksize,
                              lora_dropout=lora_dropout)
        if n in adapters:
            spec.lora_A = tape.param((rank, li.fin), adapter_dtype, True)
            spec.lora_B = tape.param((li.fout, rank), adapter_dtype, True)
            for p in (spec.lora_A, spec.lora_B):
                w_train += p.nbytes
                n_train += p.numel
                n_total += p.numel
                trainable_tensors.append(p.nbytes)
        specs[n] = spec

    optimizer = 2 * w_train + 4 * len(trainable_tensors)
    tokens, inputs = _tokens_and_inputs(lay, batch, seq)
    if input_bytes is not None:
        inputs = input_bytes

    # ---- replay the step on shapes
    if input_requires_grad is None:
        input_requires_grad = ckpt == "ckpt" and lay.task != "image-classification"
    try:
        arch = ARCHITECTURES[config.model_type]
    except KeyError:
        raise ValueError(f"model_type {config.model_type!r} is not supported; supported: "
                         f"{sorted(ARCHITECTURES)}") from None
    model = Model(config=config, tape=tape, batch=batch, seq=tokens, dtype=dtype, linears=specs,
                  params=params, checkpointing=(ckpt == "ckpt"), training=training,
                  input_requires_grad=input_requires_grad)
    # The cyclic GC would rescan the replay's many small objects again and again; nothing in
    # the replay needs it (Storage lifetimes follow reference counts).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        loss = arch(model)
        activations = tape.saved_bytes()
        if loss.rg:
            tape.backward(loss)
        del loss
        # p.grad storages; usually the trainable bytes, more when a stolen gradient is a view
        # into a larger buffer (ViT's cls_token at batch 1 keeps the whole (1, s, h) gradient)
        gradients = sum({id(g): g.nbytes for g in tape.param_grads}.values())
        tape.adamw_step(trainable_tensors, foreach=(device == "cuda"))
    finally:
        if gc_was_enabled:
            gc.enable()
    before = w_q + w_frozen + w_train + optimizer + inputs
    return Estimate(configuration=configuration, batch=batch, seq=seq if seq is not None else config.image_size,
                    rank=rank, weights_quantized=w_q, weights_frozen=w_frozen, weights_trainable=w_train,
                    gradients=gradients, optimizer=optimizer, activations=activations,
                    peak=before + tape.peak, inputs=inputs, peak_at=tape.peak_where,
                    trainable_params=n_train, total_params=n_total, device=device)


def plan(config, memory_bytes: int, seq: int | None = None, rank: int = 8, *,
         configurations=CONFIGURATIONS, max_batch: int = 1 << 16, **kwargs) -> dict[str, dict]:
    """For each configuration, the largest batch whose predicted peak fits in memory_bytes.

    Returns {configuration: {"batch": n (0 if even batch 1 does not fit), "fits": n > 0,
    "peak": bytes at n (or at 1), "bytes": the breakdown, "estimate": the Estimate}}.

    The peak is a maximum over moments of the step, each affine in the batch, so it is convex
    and increasing in the batch: a straight line through two batches under-estimates it beyond
    them and over-estimates it between them. Regula falsi on that line needs a handful of
    estimates per configuration instead of a bisection's ~log2(max_batch).
    """
    out = {}
    for conf in configurations:
        cache: dict[int, Estimate] = {}

        def est(b: int) -> Estimate:
            if b not in cache:
                cache[b] = estimate(config, conf, b, seq, rank, **kwargs)
            return cache[b]

        def fits(b: int) -> bool:
            return est(b).peak <= memory_bytes

        if not fits(1):
            e = est(1)
            out[conf] = {"batch": 0, "fits": False, "peak": e.peak, "bytes": e.bytes(), "estimate": e}
            continue
        lo = 1
        hi = None  # smallest batch known not to fit
        # beyond the known points the line through the last two under-estimates: jump to where
        # it reaches memory_bytes (an upper bound on the answer)
        prev = 2 if max_batch >= 2 else 1
        while hi is None and lo < max_batch:
            b2 = min(max(prev, lo + 1), max_batch)
            if not fits(b2):
                hi = b2
                break
            slope = (est(b2).peak - est(lo).peak) / (b2 - lo)
            lo = b2
            guess = max_batch if slope <= 0 else lo + int((memory_bytes - est(lo).peak) // slope)
            prev = min(max(guess, lo + 1), max_batch)
            if prev == lo:
                break
        while hi is not None and hi - lo > 1:
            # between lo (fits) and hi (does not) the chord over-estimates: its crossing is a
            # lower bound on the answer
            p_lo, p_hi = est(lo).peak, est(hi).peak
            cut = lo + int((memory_bytes - p_lo) * (hi - lo) // max(p_hi - p_lo, 1))
            mid = min(max(cut, lo + 1), hi - 1)
            if fits(mid):
                lo = mid
                if mid + 1 < hi and not fits(mid + 1):
                    hi = mid + 1
            else:
                hi = mid
        e = est(lo)
        out[conf] = {"batch": lo, "fits": True, "peak": e.peak, "bytes": e.bytes(), "estimate": e}
    return out
