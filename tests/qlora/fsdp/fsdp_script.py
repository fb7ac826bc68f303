"""Checks of qlora.fsdp on N gloo processes, launched by tests/qlora/fsdp/test_shard.py (one start-up, many checks):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/qlora/fsdp/fsdp_script.py OUT

Each rank writes OUT/rank{r}.json (facts) and rank 0 the tensors the test compares with one process:
  A. QLoRA on a tiny Llama, rank 0 holds the values, the others a meta-device model; train(fsdp=True)
     for STEPS steps; per-rank bytes; the packed 4-bit bytes + quant states after training;
     logits and gradients of the sharded model on a fixed batch.
  B. A 4-bit layer whose packed bytes hold every 16-bit pattern (NaN ones as bf16/fp16 included),
     sharded under a bf16 MixedPrecisionPolicy: the all-gathered bytes seen in forward, and the output.
  C. Interrupted at step KILL_AT, then resume=True: the curve.
  D. Bad input: too few examples; a rank with another model.
  E. grad_accum=2 with micro-batches of 1: the final adapter (compared with A's).
The builders below are imported by the test for its one-process reference.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import qlora
from qlora import LoraConfig, QLoRAError

VOCAB, SEQ, STEPS, PER_RANK_BATCH, KILL_AT, SAVE_EVERY = 96, 8, 12, 2, 7, 4


def llama_config(**overrides):
    from transformers import LlamaConfig
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    return LlamaConfig(**{**cfg, **overrides})


def qlora_llama(meta: bool = False, r: int = 4):
    """fp32 QLoRA tiny Llama (NF4 + double quant, LoRA on all linears, dropout 0, checkpointing on).
    meta=True: the same on the meta device, no values."""
    from transformers import LlamaForCausalLM

    from qlora.fsdp import meta_4bit
    from qlora.quant import quantize_model
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config())
        meta_4bit(model, compute_dtype=torch.float32)
    else:
        model = quantize_model(LlamaForCausalLM(llama_config()).float(), compute_dtype=torch.float32)
    model.eval()
    qlora.add_lora(model, LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    qlora.prepare_for_training(model)
    return model


def data(n: int = STEPS * PER_RANK_BATCH * 2):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (SEQ,), generator=g) for _ in range(n)]


def collate(examples):
    return {"input_ids": torch.stack(examples)}


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def train_config(out, batch_size, **kw):
    from qlora.train.loop import TrainConfig
    base = dict(epochs=1, batch_size=batch_size, lr=5e-3, warmup_ratio=0.1, max_grad_norm=0.05, log_every=1,
                save_every=SAVE_EVERY, keep_last=3, seed=0, out_dir=str(out), progress=False, fsdp=True)
    return TrainConfig(**{**base, **kw})


def probe_batch():
    g = torch.Generator().manual_seed(11)
    return torch.randint(1, VOCAB, (3, SEQ), generator=g)


def packed_state(model) -> dict:
    """Packed codes and quant-state tensors of every 4-bit layer, whole (gathered when sharded)."""
    from qlora.fsdp import Linear4bitShard, full
    from qlora.quant import is_linear4bit
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear4bitShard):
            qs = {"weight": full(m.weight), "absmax": full(m.absmax), "code": m.code}
            if m.nested:
                qs.update(offset=m.offset, absmax2=m.absmax2, code2=m.code2)
        elif is_linear4bit(m):
            s = m.weight.quant_state
            qs = {"weight": m.weight.data, "absmax": s.absmax.view(torch.uint8), "code": s.code}
            if s.nested:
                qs.update(offset=s.offset, absmax2=s.state2.absmax, code2=s.state2.code)
        else:
            continue
        out.update({f"{name}.{k}": v.detach().clone().contiguous() for k, v in qs.items()})
    return out


def probe(model) -> dict:
    """Logits and LoRA gradients (whole) on probe_batch(): the same on every rank."""
    from qlora.fsdp import full
    model.zero_grad(set_to_none=True)
    ids = probe_batch()
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    out = {"logits": logits.detach().clone()}
    for n, p in model.named_parameters():
        if p.requires_grad and "lora_" in n:
            out[f"grad.{n}"] = full(p.grad).detach().clone()
    model.zero_grad(set_to_none=True)
    return out


class Interrupted(BaseException):
    """Stands in for a killed job (raised from inside the loss function on every rank)."""


def main(out: Path) -> None:
    import torch.distributed as dist
    from accelerate.state import PartialState
    from safetensors.torch import save_file

    from qlora.fsdp import Linear4bitShard, shard_model
    from qlora.train.loop import read_metrics, train
    torch.set_num_threads(1)
    state = PartialState(cpu=not torch.cuda.is_available())   # the process group train() uses (gloo on CPU)
    rank, world = state.process_index, state.num_processes
    facts = {"rank": rank, "world": world, "backend": state.backend}

    # ---- A: meta loading, sharded training, per-rank bytes, bytes unchanged, exact forward/backward
    model = qlora_llama(meta=rank != 0)
    facts["meta_before"] = all(p.is_meta for p in model.parameters())
    t0 = time.perf_counter()
    result = train(model, data(), collate, lm_loss, train_config(out / "A", PER_RANK_BATCH))
    facts["A_seconds"] = time.perf_counter() - t0
    facts["A_mean_step_seconds"] = result.mean_step_seconds
    facts["A_losses"] = result.losses
    facts["A_local_bytes"] = result.local_bytes
    facts["A_n_shard_layers"] = sum(isinstance(m, Linear4bitShard) for m in model.modules())
    facts["A_placements"] = sorted({str(getattr(p, "placements", n)) for n, p in model.named_parameters()})
    tensors = {**{f"packed.{k}": v for k, v in packed_state(model).items()},
               **{f"probe.{k}": v for k, v in probe(model).items()}}
    if rank == 0:
        save_file(tensors, str(out / "A_tensors.safetensors"))
    del model

    # ---- B: every 16-bit pattern through sharding and the all-gather, under a bf16 policy
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from qlora.quant import make_linear4bit

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.layers = nn.ModuleList(make_linear4bit(nn.Linear(1024, 256, bias=False), compute_dtype=torch.float32)
                                        for _ in range(2))

        def forward(self, x):
            return self.layers[1](self.layers[0](x)[..., :256].repeat(1, 4))

    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(-1, 1)
    two = Two()
    for layer in two.layers:
        layer.weight.data.copy_(patterns)       # 1024*256/2 = 131072 bytes = every (lo, hi) byte pair once
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref_out = two(x)
    seen = []
    shard_model(two, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, cast_forward_inputs=False))
    for layer in two.layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    with torch.no_grad():
        b_out = two(x)
    pat = patterns.view(-1)
    facts["B_nan_as_bf16"] = int(torch.isnan(pat.view(torch.bfloat16)).sum())
    facts["B_nan_as_fp16"] = int(torch.isnan(pat.view(torch.float16)).sum())
    facts["B_gathered_equal"] = [bool(s.dtype == torch.uint8 and torch.equal(s.view(-1), pat)) for s in seen]
    facts["B_local_shard_bytes"] = [layer.weight.to_local().nbytes for layer in two.layers]
    facts["B_output_equal"] = bool(torch.equal(b_out.float(), ref_out))
    del two

    # ---- C: kill at KILL_AT, resume
    calls = {"n": 0}

    def killing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == KILL_AT:
            raise Interrupted
        return lm_loss(model, batch)

    try:
        train(qlora_llama(), data(), collate, killing_loss, train_config(out / "C", PER_RANK_BATCH))
    except Interrupted:
        facts["C_interrupted_at"] = calls["n"]
    dist.barrier()
    resumed = train(qlora_llama(), data(), collate, lm_loss, train_config(out / "C", PER_RANK_BATCH, resume=True))
    facts["C_resumed_losses"] = resumed.losses
    if rank == 0:
        facts["C_curve"] = [(r["step"], r["loss"]) for r in read_metrics(out / "C" / "metrics.jsonl") if "loss" in r]

    # ---- E: gradient accumulation: 2 micro-batches of 1 per rank and step (the same examples as A's steps)
    train(qlora_llama(), data(), collate, lm_loss, train_config(out / "E", 1, grad_accum=2, save_every=None))

    # ---- D: bad input
    try:
        train(qlora_llama(), data(2), collate, lm_loss, train_config(out / "D", PER_RANK_BATCH))
    except QLoRAError as e:
        facts["D_too_few"] = str(e)
    try:
        shard_model(qlora_llama(r=4 if rank == 0 else 8))
    except QLoRAError as e:
        facts["D_other_model"] = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps(facts))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
