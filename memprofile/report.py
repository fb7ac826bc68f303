"""Write a memory sweep's rows as report.json, report.md, report.csv and memory.png.

    from memprofile.report import make_row, write_report, print_table
    rows = [make_row("qlora-ckpt", batch=4, seq=512, rank=8, measured=step_memory, predicted=estimate)]
    write_report(rows, "out/")        # -> {"json": Path, "md": Path, "csv": Path, "png": Path}
    print_table(rows)                 # the markdown table, to the terminal

A row (every byte count an int):
    {"config": "qlora-ckpt", "batch": 4, "seq": 512, "rank": 8,
     "at_peak": {category: bytes live at the peak's moment}, "peak_phase": "backward of block 5 (...): mm",
     "temporary_parts": {kind: bytes}, "predicted_at_peak": {...}, "predicted_peak_phase": "...",
     "bytes": {category: measured maximum}, "predicted_bytes": {category: predicted maximum},
     "fits": true, "step_seconds": 0.8, "trainable_params": ..., "total_params": ...,
     "peak_method": "cuda.max_memory_allocated" | "cpu-profiler-allocator-events"}
`at_peak` has the categories of memprofile.composition.AT_PEAK and adds up to the peak; `bytes` has those of
memprofile.tensors.CATEGORIES, each its largest value in the step (taken at different moments, so they need
not add up to anything). A row that ran out of memory has "fits": false and None for what was not measured.
report.json is {"rows": [...], "environment": {...}}. Every file is written to a temporary name in the folder,
then renamed. report.md and memory.png show the composition at the peak first, the maxima second.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from memprofile.composition import AT_PEAK
from memprofile.tensors import CATEGORIES
from memprofile.units import human  # also read from here by the recipes (memprofile.units is its home)

STACK = CATEGORIES[:-1]  # the maxima: every category but the peak
_COLORS = dict(zip(AT_PEAK, ["#4c72b0", "#8c8c8c", "#55a868", "#c44e52", "#8172b2", "#dd8452", "#937860",
                             "#e5ae38"]))


# ------------------------------------------------------------------------------ rows
def _bytes_of(x) -> dict | None:
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: (None if x.get(k) is None else int(x[k])) for k in CATEGORIES}
    return {k: (None if v is None else int(v)) for k, v in x.bytes().items()}


def make_row(config: str, batch: int, seq: int, rank: int, measured=None, predicted=None) -> dict:
    """One report row from a memprofile.measure.StepMemory (or None: not measured) and a
    predicted StepMemory (memprofile.trace; or a {category: bytes} dict, or None)."""
    m = _bytes_of(measured)
    p = _bytes_of(predicted)
    at_peak = lambda x: {k: int(v) for k, v in getattr(x, "at_peak", {}).items()} or None  # noqa: E731
    return {
        "config": config, "batch": int(batch), "seq": int(seq), "rank": int(rank),
        "at_peak": at_peak(measured), "peak_phase": getattr(measured, "peak_phase", "") or None,
        "temporary_parts": getattr(measured, "temporary_parts", None) or None,
        "predicted_at_peak": at_peak(predicted), "predicted_peak_phase": getattr(predicted, "peak_phase", "") or None,
        "predicted_temporary_parts": getattr(predicted, "temporary_parts", None) or None,
        "bytes": m if m is not None else {k: None for k in CATEGORIES},
        "predicted_bytes": p if p is not None else {k: None for k in CATEGORIES},
        "fits": bool(getattr(measured, "fits", True)) if measured is not None else None,
        "step_seconds": getattr(measured, "step_seconds", None),
        "trainable_params": getattr(measured, "trainable_params", None)
        or getattr(predicted, "trainable_params", None),
        "total_params": getattr(measured, "total_params", None) or getattr(predicted, "total_params", None),
        "peak_method": getattr(measured, "peak_method", None) or ("estimate" if measured is None else ""),
    }


def environment() -> dict:
    """Versions and hardware, for report.json."""
    env = {"python": platform.python_version(), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "platform": platform.platform()}
    for mod in ("torch", "bitsandbytes", "transformers", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            env[mod] = None
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    env["cpu"] = cpu
    try:
        env["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        env["cpu_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        env["device"], env["gpu"] = "cpu", None
    return env


def peak_error(row: dict) -> float | None:
    """(predicted - measured) / measured peak, in percent."""
    m, p = row["bytes"].get("peak"), row["predicted_bytes"].get("peak")
    return None if not m or p is None else (p - m) / m * 100.0


def composition(row: dict) -> tuple[dict | None, str | None, dict | None, bool]:
    """(bytes by category at the peak, phase, temporary parts, measured?): measured, else predicted."""
    if row.get("at_peak"):
        return row["at_peak"], row.get("peak_phase"), row.get("temporary_parts"), True
    return row.get("predicted_at_peak"), row.get("predicted_peak_phase"), row.get("predicted_temporary_parts"), False


# ------------------------------------------------------------------------------ text
def at_peak_table(rows: list[dict]) -> str:
    """What is live at the moment of the peak, by category (they add up to the peak), when it happens and the
    largest part of `temporary`; measured (predicted where a row was not measured)."""
    head = ["config", "batch", "seq"] + [f"{c} (% peak)" for c in AT_PEAK] + ["peak", "when", "largest temporary"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        at, phase, parts, _ = composition(r)
        cells = [r["config"], str(r["batch"]), str(r["seq"])]
        total = sum(at.values()) if at else None
        for c in AT_PEAK:
            v = at.get(c) if at else None
            cells.append(human(v) + (f" ({v / total * 100:.0f}%)" if v is not None and total else ""))
        largest = max(parts.items(), key=lambda kv: kv[1]) if parts else None
        cells += [human(total) if r.get("fits") is not False else "out of memory", phase or "-",
                  f"{largest[0]}: {human(largest[1])}" if largest else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict]) -> str:
    """Each category's largest value in the step with its share of the measured peak; predicted vs measured
    peak. (These maxima come at different moments: at_peak_table is the composition of the peak itself.)"""
    head = (["config", "batch", "seq"] + [f"{c} (% peak)" for c in STACK]
            + ["peak", "predicted peak", "error"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m, p = r["bytes"], r["predicted_bytes"]
        src = m if m.get("peak") else p
        peak = src.get("peak")
        cells = [r["config"], str(r["batch"]), str(r["seq"])]
        for c in STACK:
            v = src.get(c)
            pct = f" ({v / peak * 100:.0f}%)" if v is not None and peak else ""
            cells.append(human(v) + pct)
        if r.get("fits") is False:
            cells.append("out of memory")
        else:
            cells.append(human(m.get("peak")))
        cells.append(human(p.get("peak")))
        err = peak_error(r)
        cells.append("-" if err is None else f"{err:+.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], file=None) -> None:
    print(at_peak_table(rows) + "\nlargest value of each category during the step:\n\n" + markdown_table(rows),
          file=file or sys.stdout, end="")


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["config", "batch", "seq", "rank", "fits"]
               + [f"at_peak_{c}" for c in AT_PEAK] + ["peak_phase"]
               + [f"predicted_at_peak_{c}" for c in AT_PEAK] + ["predicted_peak_phase"]
               + [f"measured_{c}" for c in CATEGORIES] + [f"predicted_{c}" for c in CATEGORIES]
               + ["peak_error_pct", "step_seconds", "trainable_params", "total_params", "peak_method"])
    for r in rows:
        err = peak_error(r)
        at, pat = r.get("at_peak") or {}, r.get("predicted_at_peak") or {}
        w.writerow([r["config"], r["batch"], r["seq"], r["rank"], r.get("fits")]
                   + [at.get(c) for c in AT_PEAK] + [r.get("peak_phase")]
                   + [pat.get(c) for c in AT_PEAK] + [r.get("predicted_peak_phase")]
                   + [r["bytes"].get(c) for c in CATEGORIES]
                   + [r["predicted_bytes"].get(c) for c in CATEGORIES]
                   + [None if err is None else round(err, 3), r.get("step_seconds"),
                      r.get("trainable_params"), r.get("total_params"), r.get("peak_method")])
    return buf.getvalue()


# ------------------------------------------------------------------------------ files
def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)          # mkstemp makes it 0600: give the file the umask's permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plot(rows: list[dict], path) -> Path:
    """memory.png: one stacked bar per row, the composition at the peak (measured, or predicted when the row
    was not measured, hatched), which reaches the peak; a black line at the measured peak and a red dashed one
    at the predicted; beside each bar, a marker per category at its largest value in the step."""
    import matplotlib  # lazy: matplotlib costs ~0.25 s, only plots need it

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg"), which must come first

    path = Path(path)
    n = max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * n + 2), 5.2), dpi=110)
    gib = float(2**30)
    scale, unit = (gib, "GiB") if max((r["predicted_bytes"].get("peak") or r["bytes"].get("peak") or 0)
                                      for r in rows or [{"bytes": {}, "predicted_bytes": {}}]) >= gib / 4 \
        else (2.0**20, "MiB")
    labels, marked = [], False
    for i, r in enumerate(rows):
        m, p = r["bytes"], r["predicted_bytes"]
        at, _, _, measured = composition(r)
        bottom = 0.0
        for c in AT_PEAK:
            v = ((at or {}).get(c) or 0) / scale
            ax.bar(i, v, 0.6, bottom=bottom, color=_COLORS[c], label=f"{c} at the peak" if i == 0 else None,
                   hatch=None if measured else "//", edgecolor="white", linewidth=0.5)
            bottom += v
        maxima = m if m.get("peak") else p
        for c in (c for c in STACK if maxima.get(c)):
            ax.plot(i + 0.36, maxima[c] / scale, marker="<", color=_COLORS[c], markersize=6,
                    markeredgecolor="black", markeredgewidth=0.4,
                    label=None if marked else "largest value in the step (markers)")
            marked = True
        if m.get("peak"):
            ax.hlines(m["peak"] / scale, i - 0.36, i + 0.36, colors="black", linewidth=2.2,
                      label="measured peak" if i == 0 else None)
        if p.get("peak"):
            ax.hlines(p["peak"] / scale, i + 0.05, i + 0.45, colors="#d62728", linewidth=2.2,
                      linestyles="dashed", label="predicted peak" if i == 0 else None)
        tag = "" if r.get("fits") is not False else "\n(OOM)"
        labels.append(f"{r['config']}\nb={r['batch']} s={r['seq']}{tag}")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title("Where the memory of one training step goes")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write(path, buf.getvalue())
    return path


def write_report(rows: list[dict], out_dir, env: dict | None = None) -> dict[str, Path]:
    """Write report.json, report.md, report.csv and memory.png into out_dir (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = env or environment()
    paths = {"json": out / "report.json", "md": out / "report.md", "csv": out / "report.csv",
             "png": out / "memory.png"}
    _atomic_write(paths["json"], json.dumps({"rows": rows, "environment": env}, indent=2).encode())
    md = ["# Memory report", "",
          f"torch {env.get('torch')}, bitsandbytes {env.get('bitsandbytes')}, transformers "
          f"{env.get('transformers')}; device {env.get('device')} ({env.get('gpu') or env.get('cpu')}); "
          f"{env.get('date')}", "",
          "What is live at the moment of the peak, by category: they add up to the peak (measured; predicted "
          "where a row was not measured). `temporary` is what is live then and in no other category (its "
          "largest part named: dequantized 4-bit weights, recomputed activations, gradients of activations, "
          "logits, kernel scratch).", "", at_peak_table(rows), "",
          "The largest value of each category during the step, with its share of the measured peak: these "
          "come at different moments, so they need not add up to the peak.", "", markdown_table(rows), "",
          "![memory](memory.png)", ""]
    _atomic_write(paths["md"], "\n".join(md).encode())
    _atomic_write(paths["csv"], _csv_text(rows).encode())
    plot(rows, paths["png"])
    return paths
