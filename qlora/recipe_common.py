"""What every recipe shares: its base config and the loop over modes that fills the table.

A recipe script defines how to load its model and data; `run_modes` trains one fresh model per
mode (full, head, lora, qlora) on the same data and writes the seed-style table.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from qlora.adapters_io import save_adapter
from qlora.config import LoraConfig, parse_dtype
from qlora.errors import QLoRAError
from qlora.inject import count_parameters
from qlora.modes import MODES, build_for_mode
from qlora.results import write_table
from qlora.train import TrainConfig, train


@dataclass
class RecipeBase:
    model: str = "minilm"
    """A model folder, a bundled name (minilm, smollm2) or a Hub id."""
    mode: str = "all"
    """full | head | lora | qlora | all (the four in a row)."""
    train_size: Optional[int] = None
    """None: the whole training split; an int: a fixed seeded subset (quick runs, tests)."""
    test_size: Optional[int] = None
    """None: the whole test split; an int: a fixed seeded subset."""
    compute_dtype: str = "auto"
    """4-bit compute dtype: auto = bfloat16 on CUDA, float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    out_dir: str = "runs/recipe"
    """table.md, table.json and one folder per mode (metrics, curves, adapter) go here."""
    lr: dict = field(default_factory=lambda: {"full": 5e-5, "head": 1e-3, "lora": 1e-3, "qlora": 1e-3})
    """Learning rate per mode."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(target_modules="all-linear"))
    """Adapter settings for the lora and qlora modes."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop settings shared by every mode (train.lr is replaced by lr.<mode>)."""

    def __post_init__(self):
        if self.mode not in (*MODES, "all"):
            raise QLoRAError(f"mode={self.mode!r}; allowed: {', '.join(MODES)}, all")
        if self.compute_dtype != "auto":
            parse_dtype(self.compute_dtype)
        if not isinstance(self.lr, dict):
            raise QLoRAError(f"lr={self.lr!r}: give one learning rate per mode (lr.full=5e-5 lr.lora=1e-3 ...)")
        missing = [m for m in MODES if m not in self.lr]
        if missing:
            raise QLoRAError(f"lr has no value for mode {missing[0]!r}; give lr.{missing[0]}=...")
        for m, v in self.lr.items():
            if m not in MODES:
                raise QLoRAError(f"unknown config key 'lr.{m}'; allowed keys here: {', '.join(MODES)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise QLoRAError(f"lr.{m}={v!r}: must be a number > 0 (e.g. 1e-3)")
        for name in ("train_size", "test_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise QLoRAError(f"{name}={v!r}: must be null or an integer >= 1")

    def modes(self) -> list[str]:
        return list(MODES) if self.mode == "all" else [self.mode]

    def resolved_compute_dtype(self) -> torch.dtype:
        if self.compute_dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return parse_dtype(self.compute_dtype)

    def subset(self, items: list, size: Optional[int], seed: int = 0) -> list:
        if size is None or size >= len(items):
            return items
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:size]
        return [items[i] for i in sorted(order.tolist())]


def run_modes(cfg: RecipeBase, *, model_name: str, load_float, load_4bit, train_set, collate, loss_fn, evaluate,
              tokenizer=None, after_mode=None) -> list[dict]:
    """Train one fresh model per mode and write out_dir/table.md + table.json. Returns the rows."""
    rows = []
    for mode in cfg.modes():
        torch.manual_seed(cfg.train.seed)
        lora = dataclasses.replace(cfg.lora, dtype=cfg.lora.dtype or (
            cfg.resolved_compute_dtype() if mode == "qlora" else None))
        model = build_for_mode(mode, load_float=load_float, load_4bit=load_4bit, lora=lora)
        trainable, total = count_parameters(model)
        print(f"\n== {model_name} · {mode}: {trainable:,} trainable of {total:,} ({100 * trainable / total:.4f}%)")
        config = dataclasses.replace(cfg.train, lr=cfg.lr[mode], out_dir=str(Path(cfg.out_dir) / mode))
        result = train(model, train_set, collate, loss_fn, config, eval_fn=evaluate)
        metrics = result.evals[-1][1] if result.evals else {}
        rows.append({"model": model_name, "mode": mode, "trainable_params": trainable, "total_params": total,
                     "accuracy": metrics.get("accuracy"), "metrics": metrics,
                     "peak_bytes": result.first_step_peak_bytes, "peak_method": result.peak_method,
                     "step_seconds": result.mean_step_seconds, "steps": result.steps, "lr": cfg.lr[mode]})
        if mode in ("lora", "qlora"):
            save_adapter(model, Path(cfg.out_dir) / mode / "adapter")
        if after_mode is not None:
            after_mode(mode, model)
        del model
    text = write_table(rows, cfg.out_dir)
    print("\n" + text)
    return rows
