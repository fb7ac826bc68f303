"""QLoRA sharded over processes with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`).

    # every process (torchrun --nproc_per_node N script.py, or accelerate launch --num_processes N):
    model = qlora.fsdp.load_4bit_once(path)       # rank 0 reads the weights; the others build it on meta
    model = qlora.add_lora(model, lora_config)
    train(model, data, collate, loss_fn, TrainConfig(fsdp=True, ...))   # calls shard_model(model)

How the 4-bit base travels. A bitsandbytes `Linear4bit` keeps its packed codes in a `Params4bit`
whose `quant_state` FSDP2 drops when it re-creates the parameter, and a float `quant_storage` makes
the packed bytes pass through the collectives as bf16/fp16 values (some byte pairs are NaN there).
`shard_model` therefore swaps each `Linear4bit` for a `Linear4bitShard`: the packed codes
[out*in/2, 1] and the per-block absmax (raw bytes: uint8 with double quantization, the bytes of
the fp32 values without) become two frozen **uint8** parameters that FSDP2 shards on dim 0 and
all-gathers as bytes (FSDP2 never casts a non-float parameter, `MixedPrecisionPolicy` included;
`fsdp_pre_all_gather` tensor subclasses, as in torchao's NF4Tensor, are not needed for that). The
remaining quant-state constants (16-entry code book, nested absmax [blocks/256] fp32, its 256-entry
code book, the fp32 offset: ~1.1 KiB per layer) are replicated buffers. The forward rebuilds a
bitsandbytes `QuantState` from the all-gathered tensors and calls the same `bnb.matmul_4bit`, so a
sharded layer computes exactly what the unsharded one does, forward and backward.

Sharding: `fully_shard` on every child of an `nn.ModuleList` that has parameters (the transformer
blocks), then on the root (embeddings, final norm, head). Every parameter, its gradient and the
AdamW moments are DTensors sharded on dim 0 (uneven sizes are padded by FSDP2: any size splits).
Per rank that is ~1/N of the packed bytes, adapters, gradients and optimizer state, plus, while a
block runs, that block's all-gathered weights.

Loading without N copies: `shard_model` takes the values from rank 0 (one tensor at a time,
scattered), so the other ranks may hold a meta-device model (qlora.fsdp.load builds one).
Checkpoints and the final adapter are gathered (full tensors, written by rank 0 in the same
files as an unsharded run: resume works across world sizes); `gathered(model)` gives the full
trainable tensors for the duration of a `with` block.
"""
from __future__ import annotations

import contextlib
import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn

from qlora.arch.blocks import outermost_module_lists
from qlora.arch.experts import expert_weight_names, is_experts_module
from qlora.arch.quantized import is_4bit, is_4bit_param
from qlora.errors import QLoRAError
from qlora.quant.bnb_fixes import import_bnb
from qlora.quant.chunked import quant_state_from_bytes


def _dtensor_cls():
    from torch.distributed.tensor import DTensor  # lazy: torch.distributed.tensor costs ~0.5 s
    return DTensor


def is_dtensor(t) -> bool:
    return isinstance(t, _dtensor_cls())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor all-gathered (a collective: every rank must call it), else t."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's own part of a tensor (the local shard of a DTensor, else the tensor)."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


# --------------------------------------------------------------------------------------------
# the 4-bit layer FSDP2 can shard
# --------------------------------------------------------------------------------------------
class Linear4bitShard(nn.Module):
    """A bitsandbytes 4-bit Linear whose packed codes and absmax are plain frozen uint8 parameters.

    Parameters: `weight` uint8 [ceil(out*in/2), 1] (two NF4/FP4 codes per byte, bitsandbytes'
    layout), `absmax` uint8 [blocks] with double quantization, else the bytes of the fp32 absmax
    [4*blocks]; `bias` in compute dtype. Buffers (replicated): `code` [16] fp32 and, nested, `offset`
    [] fp32, `absmax2` [ceil(blocks/256)] fp32, `code2` [256] fp32. Build with `from_linear4bit`.
    """

    def __init__(self, in_features: int, out_features: int, *, quant_type: str, blocksize: int,
                 dtype: torch.dtype, compute_dtype: torch.dtype, nested: bool, blocksize2: int = 256):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.dtype, self.nested = quant_type, blocksize, dtype, nested
        self.blocksize2 = blocksize2
        self.compute_dtype = compute_dtype
        self.qlora_quantized_from = None

    @classmethod
    def from_linear4bit(cls, layer: nn.Module) -> "Linear4bitShard":
        """Same bytes, no copy: the packed codes and quant state of a quantized bnb Linear4bit."""
        qs = layer.weight.quant_state
        if qs is None:
            raise QLoRAError("a 4-bit layer was never quantized (quant_state is None); quantize it first")
        if getattr(qs, "packing_format_for_cpu", False):
            raise QLoRAError("a 4-bit layer was repacked for bitsandbytes' AVX512-BF16 CPU inference kernel; "
                             "layers made by qlora.load_4bit / quantize_model are not: use those")
        new = cls(layer.in_features, layer.out_features, quant_type=qs.quant_type, blocksize=qs.blocksize,
                  dtype=qs.dtype, compute_dtype=layer.compute_dtype, nested=qs.nested,
                  blocksize2=qs.state2.blocksize if qs.nested else 256)
        new.qlora_quantized_from = getattr(layer, "qlora_quantized_from", None)
        new.weight = nn.Parameter(layer.weight.data.view(torch.uint8), requires_grad=False)
        # fp32 absmax (no double quant) travels as its bytes: a float parameter could be cast by
        # a MixedPrecisionPolicy, bytes never are. [blocks] fp32 -> [4*blocks] uint8, same storage.
        new.absmax = nn.Parameter(qs.absmax.view(torch.uint8), requires_grad=False)
        new.bias = layer.bias
        new.register_buffer("code", qs.code)
        if qs.nested:
            new.register_buffer("offset", qs.offset)
            new.register_buffer("absmax2", qs.state2.absmax)
            new.register_buffer("code2", qs.state2.code)
        new.train(layer.training)
        return new

    def quant_state(self):
        """The bitsandbytes QuantState of the (all-gathered) tensors this layer holds now."""
        return quant_state_from_bytes(
            self.absmax, self.code, (self.out_features, self.in_features), blocksize=self.blocksize,
            quant_type=self.quant_type, dtype=self.dtype, nested=self.nested,
            offset=self.offset if self.nested else None, absmax2=self.absmax2 if self.nested else None,
            code2=self.code2 if self.nested else None, blocksize2=self.blocksize2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # what bnb.nn.Linear4bit.forward does, with the QuantState rebuilt from this layer's tensors
        bnb = import_bnb()
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return bnb.matmul_4bit(x, self.weight, bias=bias, quant_state=self.quant_state()).to(inp_dtype)

    def to_linear4bit(self):
        """A bitsandbytes Linear4bit with this layer's (unsharded, plain) tensors, sharing them."""
        bnb = import_bnb()
        if is_dtensor(self.weight):
            raise QLoRAError("to_linear4bit needs the whole layer: call it outside the sharded model "
                             "(e.g. on a model loaded from the saved adapter)")
        layer = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None,
                                  compute_dtype=self.compute_dtype, compress_statistics=self.nested,
                                  quant_type=self.quant_type, quant_storage=torch.uint8, device="meta")
        layer.weight = bnb.nn.Params4bit(self.weight.data, requires_grad=False, quant_state=self.quant_state(),
                                         blocksize=self.blocksize, compress_statistics=self.nested,
                                         quant_type=self.quant_type, quant_storage=torch.uint8,
                                         bnb_quantized=True, module=layer)
        layer.bias = self.bias
        layer.compute_type_is_set, layer.support_avx512bf16_for_cpu = True, False
        layer.qlora_quantized_from = self.qlora_quantized_from
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.quant_type}, blocksize={self.blocksize}, double_quant={self.nested}")


def to_shardable(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes Linear4bit of `model` (LoRA base layers included) by a
    Linear4bitShard holding the same tensors, and lay out every 4-bit experts matrix the same way
    (`experts_to_shardable`), in place. Returns `model`."""
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Linear4bitShard.from_linear4bit(module))
        elif is_experts_module(module):
            experts_to_shardable(module)
    return model


def experts_to_shardable(module: nn.Module) -> None:
    """Each 4-bit matrix of an experts module (qlora.quant.experts) as Linear4bitShard holds its weight: the
    packed codes stay under the matrix's name as a plain frozen uint8 parameter, `<name>_absmax` (uint8; the
    bytes of the fp32 absmax without double quantization) beside it, both sharded on dim 0 and all-gathered as
    bytes; the code books, nested absmax and offset are replicated buffers (`<name>_code`, ...), the rest of
    the QuantState plain attributes (`qlora_4bit_layout`). The experts forward rebuilds the QuantState from
    the all-gathered tensors (qlora.quant.experts.matrix_4bit). Same bytes, no copy."""
    layout = module.__dict__.setdefault("qlora_4bit_layout", {})
    for name in expert_weight_names(module):
        p = module._parameters.get(name)
        if p is None or not is_4bit_param(p):
            continue
        qs = p.quant_state
        module._parameters[name] = nn.Parameter(p.data.view(torch.uint8), requires_grad=False)
        module._parameters[name + "_absmax"] = nn.Parameter(qs.absmax.view(torch.uint8), requires_grad=False)
        module.register_buffer(name + "_code", qs.code)
        if qs.nested:
            module.register_buffer(name + "_offset", qs.offset)
            module.register_buffer(name + "_absmax2", qs.state2.absmax)
            module.register_buffer(name + "_code2", qs.state2.code)
        layout[name] = {"shape": tuple(qs.shape), "blocksize": qs.blocksize, "quant_type": qs.quant_type,
                        "dtype": qs.dtype, "nested": qs.nested, "blocksize2": qs.state2.blocksize if qs.nested else 256}


# --------------------------------------------------------------------------------------------
# sharding
# --------------------------------------------------------------------------------------------
def blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one by one, before the root: every child of an nn.ModuleList that holds
    parameters (a transformer's layers; outermost lists only), and the input and output embeddings
    when they are separate modules with untied weights. Each unit is all-gathered just before it
    runs and freed after it; the root's own parameters stay gathered from forward to backward, so
    keeping the (large) embedding and head out of the root keeps them out of the per-rank peak."""
    found = [child for lst in outermost_module_lists(model) for child in lst if any(True for _ in child.parameters())]
    ends = [getattr(model, f, lambda: None)() for f in ("get_input_embeddings", "get_output_embeddings")]
    ends = [m for m in ends if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
    shared = len(ends) == 2 and {id(p) for p in ends[0].parameters()} & {id(p) for p in ends[1].parameters()}
    taken = {id(sub) for b in found for sub in b.modules()}
    return found + [m for m in ends if not shared and id(m) not in taken]


def _signature(model: nn.Module) -> str:
    rows = [f"{n}:{tuple(t.shape)}:{t.dtype}:{t.requires_grad}" for n, t in model.named_parameters()]
    rows += [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in model.named_buffers()]
    return "\n".join(rows)


def _check_same_model(model: nn.Module, device) -> None:
    """Every rank must hold the same parameter names, shapes, dtypes and trainable flags."""
    sig = _signature(model)
    digest = torch.frombuffer(bytearray(hashlib.sha256(sig.encode()).digest()), dtype=torch.uint8).to(device)
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    differ = [r for r, d in enumerate(gathered) if not torch.equal(d, gathered[0])]
    if differ:
        raise QLoRAError(f"rank(s) {differ} hold a different model than rank 0 (parameter names, shapes, dtypes or "
                         f"trainable flags; this rank has {sig.count(chr(10)) + 1} tensors): build the model the "
                         "same way on every process (qlora.fsdp.load_4bit, then the same add_lora)")


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shard_model(model: nn.Module, *, reshard_after_forward: bool = True, mp_policy=None) -> nn.Module:
    """Shard `model` over the default process group with FSDP2, in place; returns `model`.

    Call it on every rank, after add_lora and before making the optimizer. Rank 0 must hold the
    values; other ranks may hold the same model on the meta device. The 4-bit layers become
    `Linear4bitShard`s; `fully_shard` goes on each block (`blocks`) and then on the root; every
    parameter and buffer then gets rank 0's values (parameters scattered one at a time, buffers
    broadcast). `mp_policy`: an optional `torch.distributed.fsdp.MixedPrecisionPolicy` (it never
    touches the uint8 4-bit tensors)."""
    from torch.distributed.device_mesh import init_device_mesh  # lazy: FSDP only (~0.5 s)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # lazy: FSDP only (~0.5 s)
    from torch.distributed.tensor import distribute_tensor  # lazy: FSDP only (~0.5 s)

    if not (dist.is_available() and dist.is_initialized()):
        raise QLoRAError("FSDP needs a process group: launch the script with torchrun --nproc_per_node N (on GPUs "
                         "also accelerate launch --multi_gpu --num_processes N); train(fsdp=True) starts it then")
    if is_sharded(model):
        raise QLoRAError("this model is already sharded (shard_model runs once per model)")
    device, rank = device_for_rank(), dist.get_rank()
    to_shardable(model)
    _check_same_model(model, device)
    source = {}
    if rank == 0:   # references to rank 0's whole tensors, kept until they are scattered below
        source = {n: p.detach() for n, p in model.named_parameters()}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy or MixedPrecisionPolicy())
    for block in blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    if rank != 0:
        model.to_empty(device=device)       # meta (or this rank's own values) -> room for rank 0's
    with torch.no_grad():
        for name, p in model.named_parameters():
            whole = source.pop(name).to(device) if rank == 0 else torch.empty(p.shape, dtype=p.dtype, device=device)
            local(p).copy_(distribute_tensor(whole, mesh, p.placements, src_data_rank=0).to_local())
            del whole
        for _, b in model.named_buffers():
            dist.broadcast(b, src=0)
    return model


# --------------------------------------------------------------------------------------------
# gathering, clipping, measuring
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def gathered(model: nn.Module):
    """Inside the block the model's trainable parameters are whole plain tensors on every rank
    (all-gathered once, in named_parameters order), so code written for an unsharded model
    (save_adapter, state dicts) works unchanged. No forward/backward inside. No-op when unsharded."""
    swapped = []
    for name, p in list(model.named_parameters()):
        if p.requires_grad and is_dtensor(p):
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            swapped.append((owner, attr, p))
            owner._parameters[attr] = nn.Parameter(p.full_tensor().detach(), requires_grad=True)
    try:
        yield model
    finally:
        for owner, attr, p in swapped:
            owner._parameters[attr] = p


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2) over sharded gradients: squares summed over each rank's
    shards, all-reduced, then every local shard scaled by min(1, max_norm / (norm + 1e-6))."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    device = grads[0].device if grads else device_for_rank()
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        sq += g.detach().float().pow(2).sum()
    dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.dtype))
    return norm


def shard_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """param <- value (a whole tensor present on every rank): a DTensor takes its own part."""
    from torch.distributed.tensor import distribute_tensor  # lazy: FSDP only (~0.5 s)
    value = value.to(device=local(param).device, dtype=param.dtype)
    if is_dtensor(param):
        local(param).copy_(distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local())
    else:
        param.copy_(value)


def shard_optimizer_state(state_dict: dict, optimizer) -> dict:
    """An optimizer state dict of whole tensors -> the same with DTensors wherever the parameter is
    one and the state tensor has its shape (AdamW's moments), so load_state_dict gets each rank's shard."""
    from torch.distributed.tensor import distribute_tensor  # lazy: FSDP only (~0.5 s)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {}
    for pid, state in state_dict["state"].items():
        p = params[int(pid)]
        out[pid] = {k: (distribute_tensor(v.to(local(p).device), p.device_mesh, p.placements, src_data_rank=None)
                        if is_dtensor(p) and torch.is_tensor(v) and v.shape == p.shape else v)
                    for k, v in state.items()}
    return {**state_dict, "state": out}


def local_bytes(model: nn.Module, optimizer=None) -> dict[str, int]:
    """Bytes this rank holds, from its own tensors (local shards of DTensors, whole plain tensors):
    `packed_4bit` (packed codes + absmax of the 4-bit layers: sharded), `quant_constants` (their
    code books, nested absmax and offset: replicated, ~1.1 KiB a layer), `trainable`, `frozen_float`
    and `optimizer` (its state tensors). Each tensor is counted once."""
    out = dict.fromkeys(("packed_4bit", "quant_constants", "trainable", "frozen_float", "optimizer"), 0)
    seen = set()

    def add(kind, t):
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out[kind] += local(t).nbytes

    for m in model.modules():
        if isinstance(m, Linear4bitShard):
            parts = [m.weight, m.absmax], [m.code, getattr(m, "offset", None), getattr(m, "absmax2", None),
                                           getattr(m, "code2", None)]
        elif is_4bit(m) and m.weight.quant_state is not None:
            qs = m.weight.quant_state
            nested = [qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else []
            parts = [m.weight, qs.absmax], [qs.code, *nested]
        elif is_experts_module(m) and any(is_4bit_param(q) for q in m.parameters(recurse=False)):   # 4-bit experts
            states = [q.quant_state for q in m.parameters(recurse=False) if is_4bit_param(q)]
            parts = ([q for q in m.parameters(recurse=False) if is_4bit_param(q)] + [s.absmax for s in states],
                     [c for s in states for c in (s.code, *((s.offset, s.state2.absmax, s.state2.code)
                                                            if s.nested else ()))])
        elif m.__dict__.get("qlora_4bit_layout"):      # 4-bit experts laid out for sharding
            names = list(m.qlora_4bit_layout)
            parts = ([t for n in names for t in (m.get_parameter(n), m.get_parameter(n + "_absmax"))],
                     [b for n in names for s in ("_code", "_offset", "_absmax2", "_code2")
                      for b in [m._buffers.get(n + s)] if b is not None])
        else:
            continue
        for t in parts[0]:
            add("packed_4bit", t)
        for t in parts[1]:
            add("quant_constants", t)
    for p in model.parameters():
        add("trainable" if p.requires_grad else "frozen_float", p)
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    add("optimizer", v)
    return out
