"""One QLoRA training step of a mid-size mixture of experts: qlora vs PEFT + bitsandbytes as people run it today.

    .venv/bin/python benchmarks/moe_vs_peft.py                          # CPU, fp32 compute, 2 rounds A B C A B C
    .venv/bin/python benchmarks/moe_vs_peft.py --shape e128             # Qwen3-30B-A3B's routing, scaled down
    .venv/bin/python benchmarks/moe_vs_peft.py --dtype bfloat16 --seq 2048 --batch 4     # a GPU

Models (random bf16 weights written once per shape), attention 8/2 heads of 64, vocab 8,192, 8 layers:
  e32   Qwen3-MoE shape, 32 experts (top-4), hidden 512, expert MLP 512: 218M parameters, 201M in the experts.
  e128  Qwen3-30B-A3B's routing (128 experts, top-8) at a quarter of its widths: hidden 512, expert MLP 192:
        306M parameters, 302M in the experts.
  peft   baseline: transformers' 4-bit loader (BitsAndBytesConfig NF4 + double quant: the nn.Linear layers;
         transformers leaves the fused 3-D experts in the loading dtype) + prepare_model_for_kbit_training
         + PEFT 0.21 LoRA on the attention projections and on the experts through `target_parameters` (the
         same adapters as qlora's; "all-linear" would also adapt the router and double gate_up's rank here),
         non-reentrant checkpointing, the model's own loss.
  qlora  `qlora train`'s path: qlora.load_4bit (experts 4-bit too) + add_lora("all-linear": every linear layer
         and expert matrix) + prepare_for_training + the chunked loss; the experts run as grouped matmuls.
  loop   the same, with the per-expert loop qlora ran before (commit d9e7501: experts sorted, counts read on
         the host, one matmul per routed expert and three more for its LoRA, <= 64 MiB dequantized at a time).
Both: LoRA r=16, alpha 16, dropout 0 (PEFT refuses dropout on parameters), AdamW, one step measured after one
warm-up step (memprofile: the exact allocator-event peak on CPU, max_memory_allocated on CUDA), each run a fresh
process, runs alternated. The first loss (eval, before training) shows both compute the same model up to the
experts' 4-bit rounding.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CONFIG = dict(model_type="qwen3_moe", vocab_size=8192, hidden_size=512, intermediate_size=1024,
              moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
              decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
SHAPES = {"e32": CONFIG, "e128": {**CONFIG, "moe_intermediate_size": 192, "num_experts": 128, "num_experts_per_tok": 8}}
LORA = dict(r=16, lora_alpha=16, lora_dropout=0.0)


def make_model(folder: Path, shape: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(SHAPES[shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "mlp.gate" in n:
                p.normal_(0, 0.5)          # a router that spreads tokens over the experts
    model.save_pretrained(folder)


class Step(torch.nn.Module):
    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, input_ids, labels):
        return self.loss(self.model, input_ids, labels)


def build(variant: str, folder: str, dtype) -> Step:
    if variant == "peft":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        matrices = [f"{n}.{w}" for n, m in model.named_modules() if n.endswith("mlp.experts")
                    for w in ("gate_up_proj", "down_proj")]
        # the attention projections by name: "all-linear" on this family makes PEFT 0.21's v4 -> v5 conversion
        # adapt the router and give gate_up_proj rank 2r (17.3M trainable parameters instead of the same 10.9M)
        model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                 target_parameters=matrices, **LORA))
        return Step(model, lambda m, ids, y: m(input_ids=ids, labels=y).loss)
    import qlora
    model = qlora.load_4bit(folder, compute_dtype=dtype)
    qlora.add_lora(model, qlora.LoraConfig(target_modules="all-linear", **LORA))
    qlora.prepare_for_training(model)
    if variant == "loop":
        use_loop(model)
    return Step(model, lambda m, ids, y: qlora.causal_lm_loss(m, ids, y))


# ----------------------------------------------------------------- the per-expert loop qlora ran up to commit d9e7501
def use_loop(model) -> None:
    """Every experts module runs the old loop (Qwen3-MoE's layout: no biases, no post-expert norm): counts read
    on the host, experts dequantized <= 64 MiB at a time, one matmul per routed expert (and two for its LoRA)."""
    import types

    from qlora.arch.experts import is_experts_module
    for m in model.modules():
        if is_experts_module(m) and "forward" in m.__dict__:
            per_expert = max(p.quant_state.shape[1] * p.quant_state.shape[2] for p in m.parameters(recurse=False)
                             if hasattr(p, "quant_state")) * 4
            m.qlora_loop_chunk = max(1, min((64 << 20) // per_expert, (m.num_experts + 1) // 2))
            m.forward = types.MethodType(_loop_forward, m)


class _LoopFrozen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, qs, idx, sizes, transposed):
        ctx.qs, ctx.sizes, ctx.transposed = qs, sizes, transposed
        ctx.save_for_backward(codes, idx)
        return _loop_mm(x, _dequantize_idx(codes, qs, idx), sizes, transposed)

    @staticmethod
    def backward(ctx, dy):
        codes, idx = ctx.saved_tensors
        w = _dequantize_idx(codes, ctx.qs, idx)
        return _loop_mm(dy.to(w.dtype), w, ctx.sizes, not ctx.transposed), None, None, None, None, None


def _dequantize_idx(codes, qs, idx):
    E, a, b = qs.shape
    n, nb = a * b, a * b // qs.blocksize
    picked = codes.view(E, n // 2)[idx].reshape(-1)
    pos = (idx[:, None] * nb + torch.arange(nb, device=idx.device)).reshape(-1)
    s2 = qs.state2
    absmax = s2.code[qs.absmax[pos].long()] * s2.absmax[pos // s2.blocksize] + qs.offset
    out = torch.ops.bitsandbytes.dequantize_4bit.default(picked, absmax.float(), qs.blocksize, qs.quant_type,
                                                         (len(idx) * n,), qs.dtype)
    return out.view(len(idx), a, b)


def _loop_mm(x, w, sizes, transposed):
    x = x.to(w.dtype)
    return torch.cat([xj @ w[j] if transposed else xj @ w[j].T for j, xj in enumerate(x.split(sizes))])


def _loop_project(module, name, x, idx, sizes):
    p = module.get_parameter(name)
    y = _LoopFrozen.apply(x, p.data, p.quant_state, idx, sizes, module.is_transposed)
    lora = module.expert_deltas[name]
    A, B = lora.lora_A[idx], lora.lora_B[idx]
    delta = torch.cat([(xj @ A[j].T) @ B[j].T for j, xj in enumerate(x.to(A.dtype).split(sizes))]) * lora.scaling
    return y + delta.to(y.dtype)


def _loop_forward(self, hidden_states, top_k_index, top_k_weights):
    from qlora.arch.experts import expert_weight_names
    up, down = expert_weight_names(self)
    T, K = top_k_index.shape
    ids = top_k_index.reshape(-1)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=self.num_experts).tolist()
    hit = [e for e, c in enumerate(counts) if c]
    x = hidden_states[order // K]
    outs, start, step = [], 0, self.qlora_loop_chunk
    for i in range(0, len(hit), step):
        chunk = hit[i:i + step]
        sizes = [counts[e] for e in chunk]
        idx = torch.tensor(chunk, device=hidden_states.device)
        part = slice(start, start + sum(sizes))
        h = self._apply_gate(_loop_project(self, up, x[part], idx, sizes))
        outs.append(_loop_project(self, down, h, idx, sizes))
        start = part.stop
    y = torch.cat(outs) * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    out = y.new_zeros(T * K, y.shape[-1]).index_copy(0, order, y)
    return out.view(T, K, -1).sum(dim=1).to(hidden_states.dtype)


def worker(args) -> dict:
    from memprofile.measure import measure_step_or_oom
    torch.manual_seed(1)
    step = build(args.worker, args.folder, getattr(torch, args.dtype))
    device = next(step.parameters()).device
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
    step.eval()
    with torch.no_grad():
        first_loss = step(**batch).item()
    step.train()
    trainable = sum(p.numel() for p in step.parameters() if p.requires_grad)
    m = measure_step_or_oom(step, batch, loss_fn=lambda out, b: out, warmup_steps=1, timed_steps=args.timed)
    return {"variant": args.worker, "first_loss": first_loss, "trainable": trainable, "bytes": m.bytes(),
            "fits": m.fits, "peak_method": m.peak_method, "step_seconds": m.step_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="e32")
    ap.add_argument("--variants", default="peft,loop,qlora")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timed", type=int, default=1)
    ap.add_argument("--folder", default=None, help="the model folder (default: written once to a temp folder)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    folder = args.folder or str(Path(tempfile.gettempdir()) / f"qlora-moe-bench-{args.shape}")
    if not (Path(folder) / "config.json").exists():
        make_model(Path(folder), args.shape)
    runs: dict = {v: [] for v in args.variants.split(",")}
    for _ in range(args.repeats):
        for v in runs:
            cmd = [sys.executable, __file__, "--worker", v, "--folder", folder, "--shape", args.shape,
                   "--batch", str(args.batch),
                   "--seq", str(args.seq), "--dtype", args.dtype, "--timed", str(args.timed)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{v} failed:\n{out.stderr[-3000:]}")
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[v][-1]
            print(f"{v}: first loss {r['first_loss']:.4f}, peak {r['bytes']['peak'] / 2**20:.1f} MiB, "
                  f"step {r['step_seconds']:.2f} s", flush=True)
    rows = ["| variant | trainable params | first loss | weights (MiB) | peak (MiB) | step (s, median) |",
            "|---|---|---|---|---|---|"]
    med = {}
    for v, rs in runs.items():
        b = rs[0]["bytes"]
        weights = (b["weights_quantized"] + b["weights_frozen"] + b["weights_trainable"]) / 2**20
        med[v] = (statistics.median(r["bytes"]["peak"] for r in rs), statistics.median(r["step_seconds"] for r in rs))
        rows.append(f"| {v} | {rs[0]['trainable']:,} | {rs[0]['first_loss']:.4f} | {weights:.1f} | "
                    f"{med[v][0] / 2**20:.1f} | {med[v][1]:.2f} |")
    print("\n".join(rows))
    for v in (v for v in med if v != "peft" and "peft" in med):
        print(f"{v} / peft: peak {med[v][0] / med['peft'][0]:.3f}x, step {med[v][1] / med['peft'][1]:.3f}x "
              f"({args.shape}, {args.batch} x {args.seq} tokens, {args.dtype}, {torch.get_num_threads()} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
