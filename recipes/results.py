"""The seed-style comparison table a recipe writes: table.md and table.json.

| Model | Mode | Learnable Params | %Trainable | Accuracy | Peak memory | Step time |
"""
from __future__ import annotations

import json
from pathlib import Path

from memprofile.units import human
from qlora.util.staging import atomic_write

COLUMNS = ("Model", "Mode", "Learnable Params", "%Trainable", "Accuracy", "Peak memory", "Step time")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        acc = f"{100 * r['accuracy']:.2f}%" if r.get("accuracy") is not None else "-"
        step = f"{r['step_seconds'] * 1000:.0f} ms" if r.get("step_seconds") else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['trainable_params']:,} | "
                     f"{100 * r['trainable_params'] / r['total_params']:.4f}% | {acc} | "
                     f"{human(r.get('peak_bytes'), digits=1)} | {step} |")
    return "\n".join(lines)


def write_table(rows: list[dict], out_dir, extra: dict | None = None) -> str:
    """Write table.md and table.json (temp name, then rename); returns the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(rows)
    for name, content in (("table.md", text + "\n"), ("table.json", json.dumps({"rows": rows, **(extra or {})},
                                                                                 indent=2))):
        atomic_write(out / name, lambda tmp, content=content: tmp.write_text(content))
    return text
