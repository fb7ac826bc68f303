"""Per-rank bytes and step time: 1 process vs 2 CPU ranks with DDP vs 2 CPU ranks with FSDP2 (qlora.fsdp).

    PYTHONPATH=. python benchmarks/fsdp_cpu.py --json runs/fsdp_cpu.json      # launches the three runs

Model: random Llama (hidden 512, MLP 1376, 4 layers, 8/4 heads, vocab 4096, untied head: 15.8M params),
quantized to NF4 + double quant (fp32 compute: CPUs without AVX512-BF16 are slow in bf16), LoRA r=16
on all linear layers, dropout 0, gradient checkpointing, AdamW; 2 ranks x batch 4 or 1 process x batch 8,
sequence 128, STEPS steps. Each rank reports its own tensors (qlora.fsdp.local_bytes) at the end, the
first step's peak (memprofile's CPU allocator account) and the mean step time (first step excluded).
Wall-clock times on a shared machine are noisy: compare the runs of one invocation only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS, SEQ, PER_RANK_BATCH = 8, 128, 4


def _worker(mode: str, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import qlora
    from qlora.quant import quantize_model
    from qlora.train.loop import TrainConfig, train
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = quantize_model(LlamaForCausalLM(cfg), compute_dtype=torch.float32)
    qlora.add_lora(model, qlora.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    qlora.prepare_for_training(model)
    g = torch.Generator().manual_seed(1)
    batch = PER_RANK_BATCH * (2 if world == 1 else 1)
    data = [torch.randint(1, 4096, (SEQ,), generator=g) for _ in range(STEPS * PER_RANK_BATCH * 2)]
    result = train(model, data, lambda ex: torch.stack(ex),
                   lambda m, ids: m(input_ids=ids, labels=ids).loss,
                   TrainConfig(batch_size=batch, lr=1e-4, log_every=1, out_dir=str(out / f"{mode}-run"),
                               progress=False, fsdp=mode == "fsdp"))
    row = {"mode": mode, "world": world, "rank": rank, "batch_per_rank": batch, "local_bytes": result.local_bytes,
           "first_step_peak_bytes": result.first_step_peak_bytes, "mean_step_seconds": result.mean_step_seconds,
           "losses": [loss for _, loss in result.losses]}
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--worker", choices=["one", "ddp", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args.worker, Path(args.out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("one", "ddp", "fsdp"):
            launch = ([sys.executable] if mode == "one" else
                      [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
            subprocess.run([*launch, __file__, "--worker", mode, "--out", tmp], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            for f in sorted(Path(tmp).glob(f"{mode}-rank*.json")):
                rows.append(json.loads(f.read_text()))
    kinds = ("packed_4bit", "quant_constants", "trainable", "frozen_float", "optimizer")
    print("| run | rank | " + " | ".join(kinds) + " | sum | first-step peak | step time |")
    print("|---" * (len(kinds) + 5) + "|")
    for r in rows:
        lb = r["local_bytes"]
        print(f"| {r['mode']} ({r['world']} x batch {r['batch_per_rank']}) | {r['rank']} | "
              + " | ".join(f"{lb[k] / 2**20:.2f} MiB" for k in kinds)
              + f" | {sum(lb.values()) / 2**20:.2f} MiB | {r['first_step_peak_bytes'] / 2**20:.1f} MiB"
              f" | {r['mean_step_seconds']:.3f} s |")
    one = next(r for r in rows if r["mode"] == "one")["losses"]
    for mode in ("ddp", "fsdp"):
        other = next(r for r in rows if r["mode"] == mode and r["rank"] == 0)["losses"]
        print(f"loss curve {mode} vs one process: max |diff| {max(abs(a - b) for a, b in zip(one, other)):.2e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
