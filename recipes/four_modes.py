"""The four-mode comparison (seq_cls, image_cls, sentiment_prompt, demo): one fresh model per mode, one table.

    rows = run_modes(cfg, model_name=..., load_float=..., load_4bit=..., train_set=..., collate=..., loss_fn=...,
                     evaluate=...)        # full, head, lora, qlora in a row -> out_dir/table.md + table.json

A recipe script defines how to load its model and data; `run_modes` trains one fresh model per mode on the same
data (with cfg.lr_grid: a learning-rate search on a held-out validation part) and writes the table.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from qlora.data.rows import split_validation
from qlora.errors import QLoRAError
from qlora.export import export_gguf, export_merged, summary
from qlora.export.gguf_verify import summary_lines
from qlora.levers.modes import MODES, build_for_mode
from qlora.lora.inject import count_parameters
from qlora.train.loop import TrainConfig, TrainingDiverged, train
from qlora.util.checks import check_ints, check_numbers, must_be_number
from qlora.util.staging import publish, staging_folder
from qlora_recipes.config import RecipeConfig
from qlora_recipes.results import write_table


@dataclass
class FourModesConfig(RecipeConfig):
    """The keys of every recipe (recipes/config.py) and the four-mode comparison's own below."""
    model: str = "minilm"
    """A model folder, a bundled name (minilm, smollm2) or a Hub id."""
    mode: str = "all"
    """full | head | lora | qlora | all (the four in a row)."""
    test_size: Optional[int] = None
    """None: the whole test split; an int: a fixed seeded subset."""
    out_dir: str = "runs/recipe"
    """table.md, table.json and one folder per mode (metrics, curves, adapter) go here."""
    lr: dict = field(default_factory=lambda: {"full": 5e-5, "head": 1e-3, "lora": 1e-3, "qlora": 1e-3})
    """Learning rate per mode (ignored for a mode that has an lr_grid entry)."""
    lr_grid: Optional[dict] = None
    """Learning-rate search: candidate rates per mode ({full: [2e-5, 5e-5, 1e-4], ...}). Each candidate
    trains on the training split minus a held-out validation part (val_fraction); the candidate with
    the best validation accuracy is the one reported (its test accuracy). Same budget for every mode:
    give each mode the same number of candidates. None: one run per mode at lr.<mode>."""
    val_fraction: float = 0.1
    """Share of the training split held out (seeded) for the learning-rate search."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop settings shared by every mode (train.lr is replaced by lr.<mode>, train.out_dir by out_dir/<mode>)."""

    modes = (*MODES, "all")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.lr, dict):
            raise QLoRAError(f"lr={self.lr!r}: give one learning rate per mode (lr.full=5e-5 lr.lora=1e-3 ...)")
        missing = [m for m in MODES if m not in self.lr]
        if missing:
            raise QLoRAError(f"lr has no value for mode {missing[0]!r}; give lr.{missing[0]}=...")
        for m, v in self.lr.items():
            if m not in MODES:
                raise QLoRAError(f"unknown config key 'lr.{m}'; allowed keys here: {', '.join(MODES)}")
            if need := must_be_number(v, above=0):
                raise QLoRAError(f"lr.{m}={v!r}: must be {need} (e.g. 1e-3)")
        if self.lr_grid is not None:
            if not isinstance(self.lr_grid, dict) or any(m not in MODES for m in self.lr_grid):
                raise QLoRAError(f"lr_grid={self.lr_grid!r}: a mapping from mode ({', '.join(MODES)}) "
                                 f"to a list of learning rates, e.g. lr_grid.lora=[1e-3,3e-3,1e-2]")
            for m, values in self.lr_grid.items():
                if not isinstance(values, list) or not values or any(must_be_number(v, above=0) for v in values):
                    raise QLoRAError(f"lr_grid.{m}={values!r}: must be a non-empty list of numbers > 0")
        check_numbers(self, ("val_fraction",), above=0, below=1, hint="e.g. 0.1")
        check_ints(self, ("test_size",), null="")

    def selected_modes(self) -> list[str]:
        return list(MODES) if self.mode == "all" else [self.mode]


def export_verified(model, out, *, dtype: str = "bfloat16", tokenizer=None):
    """qlora.export_merged into `out` (replacing an earlier export), its summary printed; the caller
    raises RecipeFailed when result.verification["passed"] is False."""
    result = export_merged(model, out, dtype=dtype, tokenizer=tokenizer, force=True)
    print(summary(result))
    return result


def export_gguf_verified(merged, out, dtype: str):
    """qlora.export_gguf of a merged folder into `out` (replacing an earlier one), its check printed."""
    result = export_gguf(merged, None, out, dtype=dtype, force=True, progress=False)
    print(f"exported {out} (GGUF {result.dtype}, {out.stat().st_size / 2**20:.1f} MiB)")
    for line in summary_lines(result.verification) + [f"  warning: {w}" for w in result.warnings]:
        print(line)
    return result


def run_modes(cfg: FourModesConfig, *, model_name: str, load_float, load_4bit, train_set, collate, loss_fn, evaluate,
              make_eval=None, head=None, tokenizer=None, after_mode=None) -> list[dict]:
    """Train one fresh model per mode and write out_dir/table.md + table.json. Returns the rows.

    `evaluate(model)` measures the test split. With cfg.lr_grid, `make_eval(examples)` must return the
    same kind of function for any list of examples (used on the validation split). `head` names what
    head-only trains (default: lm_head / classifier / score)."""
    if cfg.lr_grid and make_eval is None:
        raise QLoRAError("this recipe has no validation split, so lr_grid is not supported; set lr.<mode> instead")
    rows = []
    for mode in cfg.selected_modes():
        grid = (cfg.lr_grid or {}).get(mode)
        if grid:
            fit_set, val_set = split_validation(train_set, cfg.val_fraction, cfg.train.seed)
            runs = [_run_one(cfg, mode, lr, Path(cfg.out_dir) / mode / f"lr-{lr:g}", model_name, load_float,
                             load_4bit, fit_set, collate, loss_fn, evaluate, make_eval(val_set), head, after_mode)
                    for lr in grid]
            done = [r for r in runs if r.get("val_accuracy") is not None]
            if not done:
                raise QLoRAError(f"mode {mode!r}: every learning rate in lr_grid.{mode}={grid} diverged or "
                                 f"gave no validation accuracy; try smaller rates")
            best = max(done, key=lambda r: r["val_accuracy"])
            search = [{"lr": r["lr"], "val_accuracy": r["val_accuracy"], "accuracy": r["accuracy"],
                       **({"diverged": r["diverged"]} if "diverged" in r else {})} for r in runs]
            row = {**best, "search": search, "train_examples": len(fit_set), "val_examples": len(val_set)}
            adapter = Path(cfg.out_dir) / mode / f"lr-{best['lr']:g}" / "adapter"
            if adapter.is_dir():
                _replace_folder(adapter, Path(cfg.out_dir) / mode / "adapter")
            print(f"== {mode}: validation accuracy by lr " + ", ".join(
                f"{r['lr']:g}: " + (f"{100 * r['val_accuracy']:.2f}%" if r.get("val_accuracy") is not None
                                    else "diverged") for r in runs) + f" -> lr {best['lr']:g}")
        else:
            row = _run_one(cfg, mode, cfg.lr[mode], Path(cfg.out_dir) / mode, model_name, load_float, load_4bit,
                           train_set, collate, loss_fn, evaluate, None, head, after_mode)
            row["train_examples"] = len(train_set)
        rows.append(row)
        write_table(rows, cfg.out_dir)          # after every mode, so a long run leaves partial results
    text = write_table(rows, cfg.out_dir)
    print("\n" + text)
    return rows


def _replace_folder(source: Path, target: Path) -> None:
    """target := a copy of source, never leaving target missing or half-written (temp name, renames)."""
    tmp = staging_folder(target)          # .NAME.tmp-PID (stale ones of killed runs removed)
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    publish(tmp, target)


def _run_one(cfg, mode, lr, out_dir: Path, model_name, load_float, load_4bit, train_set, collate, loss_fn,
             evaluate, validate, head, after_mode) -> dict:
    """One fresh model, trained at `lr`; evaluated on the test split (and the validation split if given)."""
    torch.manual_seed(cfg.train.seed)
    lora = dataclasses.replace(cfg.lora, dtype=cfg.lora.dtype or (
        cfg.resolved_compute_dtype() if mode == "qlora" else None))
    model = build_for_mode(mode, load_float=load_float, load_4bit=load_4bit, lora=lora, head=head)
    trainable, total = count_parameters(model)
    print(f"\n== {model_name} · {mode} · lr {lr:g}: {trainable:,} trainable of {total:,} "
          f"({100 * trainable / total:.4f}%)")
    config = dataclasses.replace(cfg.train, lr=lr, out_dir=str(out_dir))
    try:
        result = train(model, train_set, collate, loss_fn, config, eval_fn=validate or evaluate)
    except TrainingDiverged as e:
        if validate is None:            # a single run: nothing else to report
            raise
        print(f"   lr {lr:g} diverged: {e}")  # in a search, a diverged rate is a result, not the end
        return {"model": model_name, "mode": mode, "lr": lr, "val_accuracy": None, "accuracy": None,
                "diverged": str(e)}
    metrics = result.evals[-1][1] if result.evals else {}
    row = {"model": model_name, "mode": mode, "trainable_params": trainable, "total_params": total,
           "peak_bytes": result.first_step_peak_bytes, "peak_method": result.peak_method,
           "step_seconds": result.mean_step_seconds, "steps": result.steps, "lr": lr}
    if validate is not None:
        row["val_accuracy"] = metrics.get("accuracy")
        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model)
        model.train(was_training)
    row.update(accuracy=metrics.get("accuracy"), metrics=metrics)
    # the adapter of lora/qlora modes: train() wrote it to out_dir/adapter (gathered under FSDP)
    if after_mode is not None:
        after_mode(mode, model)
    del model
    return row
