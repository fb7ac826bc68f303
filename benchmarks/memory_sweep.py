"""The planner's accuracy: measured (CPU, memprofile.measure) vs predicted (qlora.plan.planner, fake-tensor
trace) memory of one training step, on tiny random models of many architectures.

    PYTHONPATH=$PWD python benchmarks/memory_sweep.py                      # the required grid, one process
    PYTHONPATH=$PWD python benchmarks/memory_sweep.py --archs llama,bert --out runs/sweep
    PYTHONPATH=$PWD python benchmarks/memory_sweep.py --archs falcon --configs full,qlora-ckpt --batches 2
    PYTHONPATH=$PWD python benchmarks/memory_sweep.py --merge runs/a runs/b   # one table from pieces

Grid per architecture: configurations full, lora, lora-ckpt, qlora, qlora-ckpt x batches (1, 4) x
sequence lengths (32, 128; ViT: image sides 32, 64) x run variants (chunked loss + AdamW, the
model's own loss + AdamW, chunked loss + 8-bit AdamW; classifiers use their own loss). fp32 (what
`compute_dtype: auto` is on CPU), LoRA r=16 alpha=16 dropout 0.05 on all-linear. Every model has
4 blocks (8 for Gemma 2, whose layer pattern has period 2), so the planner extrapolates from 2 and
3 blocks (4 and 6) to them. A progress bar over the whole grid; each row's errors are printed above
it; rows.json is rewritten after every architecture (a killed run keeps what it measured), and the
worst error per architecture and category is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

CATEGORIES = ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer",
              "activations", "peak")
CONFIGURATIONS = ("full", "lora", "lora-ckpt", "qlora", "qlora-ckpt")
_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=512, max_position_embeddings=512, num_hidden_layers=4)
TINY = {
    "llama": dict(model_type="llama", **_TEXT),
    "qwen3": dict(model_type="qwen3", **_TEXT),
    "gemma2": dict(model_type="gemma2", **{**_TEXT, "num_hidden_layers": 8}),
    "phi3": dict(model_type="phi3", **{**_TEXT, "pad_token_id": 0}),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     vocab_size=512, max_position_embeddings=512, num_hidden_layers=4),
    "mixtral": dict(model_type="mixtral", **_TEXT, num_local_experts=4, num_experts_per_tok=2),
    "bert": dict(model_type="bert", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 vocab_size=512, max_position_embeddings=512, num_hidden_layers=4, num_labels=3),
    "vit": dict(model_type="vit", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                image_size=32, patch_size=8, num_hidden_layers=4, num_labels=10),
    # beyond the required list (GPT-2: transformers Conv1D layers, quantized and adapted as linear layers)
    "qwen2": dict(model_type="qwen2", **_TEXT),
    "mistral": dict(model_type="mistral", **_TEXT),
    "gemma3_text": dict(model_type="gemma3_text", **{**_TEXT, "num_hidden_layers": 12}),
    "olmo2": dict(model_type="olmo2", **_TEXT),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_head=4, n_layer=4, vocab_size=512, n_positions=512,
                 bos_token_id=0, eos_token_id=0),
    "falcon": dict(model_type="falcon", hidden_size=64, num_attention_heads=4, vocab_size=512,
                   num_hidden_layers=4, new_decoder_architecture=True, num_kv_heads=2),
    "qwen3_moe": dict(model_type="qwen3_moe", **_TEXT, moe_intermediate_size=64, num_experts=4,
                      num_experts_per_tok=2),
    # mixtures of experts beyond Mixtral / Qwen3-MoE (qlora.quant.experts: 4-bit fused experts, LoRA per expert)
    "olmoe": dict(model_type="olmoe", **_TEXT, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(model_type="deepseek_v3", **{**_TEXT, "head_dim": 8, "num_key_value_heads": 4},  # MLA: kv = q heads
                        moe_intermediate_size=64, n_routed_experts=4,
                        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "gpt_oss": dict(model_type="gpt_oss", **{**_TEXT, "intermediate_size": 64}, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"] * 2),
    "roberta": dict(model_type="roberta", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    vocab_size=512, max_position_embeddings=514, num_hidden_layers=4, num_labels=3),
}
REQUIRED = ("llama", "qwen3", "gemma2", "phi3", "gpt_neox", "mixtral", "bert", "vit")
VARIANTS = (("chunked", "adamw"), ("model", "adamw"), ("chunked", "adamw8bit"))


def task_of(arch: str) -> str:
    return {"bert": "seq-cls", "roberta": "seq-cls", "vit": "image-cls"}.get(arch, "causal-lm")


def rows_for(arch: str, configurations=CONFIGURATIONS, batches=(1, 4), seqs=None, variants=VARIANTS,
             progress=None, task=None, **fields) -> list[dict]:
    """Measured vs predicted for one architecture over the grid; one dict per row. `task`: the arch's own
    (causal-lm, seq-cls, image-cls), dpo (a batch of preference pairs, a causal LM's) or grpo (seq: the
    completion length); `fields`: more RunSettings (num_generations, prompt_length, beta, ...)."""
    from memprofile.measure import measure_step
    from qlora.plan import Planner, RunSettings, build, load_config, make_batch
    from qlora.plan.build import loss_fn, measured_optimizer

    task = task or task_of(arch)
    config = load_config(TINY[arch])
    seqs = seqs or ((32, 64) if task == "image-cls" else (32, 128))
    if task not in ("causal-lm", "dpo", "grpo"):
        variants = tuple(dict.fromkeys(("model", opt) for _, opt in variants))
    rows = []
    for conf in configurations:
        for loss, opt in variants:
            settings = RunSettings(device="cpu", task=task, loss=loss, optimizer=opt, **fields).with_configuration(conf)
            planner = Planner(config, settings)
            for seq in seqs:
                cfg = config
                if task == "image-cls":
                    cfg = load_config({**TINY[arch], "image_size": seq})
                torch.manual_seed(0)
                model = build(cfg, settings)
                for batch in batches:
                    x = make_batch(cfg, task, batch, seq, prompt_length=settings.prompt_length)
                    m = measure_step(model, x, loss_fn=loss_fn(settings),
                                     optimizer=measured_optimizer(settings), timed_steps=0)
                    p = planner.estimate(batch, seq)
                    mb, pb = m.bytes(), p.bytes()
                    err = {k: (pb[k] - mb[k]) / mb[k] * 100 if mb[k] else (0.0 if pb[k] == 0 else 100.0)
                           for k in CATEGORIES}
                    rows.append({"arch": arch, "config": conf, "loss": loss, "optimizer": opt, "batch": batch,
                                 "seq": seq, "measured": mb, "predicted": pb, "error_pct": err,
                                 "peak_at": p.peak_at})
                    if progress:
                        progress(rows[-1])
                del model
    return rows


def worst(rows: list[dict]) -> dict:
    """{arch: {category: worst |error| %}}."""
    out: dict = {}
    for r in rows:
        w = out.setdefault(r["arch"], {k: 0.0 for k in CATEGORIES})
        for k, v in r["error_pct"].items():
            w[k] = max(w[k], abs(v))
    return out


def worst_table(rows: list[dict]) -> str:
    lines = ["| architecture | rows | " + " | ".join(CATEGORIES) + " |", "|---|---|" + "---|" * len(CATEGORIES)]
    counts: dict = {}
    for r in rows:
        counts[r["arch"]] = counts.get(r["arch"], 0) + 1
    for arch, w in worst(rows).items():
        lines.append(f"| {arch} | {counts[arch]} | " + " | ".join(f"{w[k]:.2f} %" for k in CATEGORIES) + " |")
    return "\n".join(lines) + "\n"


def out_of_bounds(rows: list[dict], peak: float = 5.0, other: float = 2.0) -> list[dict]:
    """Rows with an error beyond the bounds of docs/memory.md (peak 5 %, other categories 2 %)."""
    return [r for r in rows if any(abs(v) > (peak if k == "peak" else other) for k, v in r["error_pct"].items())]


def grid_size(arch: str, configurations, batches, seqs, variants) -> int:
    """Rows rows_for(arch, ...) will produce."""
    if task_of(arch) != "causal-lm":
        variants = tuple(dict.fromkeys(("model", opt) for _, opt in variants))
    return len(configurations) * len(variants) * len(batches) * len(seqs or (0, 0))


def load_rows(folders) -> tuple[list[dict], dict]:
    rows, failed = [], {}
    for folder in folders:
        data = json.loads((Path(folder) / "rows.json").read_text())
        rows += data["rows"]
        failed.update(data["failed"])
    return rows, failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(REQUIRED), help="comma-separated, from: " + ", ".join(TINY))
    ap.add_argument("--variants", default=",".join(f"{a}:{b}" for a, b in VARIANTS),
                    help="loss:optimizer pairs (default: %(default)s)")
    ap.add_argument("--configs", default=",".join(CONFIGURATIONS))
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--seqs", default=None, help="default: 32,128 (ViT: image sides 32,64)")
    ap.add_argument("--out", default="runs/memory_sweep")
    ap.add_argument("--merge", nargs="+", metavar="FOLDER", help="print one table from the rows.json of earlier runs")
    args = ap.parse_args(argv)
    if args.merge:
        rows, failed = load_rows(args.merge)
        print(worst_table(rows))
        print(f"rows beyond the bounds (peak 5 %, others 2 %): {len(out_of_bounds(rows))}")
        for arch, why in failed.items():
            print(f"{arch}: {why}")
        return 1 if failed else 0
    import logging
    import time

    from tqdm.auto import tqdm
    logging.getLogger("transformers").setLevel(logging.ERROR)   # "use_cache=True is incompatible ..." per model
    torch.set_num_threads(1)
    rows, failed = [], {}
    variants = tuple(tuple(v.split(":")) for v in args.variants.split(","))
    archs, confs = args.archs.split(","), tuple(args.configs.split(","))
    batches = tuple(int(x) for x in args.batches.split(","))
    seqs = tuple(int(x) for x in args.seqs.split(",")) if args.seqs else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(grid_size(a, confs, batches, seqs, variants) for a in archs), desc="sweep", unit="row")

    def show(r):
        bar.update(1)
        bar.write(f"{r['arch']:11s} {r['config']:10s} {r['loss']:7s} {r['optimizer']:9s} b={r['batch']} "
                  f"s={r['seq']:3d} " + " ".join(f"{v:+6.2f}" for v in r["error_pct"].values()) + f"  {r['peak_at']}")
    start = time.perf_counter()
    for arch in archs:
        try:
            arch_seqs = seqs
            if seqs and task_of(arch) == "image-cls":
                arch_seqs = tuple(max(32, x // 2) for x in seqs)
            rows += rows_for(arch, configurations=confs, variants=variants, progress=show, batches=batches,
                             seqs=arch_seqs)
        except Exception as e:  # noqa: BLE001 - one architecture failing must not stop the sweep
            failed[arch] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            bar.write(f"{arch}: FAILED {failed[arch]}")
        (out / "rows.json").write_text(json.dumps({"rows": rows, "failed": failed,
                                                   "seconds": time.perf_counter() - start}, indent=1))
    bar.close()
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s; worst |predicted - measured| / measured, "
          "per architecture and category:\n")
    print(worst_table(rows))
    print(f"rows beyond the bounds (peak 5 %, others 2 %): {len(out_of_bounds(rows))}")
    for arch, why in failed.items():
        print(f"{arch}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
