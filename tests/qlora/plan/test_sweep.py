"""`qlora profile` and `qlora plan` end to end on a tiny Llama saved to a folder."""
import json

import pytest

from qlora.cli import main

CATEGORIES = ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer",
              "activations", "peak")
PEAK_BOUND, CATEGORY_BOUND = 0.05, 0.02   # docs/memory.md, "qlora plan"


@pytest.fixture
def llama_folder(tmp_path, tiny_llama):
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    return folder


def test_profile_writes_all_four_reports(llama_folder, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["profile", "--model", str(llama_folder), "--task", "causal-lm", "--configs",
               "full,lora,qlora,qlora-ckpt", "--batch", "1,2", "--seq", "8", "--rank", "4",
               "--dtype", "float32", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["rows"]) == 4 * 2
    for row in report["rows"]:
        assert row["fits"] is True
        for key in CATEGORIES:
            m, p = row["bytes"][key], row["predicted_bytes"][key]
            assert isinstance(m, int) and isinstance(p, int)
            assert abs(p - m) <= (PEAK_BOUND if key == "peak" else CATEGORY_BOUND) * m, (row["config"], key, m, p)
    by = {(r["config"], r["batch"]): r for r in report["rows"]}
    assert by[("qlora", 1)]["bytes"]["weights_quantized"] > 0 == by[("lora", 1)]["bytes"]["weights_quantized"]
    assert by[("full", 1)]["bytes"]["gradients"] == by[("full", 1)]["bytes"]["weights_trainable"]
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.csv").read_text().count("\n") >= 8
    assert "qlora-ckpt" in (out / "report.md").read_text()
    text = capsys.readouterr().out
    assert "qlora-ckpt" in text and "chunked loss (256 tokens)" in text   # says what it assumed


def test_profile_still_writes_measured_rows_when_the_trace_fails(llama_folder, tmp_path, monkeypatch, capsys):
    from memprofile.trace import TraceError

    def untraceable(*args, **kwargs):
        raise TraceError("aten.nonzero.default depends on tensor values")
    monkeypatch.setattr("qlora.plan.planner.trace_built", untraceable)
    out = tmp_path / "report"
    assert main(["profile", "--model", str(llama_folder), "--configs", "lora", "--batch", "1", "--seq", "8",
                 "--dtype", "float32", "--out", str(out)]) == 0
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["bytes"]["peak"] > 0 and row["predicted_bytes"]["peak"] is None
    assert "llama" in row["predict_error"] and "nonzero" in row["predict_error"]
    err = capsys.readouterr().err
    assert "not predicted" in err and "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    (["--memory", "lots"], "24GiB"), (["--memory", "0GiB"], "--memory"), (["--seq", "0"], "--seq"),
    (["--rank", "-4"], "--rank"), (["--effective-batch", "0"], "--effective-batch"),
    (["--loss-chunk-size", "0"], "--loss-chunk-size"), (["--loss", "fast"], "loss="),
    (["--optimizer", "sgd"], "optimizer="), (["--lora-dropout", "1.5"], "lora_dropout=1.5"),
    (["--world-size", "0"], "--world-size")])
def test_plan_rejects_bad_numbers_with_one_line(llama_folder, capsys, args, needle):
    base = ["plan", "--model", str(llama_folder / "config.json"), "--memory", "64MiB"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_profile_rejects_bad_input_cleanly(llama_folder, tmp_path, capsys):
    assert main(["profile", "--model", str(llama_folder), "--configs", "qlora,fast", "--out", str(tmp_path)]) == 2
    assert "fast" in capsys.readouterr().err
    assert main(["profile", "--model", str(llama_folder), "--batch", "0", "--out", str(tmp_path)]) == 2
    assert main(["profile", "--model", str(llama_folder), "--lora-dropout", "1.5", "--out", str(tmp_path)]) == 2
    assert "lora_dropout=1.5" in capsys.readouterr().err


def test_plan_from_config_json_alone(llama_folder, capsys):
    rc = main(["plan", "--model", str(llama_folder / "config.json"), "--memory", "64MiB", "--seq", "16",
               "--rank", "4", "--device", "cpu", "--effective-batch", "8", "--world-size", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    for conf in ("full", "lora", "lora-ckpt", "qlora", "qlora-ckpt"):
        assert f"| {conf} |" in text
    assert "assumed" in text and "chunked loss (256 tokens)" in text and "float32 compute" in text
    assert "recommendation for qlora (effective batch 8): train.batch_size=" in text
    assert "FSDP over 2 ranks (a formula" in text
    assert "per long-context lever" not in text


def test_plan_prints_the_long_context_levers(llama_folder, capsys):
    assert main(["plan", "--model", str(llama_folder / "config.json"), "--memory", "64MiB", "--seq", "16",
                 "--device", "cpu", "--configs", "qlora-ckpt", "--levers"]) == 0
    text = capsys.readouterr().out
    assert "per long-context lever" in text and "qlora train's defaults use none" in text
    for lever in ("defaults", "offload", "tiled MLP", "offload + tiled MLP"):
        assert f"| {lever} |" in text


def test_plan_of_an_untraceable_model_is_one_line(llama_folder, monkeypatch, capsys):
    from memprofile.trace import TraceError

    def untraceable(*args, **kwargs):
        raise TraceError("aten.nonzero.default depends on tensor values")
    monkeypatch.setattr("qlora.plan.planner.trace_built", untraceable)
    assert main(["plan", "--model", str(llama_folder / "config.json"), "--memory", "64MiB", "--seq", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llama" in err and "nonzero" in err


def test_sweep_measures_and_predicts_what_lora_dropout_costs(llama_folder):
    """Dropout on the adapters' input makes each adapted layer save a dropped copy (+ mask): the
    sweep passes it to both the measurement and the estimate, and they agree to the byte."""
    from qlora.plan.sweep import sweep
    rows = {p: sweep(str(llama_folder), configurations=("lora", "lora-ckpt"), batches=(2,), seqs=(16,), ranks=(4,),
                     dtype="float32", lora_dropout=p, progress=False) for p in (0.0, 0.1)}
    for p, found in rows.items():
        for row in found:
            assert row["bytes"]["activations"] == row["predicted_bytes"]["activations"], (p, row["config"])
    act = {p: found[0]["bytes"]["activations"] for p, found in rows.items()}
    assert act[0.1] > act[0.0]
