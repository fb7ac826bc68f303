"""The demo: fine-tune, profile and export real MiniLM on real Rotten Tomatoes, on a CPU, offline.

    ./run demo                      # = qlora demo; outputs in runs/demo/
    qlora demo train_size=2000      # any key of recipes/configs/demo.yaml can be overridden

1. The sequence-classification recipe on a fixed subset: full / head / LoRA / QLoRA table.
2. The memory profile of the six configurations: report.{json,md,csv} + memory.png.
3. The QLoRA adapter merged into a plain fp32 model folder, verified against the unmerged model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from memprofile.report import print_table
from qlora.bundled import resolve_model
from qlora.export import export_adapter, summary
from qlora.plan.sweep import sweep
from qlora_recipes import seq_cls
from qlora_recipes.results import markdown_table
from qlora_recipes.seq_cls import SeqClsConfig


@dataclass
class DemoConfig(SeqClsConfig):
    profile_batch: int = 16
    """Batch size of the memory profile."""
    profile_seq: int = 64
    """Sequence length of the memory profile."""


def main(cfg: DemoConfig) -> dict:
    out = Path(cfg.out_dir)
    t0 = time.perf_counter()
    rows = seq_cls.main(cfg)
    t_train = time.perf_counter() - t0

    profile_rows = sweep(cfg.model, task="seq-cls", batches=(cfg.profile_batch,), seqs=(cfg.profile_seq,),
                         ranks=(cfg.lora.r,), dtype="float32", out=out / "profile",
                         target_modules=cfg.lora.target_modules, lora_dropout=cfg.lora.lora_dropout)
    t_profile = time.perf_counter() - t0 - t_train

    export = None
    if (out / "qlora" / "adapter").is_dir():
        export = export_adapter(resolve_model(cfg.model), out / "qlora" / "adapter", out / "merged",
                                dtype="float32", force=True)
    t_total = time.perf_counter() - t0

    print("\n" + "=" * 78)
    print(f"qlora demo: {cfg.model} on {cfg.dataset}, {cfg.train_size or 'all'} train / {cfg.test_size or 'all'} "
          f"test snippets, {cfg.train.epochs} epoch(s)\n")
    print(markdown_table(rows))
    print(f"\nmemory of one training step (batch {cfg.profile_batch} x {cfg.profile_seq} tokens, fp32):\n")
    print_table(profile_rows)
    if export is not None:
        print("\n" + summary(export))
    print(f"\ntime: fine-tuning {t_train:.0f} s, profile {t_profile:.0f} s, total {t_total:.0f} s")
    print(f"outputs: {out}/table.md, {out}/profile/memory.png, {out}/merged/ (plain transformers folder)")
    return {"rows": rows, "profile": profile_rows, "export": export}

