"""memprofile.report: the four files, their schema, and a real PNG."""
import csv
import json

import pytest
import torch

from memprofile.composition import AT_PEAK
from memprofile.measure import measure_step, measure_step_or_oom
from memprofile.report import make_row, print_table, write_report
from memprofile.tensors import CATEGORIES
from tests.memprofile.mp_models import configure, tiny_model, traced

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def rows():
    out = []
    for conf in ("lora", "qlora-ckpt"):
        model, config, make_batch = tiny_model("llama", layers=1)
        configure(model, conf, "llama")
        m = measure_step(model, make_batch(2, 16), timed_steps=1)
        out.append(make_row(conf, 2, 16, 8, m, traced("llama", conf, 2, 16, layers=1)))

    def oom(output, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    model, config, make_batch = tiny_model("llama", layers=1)
    configure(model, "full", "llama")
    m = measure_step_or_oom(model, make_batch(64, 16), loss_fn=oom)
    out.append(make_row("full", 64, 16, 8, m, traced("llama", "full", 64, 16, layers=1)))
    return out


def test_write_report_writes_four_files(rows, tmp_path, capsys):
    paths = write_report(rows, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "memory.png", "report.csv", "report.json", "report.md"]  # no temporaries left behind

    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == 3
    for row in data["rows"]:
        for key in ("config", "batch", "seq", "rank", "fits", "step_seconds", "trainable_params",
                    "total_params", "peak_method"):
            assert key in row
        assert set(row["bytes"]) == set(CATEGORIES) == set(row["predicted_bytes"])
        assert all(isinstance(v, int) for v in row["predicted_bytes"].values())
        if row["fits"]:
            assert all(isinstance(v, int) for v in row["bytes"].values())
            assert sum(row["at_peak"].values()) == row["bytes"]["peak"] and row["peak_phase"]   # adds up, exactly
        assert sum(row["predicted_at_peak"].values()) == row["predicted_bytes"]["peak"] and row["predicted_peak_phase"]
    assert data["rows"][0]["peak_method"] == "cpu-profiler-allocator-events"
    assert data["rows"][2]["fits"] is False and data["rows"][2]["bytes"]["peak"] is None
    env = data["environment"]
    for key in ("torch", "bitsandbytes", "transformers", "device", "cpu", "date"):
        assert key in env
    assert env["torch"] == torch.__version__

    md = paths["md"].read_text()
    assert "| qlora-ckpt | 2 | 16 |" in md and "out of memory" in md
    assert md.index("| largest temporary |") < md.index("| predicted peak |")     # the composition at the peak first
    assert "KiB" in md or "MiB" in md
    assert "memory.png" in md

    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and int(table[0]["measured_peak"]) == rows[0]["bytes"]["peak"]
    assert sum(int(table[0][f"at_peak_{c}"]) for c in AT_PEAK) == rows[0]["bytes"]["peak"]
    assert float(table[0]["peak_error_pct"]) == pytest.approx(
        (rows[0]["predicted_bytes"]["peak"] - rows[0]["bytes"]["peak"]) / rows[0]["bytes"]["peak"] * 100,
        abs=1e-3)

    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(paths["png"])
    assert img.ndim == 3 and img.shape[0] >= 400 and img.shape[1] >= 600

    print_table(rows)
    out = capsys.readouterr().out
    first, maxima = out.split("largest value of each category during the step:")
    assert first.startswith("| config | batch | seq |") and "| when | largest temporary |" in first
    assert first.strip().count("\n") == 1 + len(rows) and maxima.strip().count("\n") == 1 + len(rows)
