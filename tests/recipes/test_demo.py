"""The demo (recipes/demo.py, `qlora demo`): its real code path end to end on a tiny random BERT.

Fine-tuning table (four modes), memory profile of the six configurations, and the verified
merged export of the QLoRA adapter, all under out_dir; each checked against something the demo
does not compute itself (the files on disk, stock transformers loading the export).
"""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.util.configs import load_config

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    from qlora.bundled import minilm_path
    minilm = Path(minilm_path())
    folder = tmp_path_factory.mktemp("tiny-bert-demo")
    vocab = json.loads((minilm / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, folder / name)
    return folder


def test_demo_writes_table_profile_and_a_verified_export(tiny_bert, tmp_path, capsys):
    demo = vars(importlib.import_module("qlora_recipes.demo"))
    out = tmp_path / "demo"
    cfg = load_config(ROOT / "recipes" / "configs" / "demo.yaml",
                             [f"model={tiny_bert}", "train_size=32", "test_size=32", "max_length=16",
                              "train.batch_size=16", f"out_dir={out}", "train.progress=false",
                              "profile_batch=2", "profile_seq=8"], demo["DemoConfig"])
    result = demo["main"](cfg)
    printed = capsys.readouterr().out

    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["full", "head", "lora", "qlora"]
    profile = json.loads((out / "profile" / "report.json").read_text())
    configs = [r["config"] for r in profile["rows"]]
    assert sorted(configs) == sorted(["full", "head", "lora", "lora-ckpt", "qlora", "qlora-ckpt"])
    assert (out / "profile" / "memory.png").read_bytes()[:4] == b"\x89PNG"
    # the export: verified by the demo, and loadable by stock transformers with neither qlora nor
    # bitsandbytes imported, giving the logits the demo's own reference gave
    assert result["export"].verification["passed"]
    report = json.loads((out / "merged" / "export_report.json").read_text())
    assert report["verification"]["passed"] and report["dtype"] == "float32"
    code = ("import sys, torch, transformers; "
            f"m = transformers.AutoModelForSequenceClassification.from_pretrained({str(out / 'merged')!r}); "
            "assert 'bitsandbytes' not in sys.modules and 'qlora' not in sys.modules; "
            "print(m.config.num_labels, m.classifier.weight.dtype)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["2", "torch.float32"]
    # the one-screen summary names all of it
    for needle in ("| qlora |", "qlora-ckpt", "PASS", "outputs:"):
        assert needle in printed, needle
