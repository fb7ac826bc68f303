"""`qlora profile` and `qlora plan` end to end on a tiny Llama saved to a folder."""
import json

import pytest

from qlora.cli import main

CATEGORIES = ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer",
              "activations", "peak")


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
            assert isinstance(row["bytes"][key], int) and isinstance(row["predicted_bytes"][key], int)
        assert abs(row["predicted_bytes"]["peak"] - row["bytes"]["peak"]) <= 0.10 * row["bytes"]["peak"]
    by = {(r["config"], r["batch"]): r for r in report["rows"]}
    assert by[("qlora", 1)]["bytes"]["weights_quantized"] > 0 == by[("lora", 1)]["bytes"]["weights_quantized"]
    assert by[("full", 1)]["bytes"]["gradients"] == by[("full", 1)]["bytes"]["weights_trainable"]
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.csv").read_text().count("\n") >= 8
    assert "qlora-ckpt" in (out / "report.md").read_text()
    assert "qlora-ckpt" in capsys.readouterr().out


def test_profile_and_plan_reject_bad_input_cleanly(llama_folder, tmp_path, capsys):
    assert main(["profile", "--model", str(llama_folder), "--configs", "qlora,fast", "--out", str(tmp_path)]) == 2
    assert "fast" in capsys.readouterr().err
    assert main(["profile", "--model", str(llama_folder), "--batch", "0", "--out", str(tmp_path)]) == 2
    assert main(["profile", "--model", str(llama_folder), "--lora-dropout", "1.5", "--out", str(tmp_path)]) == 2
    assert "lora_dropout=1.5" in capsys.readouterr().err
    assert main(["plan", "--model", str(llama_folder), "--memory", "lots"]) == 2
    assert "24GiB" in capsys.readouterr().err


def test_plan_from_config_json_alone(llama_folder, capsys):
    rc = main(["plan", "--model", str(llama_folder / "config.json"), "--memory", "64MiB", "--seq", "16",
               "--rank", "4", "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    for conf in ("full", "head", "lora", "lora-ckpt", "qlora", "qlora-ckpt"):
        assert f"| {conf} |" in text


def test_sweep_measures_and_predicts_what_lora_dropout_costs(llama_folder):
    """Dropout on the adapters' input makes each adapted layer save a dropped copy (+ mask): the
    sweep passes it to both the measurement and the estimate, and they agree to the byte."""
    from qlora.profile import sweep
    rows = {p: sweep(str(llama_folder), configurations=("lora", "lora-ckpt"), batches=(2,), seqs=(16,), ranks=(4,),
                     dtype="float32", lora_dropout=p, progress=False) for p in (0.0, 0.1)}
    for p, found in rows.items():
        for row in found:
            assert row["bytes"]["activations"] == row["predicted_bytes"]["activations"], (p, row["config"])
    act = {p: found[0]["bytes"]["activations"] for p, found in rows.items()}
    assert act[0.1] > act[0.0]
