"""The sequence-classification recipe (recipes/seq_cls.py) and the recipe config loader.

End to end: `main(cfg)` through the real code path (YAML config + overrides, tokenizer, Rotten
Tomatoes subset, four fresh models, train(), the table), with a tiny random BERT (hidden 32,
2 layers) saved beside the real MiniLM tokenizer so that four modes fit in seconds on a CPU.
The trainable-parameter counts in the table are checked against numbers worked out from the
model config, not from the model.
"""
from __future__ import annotations

import importlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from qlora import QLoRAError
from qlora.util.configs import load_config

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "seq_cls.yaml"
MODES = ["full", "head", "lora", "qlora"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recipe():
    """recipes/seq_cls.py as a namespace (it is a script, not a package module)."""
    return vars(importlib.import_module("qlora_recipes.seq_cls"))


def _load(recipe, overrides):
    return load_config(CONFIG, overrides, recipe["SeqClsConfig"])


# ---------------------------------------------------------------- config errors

def test_config_loads_with_overrides_as_typed_values(recipe):
    cfg = _load(recipe, ["lora.r=16", "train.epochs=1", "train.lr=3e-4", "lr.full=5e-5", "mode=qlora",
                         "train_size=100"])
    assert cfg.lora.r == 16 and cfg.train.epochs == 1 and cfg.mode == "qlora" and cfg.train_size == 100
    # 3e-4 without a dot is a string to plain YAML 1.1; the loader reads it as the float it means
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.lr["full"] == 5e-5 and cfg.lr["lora"] == 3e-4
    assert cfg.lora.target_modules[-1] == "word_embeddings" and cfg.lora.modules_to_save == ["classifier", "pooler"]


@pytest.mark.parametrize("override, needles", [
    ("lora.rr=3", ["'lora.rr'", "allowed keys", "lora_alpha", "target_modules"]),
    ("train.optimzer=adamw", ["'train.optimzer'", "allowed keys", "optimizer"]),
    ("bogus=1", ["'bogus'", "allowed keys", "max_length", "train_size"]),
    ("mode=foo", ["mode='foo'", "full, head, lora, qlora, all"]),
    ("train.optimizer=sgd", ["optimizer='sgd'", "adamw, adamw8bit, paged_adamw8bit"]),
    ("train.epochs=0", ["epochs=0", ">= 1"]),
    ("train.epochs=true", ["epochs=True", ">= 1"]),
    ("train.lr=abc", ["lr='abc'"]),
    ("lr.full=abc", ["lr.full='abc'"]),
    ("lr.fulll=1e-3", ["'lr.fulll'", "full, head, lora, qlora"]),
    ("lora.r=0", ["r=0"]),
    ("train_size=0", ["train_size=0"]),
    ("train=3", ["train must be a section", "epochs", "got 3"]),
    ("lora.r.x=3", ["'lora.r.x'", "'r' is not a section"]),
    ("lora.r", ["'lora.r'", "not key=value"]),
])
def test_bad_keys_and_values_are_named(recipe, override, needles):
    with pytest.raises(QLoRAError) as info:
        _load(recipe, [override])
    message = str(info.value)
    for needle in needles:
        assert needle in message, message


def test_missing_config_file_is_named(recipe, tmp_path):
    with pytest.raises(QLoRAError, match="not found"):
        load_config(tmp_path / "nope.yaml", [], recipe["SeqClsConfig"])


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    """A random 2-layer BertModel (hidden 32) with the real MiniLM tokenizer, saved like MiniLM is
    (a bare encoder: the classifier is new when loaded for sequence classification)."""
    from transformers import BertConfig, BertModel

    from qlora.bundled import minilm_path
    minilm = Path(minilm_path())
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = json.loads((minilm / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64), add_pooling_layer=True)
    model.save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, folder / name)
    return folder, sum(p.numel() for p in model.parameters())


def test_recipe_runs_all_four_modes_end_to_end(recipe, tiny_bert_folder, tmp_path):
    folder, encoder_params = tiny_bert_folder
    out = tmp_path / "seq_cls"
    cfg = _load(recipe, [f"model={folder}", "train_size=32", "test_size=32", "max_length=16", "train.epochs=1",
                         "train.batch_size=16", "mode=all", f"out_dir={out}", "train.progress=false", "lr_grid=null"])
    rows = recipe["main"](cfg)

    # the table, both forms, all four modes
    table = json.loads((out / "table.json").read_text())["rows"]
    assert [r["mode"] for r in table] == [r["mode"] for r in rows] == MODES
    md = (out / "table.md").read_text()
    for mode in MODES:
        assert f"| {mode} |" in md
    by_mode = {r["mode"]: r for r in table}

    # trainable parameters, worked out from the config
    config = json.loads((folder / "config.json").read_text())
    h, inter, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "vocab_size"))
    r, labels = cfg.lora.r, 2                                   # rotten / fresh
    classifier = h * labels + labels
    head = classifier + h * h + h                               # modules_to_save: classifier + pooler
    per_layer = (4 * r * (h + h)                                # query, key, value, attention.output.dense
                 + r * (h + inter)                              # intermediate.dense
                 + r * (inter + h))                             # output.dense
    adapters = layers * per_layer + r * (vocab + h)             # + word_embeddings
    full = encoder_params + classifier
    assert by_mode["full"]["trainable_params"] == by_mode["full"]["total_params"] == full
    assert by_mode["head"]["trainable_params"] == head and by_mode["head"]["total_params"] == full
    for mode in ("lora", "qlora"):
        assert by_mode[mode]["trainable_params"] == adapters + head, mode
        assert by_mode[mode]["total_params"] == full + adapters, mode

    for mode in MODES:
        row = by_mode[mode]
        assert row["steps"] == 2                                # 32 examples / batch 16, one epoch
        assert row["accuracy"] in {k / 32 for k in range(33)}      # 32 test examples: a count, not a mean of means
        assert row["peak_bytes"] and row["peak_bytes"] > 0
        assert row["lr"] == cfg.lr[mode]
        losses = [m["loss"] for m in map(json.loads, (out / mode / "metrics.jsonl").read_text().splitlines())
                  if "loss" in m]
        assert len(losses) == 1 and math.isfinite(losses[0])   # log_every=20: the last step only
        assert (out / mode / "curves.png").read_bytes()[:8] == PNG_MAGIC
    for mode in ("lora", "qlora"):
        assert (out / mode / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / mode / "adapter" / "adapter_config.json").is_file()
    assert not (out / "full" / "adapter").exists()
    # qlora trained on an NF4 base (every Linear but the head: 6 per layer; the pooler trains, so stays float)
    qlora_facts = json.loads((out / "qlora" / "adapter" / "qlora_adapter.json").read_text())
    assert qlora_facts["quant_type"] == "nf4" and len(qlora_facts["quantized_modules"]) == layers * 6
    assert "bert.pooler.dense" not in qlora_facts["quantized_modules"]
    lora_facts = json.loads((out / "lora" / "adapter" / "qlora_adapter.json").read_text())
    assert "quantized_modules" not in lora_facts


def test_lr_search_reports_the_validation_best_and_its_test_accuracy(recipe, tiny_bert_folder, tmp_path):
    folder, _ = tiny_bert_folder
    out = tmp_path / "search"
    cfg = _load(recipe, [f"model={folder}", "train_size=40", "test_size=24", "max_length=16", "train.epochs=1",
                         "train.batch_size=16", "mode=lora", f"out_dir={out}", "train.progress=false",
                         "lr_grid={lora: [1.0e-4, 1.0e-1]}", "val_fraction=0.25"])
    (row,) = recipe["main"](cfg)
    # 40 training examples: 10 held out for validation, 30 to fit (2 steps of 16)
    assert row["train_examples"] == 30 and row["val_examples"] == 10 and row["steps"] == 2
    assert [r["lr"] for r in row["search"]] == [1e-4, 1e-1]
    best = max(row["search"], key=lambda r: r["val_accuracy"])          # first best on ties, like max()
    assert row["lr"] == best["lr"] and row["accuracy"] == best["accuracy"]
    # each candidate's validation accuracy is what its own training log recorded at the end
    for r in row["search"]:
        logged = [json.loads(l) for l in (out / "lora" / f"lr-{r['lr']:g}" / "metrics.jsonl").read_text().splitlines()]
        assert [m["eval_accuracy"] for m in logged if "eval_accuracy" in m][-1] == r["val_accuracy"]
        assert r["val_accuracy"] in {k / 10 for k in range(11)}           # 10 validation examples
        assert r["accuracy"] in {k / 24 for k in range(25)}               # 24 test examples
    # the reported adapter is the chosen candidate's
    chosen = out / "lora" / f"lr-{row['lr']:g}" / "adapter" / "adapter_model.safetensors"
    assert (out / "lora" / "adapter" / "adapter_model.safetensors").read_bytes() == chosen.read_bytes()
    assert json.loads((out / "table.json").read_text())["rows"][0]["search"] == row["search"]


def test_lr_search_survives_a_diverging_rate(recipe, tiny_bert_folder, tmp_path):
    folder, _ = tiny_bert_folder
    cfg = _load(recipe, [f"model={folder}", "train_size=40", "test_size=24", "max_length=16", "train.epochs=1",
                         "train.batch_size=16", "mode=lora", f"out_dir={tmp_path}", "train.progress=false",
                         "lr_grid={lora: [1.0e+30, 1.0e-4]}", "val_fraction=0.25", "train.max_grad_norm=null"])
    (row,) = recipe["main"](cfg)
    assert "diverged" in row["search"][0] and row["search"][0]["val_accuracy"] is None
    assert row["lr"] == 1e-4 and row["accuracy"] == row["search"][1]["accuracy"] is not None


@pytest.mark.parametrize("override, needle", [
    ("lr_grid={lora: []}", "lr_grid.lora=[]"),
    ("lr_grid={lora: [-1]}", "lr_grid.lora=[-1]"),
    ("lr_grid={bogus: [1.0e-3]}", "a mapping from mode"),
    ("val_fraction=1.5", "val_fraction=1.5"),
])
def test_bad_lr_grid_is_named(recipe, override, needle):
    with pytest.raises(QLoRAError, match=re.escape(needle)):
        _load(recipe, [override])
