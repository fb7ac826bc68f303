"""qlora profile: measure and predict the memory of each training configuration of a model."""
from __future__ import annotations

import dataclasses

from qlora.cli import args
from qlora.cli.args import ints, run_settings


def add_parser(sub) -> None:
    prof = sub.add_parser("profile", help="measure and predict memory of each training configuration")
    prof.add_argument("--model", required=True, type=args.model, help="model folder, or a bundled name: minilm, smollm2")
    prof.add_argument("--task", default="causal-lm", help="causal-lm | seq-cls | image-cls (default causal-lm)")
    prof.add_argument("--configs", default="full,head,lora,lora-ckpt,qlora,qlora-ckpt",
                      help="comma-separated training configurations (default: all six)")
    prof.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    prof.add_argument("--seq", default="128,512", help="comma-separated sequence lengths (image sizes for image-cls)")
    prof.add_argument("--rank", default="16", help="comma-separated LoRA ranks (default 16)")
    args.run_options(prof)
    prof.add_argument("--out", default="runs/profile", help="report folder (default runs/profile)")
    prof.set_defaults(func=run)



def run(args) -> int:
    import torch  # lazy: qlora --help imports no torch

    from qlora.plan.sweep import sweep  # lazy: qlora --help imports no torch
    settings = run_settings(args, device="cuda" if torch.cuda.is_available() else "cpu")
    ranks = ints(args.rank, "rank")
    settings = dataclasses.replace(settings, lora_r=ranks[0])     # what it assumed says the rank it ran
    rows = sweep(args.model, task=args.task, configurations=[c.strip() for c in args.configs.split(",")],
                 batches=ints(args.batch, "batch"), seqs=ints(args.seq, "seq"), ranks=ranks,
                 settings=settings, out=args.out)
    from memprofile.report import print_table  # lazy: qlora --help imports no torch
    per_row = "mode, checkpointing and rank per row" if len(ranks) > 1 else "mode and checkpointing per row"
    print(f"assumed: {settings.describe()} ({per_row})")
    print_table(rows)
    print(f"\nwrote {args.out}/report.json, report.md, report.csv, memory.png")
    return 0
