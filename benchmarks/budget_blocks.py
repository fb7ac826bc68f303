"""Step time against the memory budget: the planner checkpoints only the first k blocks that a budget
needs (qlora.plan.planner.fewest_checkpointed_blocks, what `qlora train ... train.memory_budget=` does), and
each block left out skips its recompute. Per budget: k, predicted and measured peak, step time.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/budget_blocks.py                 # a small Llama, CPU, fp32
    PYTHONPATH=$PWD .venv/bin/python benchmarks/budget_blocks.py --config 100m   # the 99.5M bench config
    ... --timed 0 --paired 5       # step times as 5 rounds of one step per k in turn (shared cores)

The budgets are the predicted peaks at k = 0, 2, 4, ... checkpointed blocks (+1 MiB), so each picks
one k. Measured: memprofile.measure_step (exact allocator-event peak on CPU), the step time the
median of `--timed` unprofiled steps. Step times depend on what else runs on the cores: say so.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

CONFIGS = {
    "small": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=8000, tie_word_embeddings=False,
                  max_position_embeddings=4096),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small", help="small | 100m (benchmarks/bench_vs_peft.py's CONFIGS)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--timed", type=int, default=3, help="unprofiled steps timed per budget (median)")
    ap.add_argument("--every", type=int, default=2, help="budgets at k = 0, every, 2 * every, ... blocks")
    ap.add_argument("--paired", type=int, default=0,
                    help="then N rounds of one step per chosen k in turn, every model built once (median per k)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from memprofile.measure import measure_step
    from qlora.plan import Planner, RunSettings, build, fewest_checkpointed_blocks, load_config, make_batch
    from qlora.plan.build import loss_fn, measured_optimizer
    if args.config == "100m":
        from benchmarks.bench_vs_peft import CONFIGS as BENCH
        cfg = {"model_type": "llama", **BENCH["100m"]}
    else:
        cfg = CONFIGS[args.config]
    config = load_config(cfg)
    settings = RunSettings(device="cpu")             # qlora train's defaults on a CPU
    planner = Planner(config, settings)
    L = planner.layers
    ks = list(range(0, L, args.every)) + [L]
    mib = 2 ** 20
    budgets = [planner.with_checkpoint_blocks(k if k < L else None).estimate(args.batch, args.seq).peak + mib for k in ks]
    rows = []
    print(f"{args.config}: {L} blocks, batch {args.batch} x {args.seq}, fp32, {torch.get_num_threads()} threads; "
          f"{settings.describe()}", flush=True)
    print("| budget (MiB) | k chosen | predicted peak (MiB) | measured peak (MiB) | step (s) |\n|---:|---:|---:|---:|---:|")
    for budget in budgets:
        k = fewest_checkpointed_blocks(planner, budget, args.batch, args.seq)
        k = L if k is None else k
        run = RunSettings(device="cpu", checkpointing=k > 0, checkpoint_blocks=k if 0 < k < L else None)
        predicted = planner.with_checkpoint_blocks(k if k < L else None).estimate(args.batch, args.seq).peak
        torch.manual_seed(0)
        model = build(config, run)
        t0 = time.perf_counter()
        m = measure_step(model, make_batch(config, "causal-lm", args.batch, args.seq), loss_fn=loss_fn(run),
                         optimizer=measured_optimizer(run), timed_steps=args.timed)
        rows.append({"budget": budget, "k": k, "predicted_peak": predicted, "measured_peak": m.peak,
                     "step_seconds": m.step_seconds, "wall": time.perf_counter() - t0})
        print(f"| {budget / mib:,.1f} | {k} of {L} | {predicted / mib:,.1f} | {m.peak / mib:,.1f} | "
              f"{m.step_seconds:.2f} |", flush=True)
        del model
    if args.paired:
        paired(config, [r["k"] for r in rows], L, args, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "batch": args.batch, "seq": args.seq, "rows": rows}, f, indent=1)
    return 0


def paired(config, ks, L, args, rows) -> None:
    """Step times of the k's in turn, one step each per round: drift on shared cores hits all alike."""
    import statistics

    from qlora.plan import RunSettings, build, make_batch
    from qlora.plan.build import loss_fn
    batch = make_batch(config, "causal-lm", args.batch, args.seq)
    runs = []
    for k in ks:
        run = RunSettings(device="cpu", checkpointing=k > 0, checkpoint_blocks=k if 0 < k < L else None)
        torch.manual_seed(0)
        model = build(config, run).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        runs.append((model, opt, loss_fn(run), []))

    def step(model, opt, fn):
        t0 = time.perf_counter()
        fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0
    for model, opt, fn, _ in runs:
        step(model, opt, fn)                 # warm-up: the optimizer state exists
    for _ in range(args.paired):
        for model, opt, fn, times in runs:
            times.append(step(model, opt, fn))
    print(f"\npaired: {args.paired} rounds, one step per k in turn (median; all steps)")
    for row, (_, _, _, times) in zip(rows, runs):
        row["paired_seconds"] = times
        print(f"k = {row['k']}: {statistics.median(times):.2f} s  {[round(t, 2) for t in times]}")


if __name__ == "__main__":
    sys.exit(main())
