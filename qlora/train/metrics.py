"""What a run records: metrics.jsonl (one JSON object per line), curves.png, and the first step's peak
memory (memprofile's allocator account on CPU, torch.cuda.max_memory_allocated on CUDA) with what is live at
that peak, by category."""
from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor

from memprofile.peak import CpuPeakTracker
from memprofile.tensors import nested_tensors, unique_storage_bytes, weight_bytes
from memprofile.tracker import StorageTracker


class FirstStepPeak:
    """The first optimizer step's peak (CPU: the allocator's events over the bytes live before it; CUDA:
    max_memory_allocated) and, given the model and its first batch, what is live at that peak by category
    (memprofile.composition: `at_peak`, `peak_phase`, `temporary_parts`, adding up to the peak). `others`: the
    bytes live before the step that are neither the model's weights nor the batch (a data set held as tensors,
    the caller's own; 0 without the model), which a plan of the run does not hold."""

    def __init__(self, device, model=None, batch=None):
        self.device = torch.device(device)
        self.at_peak, self.peak_phase, self.temporary_parts, self.others = {}, "", {}, 0
        # garbage first (tensors in reference cycles nothing reaches, from loading or the caller's earlier work): it
        # counted as live before the step, and a collection inside the step would free it (6 MiB of it made a
        # GRPO first step 18 % above its plan). Once per run: ~0.1-1 s in a process that imported transformers.
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda.max_memory_allocated"
        else:
            self.baseline = live_bytes_estimate()
            self.tracker = CpuPeakTracker()
            self.tracker.start()
            self.method = "cpu-profiler-allocator-events (+ bytes of parameters and buffers before the step)"
        self.account = None
        if model is not None:
            seen: set = set()
            weights = weight_bytes(model, seen)
            inputs = unique_storage_bytes(nested_tensors(batch), seen)
            before = (torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else self.baseline)
            self.others = max(0, before - sum(weights.values()) - inputs)
            self.account = StorageTracker(real=True, device=self.device)
            self.account.account(model, [p for p in model.parameters() if p.requires_grad], {**weights, "inputs": inputs})
            self.saved = self.account.saved_tensors()
            self.saved.__enter__()
            self.account.start()

    def abort(self) -> None:
        """Stop without a result (the step raised): every hook and mode this started is removed. Idempotent."""
        if self.device.type != "cuda" and self.tracker is not None:
            self.tracker.stop()
            self.tracker = None
        self._release()

    def _release(self) -> None:
        if self.account is not None and not getattr(self, "released", False):
            self.released = True
            self.account.stop()
            self.saved.__exit__(None, None, None)
            self.account.release()

    def stop(self) -> tuple[int, str]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.tracker.stop()
            peak = self.baseline + self.tracker.max_increase()
        if self.account is not None:
            self._release()
            self.at_peak, self.temporary_parts, self.peak_phase = self.account.composition.at_peak(
                peak, "other tensors live before the step, kernel scratch")
        return peak, self.method


def live_bytes_estimate() -> int:
    """Bytes of all live CPU tensor storages (each once): the baseline under the step's peak."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads obj.__class__, which on torch.distributed's deprecated
        # `reduce_op` object raises a FutureWarning
        if not issubclass(type(obj), torch.Tensor) or issubclass(type(obj), FakeTensor):
            continue       # fake tensors (a memory plan's, still in memory) have no real storage
        try:   # tensor subclasses and storage-less tensors (left by other code) raise on these
            if obj.is_meta or obj.device.type != "cpu":
                continue
            st = obj.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
        if ptr not in seen:
            seen.add(ptr)
            total += nbytes
    return total


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


BOOKKEEPING = ("step", "epoch", "loss", "loss_steps", "lr", "samples_per_s", "first_step_peak_bytes",
               "first_step_seconds", "peak_method")


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """From metrics.jsonl: first, the train loss (mean per logging interval) with eval losses as points and the
    learning rate on a second axis; then one panel per group of other metrics, a group being the name up to its
    "/" (TRL's rewards/chosen, rewards/margins, ... share a panel): train values as lines, eval values as points;
    eval metrics without a group (accuracy, perplexity) share an "evaluation" panel."""
    import matplotlib  # lazy: matplotlib costs ~0.25 s, only plots need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg"), which must come first
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    eval_losses, panels = {}, {}        # panels: group -> {(name, is_eval): [(step, value)]}
    for r in rows:
        for k, v in r.items():
            if k in BOOKKEEPING or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            is_eval, name = k.startswith("eval_"), k.removeprefix("eval_")
            if is_eval and name == "loss":
                eval_losses.setdefault(k, []).append((r["step"], v))
                continue
            group = name.split("/")[0] if "/" in name else (name if not is_eval else "evaluation")
            panels.setdefault(group, {}).setdefault((name, is_eval), []).append((r["step"], v))
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6.5 + 4.5 * len(panels), 3.8), squeeze=False)
    ax = axes[0][0]
    if loss:
        every = max(1, round(sum(r.get("loss_steps", 1) for r in rows if "loss" in r) / len(loss)))
        ax.plot(*zip(*loss), color="C0", lw=1.6, marker="." if len(loss) < 40 else None,
                label=f"train loss (mean of {every} step{'s' if every > 1 else ''})")
    for i, (k, pts) in enumerate(eval_losses.items()):
        ax.plot(*zip(*pts), "o--", color=f"C{i + 1}", ms=6, label=k.replace("_", " "))
    ax.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax_lr = ax.twinx()
        ax_lr.plot(*zip(*lr), color="0.55", lw=1, ls=":", label="learning rate")
        ax_lr.set_ylabel("learning rate", color="0.4")
        ax_lr.tick_params(axis="y", colors="0.4")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax_lr.set_ylim(bottom=0)
        h, l = ax_lr.get_legend_handles_labels()
        handles, labels = handles + h, labels + l
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper right")
    for ax, (group, series) in zip(axes[0][1:], panels.items()):
        names = sorted({name for name, _ in series})
        for (name, is_eval), pts in series.items():
            color = f"C{(names.index(name) + 3) % 10}"
            if is_eval:
                ax.plot(*zip(*pts), "o--", color=color, ms=5, label=f"eval {name}")
                step, value = pts[-1]
                ax.annotate(f"{value:.4g}", (step, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
            else:
                ax.plot(*zip(*pts), "-", color=color, lw=1.2, alpha=0.8, label=f"train {name}")
        ax.set(xlabel="optimizer step", title=group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
