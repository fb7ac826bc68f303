"""Tests of the image classification recipe (recipes/image_cls.py, recipes/configs/image_cls.yaml).

    .venv/bin/python -m pytest tests/recipes/test_image_cls.py -s      # default suite (~40 s on 2 busy cores)

The real code path end to end, on tiny sizes: `qlora train recipes/configs/image_cls.yaml` (through
qlora.cli.run_recipe, as the command line runs it) pretrains a 2-layer ViT for one epoch on 128
Fashion-MNIST images of classes 0-4, caches its backbone in a temp $QLORA_CACHE, then fine-tunes it
on 32 images of classes 5-9 in all four modes. Checked against numbers the test computes itself
from the model config: each mode's trainable and total parameter counts (LoRA on a Linear:
r·(in+out); on the Conv2d patch embedding: r·(in·kh·kw + out); the new head in full), and that a
cached backbone is reused without pretraining again. Needs Fashion-MNIST (./run setup); skipped
without it.
"""
import json
from pathlib import Path

import pytest

from qlora.errors import QLoRAError

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "recipes/configs/image_cls.yaml"
H, I, L, HEADS, P, K, R = 32, 64, 2, 2, 7, 5, 4     # hidden, intermediate, layers, heads, patch, classes, rank

pytestmark = pytest.mark.usefixtures("single_thread")


def _fashion_mnist_or_skip():
    from qlora_recipes.bundled_data import fashion_mnist_dir
    try:
        fashion_mnist_dir()
    except QLoRAError as e:
        pytest.skip(str(e))


def expected_counts() -> dict:
    """(trainable, total) per mode for a ViT with 1 channel, 28x28 images, patch P, hidden H."""
    patches = (28 // P) ** 2
    conv = H * 1 * P * P + H                              # Conv2d patch embedding (+ bias)
    embeddings = conv + H + (patches + 1) * H              # + [CLS] token + position embeddings
    layer = 4 * (H * H + H) + (H * I + I) + (I * H + H) + 2 * 2 * H   # q,k,v,o + fc1, fc2 + 2 LayerNorms
    head = H * K + K
    base = embeddings + L * layer + 2 * H + head            # + final LayerNorm
    lora = L * (4 * R * (H + H) + R * (H + I) + R * (I + H)) + R * (1 * P * P + H)
    return {"full": (base, base), "head": (head, base), "lora": (lora + head, base + lora),
            "qlora": (lora + head, base + lora)}


def test_image_recipe_tiny_all_modes(tmp_path, monkeypatch):
    _fashion_mnist_or_skip()
    from qlora.cli import run_recipe
    cache = tmp_path / "cache"
    monkeypatch.setenv("QLORA_CACHE", str(cache))
    out = tmp_path / "run"
    overrides = [f"out_dir={out}", "mode=all", "train_size=32", "test_size=32", "train.epochs=1",
                 "train.batch_size=32", "train.progress=false", f"lora.r={R}",
                 "pretrain.train_size=128", "pretrain.test_size=32", "pretrain.epochs=1",
                 f"pretrain.hidden_size={H}", f"pretrain.intermediate_size={I}", f"pretrain.num_layers={L}",
                 f"pretrain.num_heads={HEADS}", f"pretrain.patch_size={P}"]
    rows = run_recipe(str(CONFIG), overrides)

    table = json.loads((out / "table.json").read_text())["rows"]
    assert [r["mode"] for r in table] == ["full", "head", "lora", "qlora"] == [r["mode"] for r in rows]
    want = expected_counts()
    for r in table:
        assert (r["trainable_params"], r["total_params"]) == want[r["mode"]], r["mode"]
        assert r["accuracy"] in {k / 32 for k in range(33)} and r["steps"] == 1   # 32 test images
    assert "| fmnist-vit | qlora |" in (out / "table.md").read_text()

    # the backbone was pretrained once, into the temp cache, atomically (no temp folder left)
    folders = [p for p in cache.iterdir()]
    assert len(folders) == 1 and folders[0].name.startswith("fmnist-vit-pretrained-"), folders
    info = json.loads((folders[0] / "pretrain.json").read_text())
    assert info["train_images"] == 128 and info["settings"]["hidden_size"] == H
    config = json.loads((folders[0] / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_channels"]) == (H, L, 1)
    assert (out / "pretrain" / "metrics.jsonl").is_file()

    # the adapters cover the Conv2d patch embedding; in qlora mode it stayed float, the Linears are NF4
    facts = json.loads((out / "qlora" / "adapter" / "qlora_adapter.json").read_text())
    quantized = facts["quantized_modules"]
    adapter = json.loads((out / "qlora" / "adapter" / "adapter_config.json").read_text())
    assert len(quantized) == 6 * L and not any("patch_embeddings" in m for m in quantized)
    assert "patch_embeddings.projection" in adapter["target_modules"] and adapter["modules_to_save"] == ["classifier"]
    from safetensors import safe_open
    with safe_open(str(out / "qlora" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        conv_a = f.get_tensor("base_model.model.vit.embeddings.patch_embeddings.projection.lora_A.weight")
    assert tuple(conv_a.shape) == (R, 1, P, P)


def test_cached_backbone_is_reused(tmp_path, monkeypatch):
    """A second run with the same pretrain settings loads the cached folder and never pretrains."""
    _fashion_mnist_or_skip()
    import importlib

    from qlora.util.configs import load_config
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    ns = vars(importlib.import_module("qlora_recipes.image_cls"))
    tiny = [f"out_dir={tmp_path / 'run'}", "train.progress=false", "pretrain.train_size=64", "pretrain.test_size=16",
            "pretrain.epochs=1", "pretrain.hidden_size=16", "pretrain.intermediate_size=32", "pretrain.num_layers=1",
            "pretrain.num_heads=2", "pretrain.patch_size=14"]
    cfg = load_config(CONFIG, tiny, ns["ImageClsConfig"])
    first = ns["pretrained_backbone"](cfg.pretrain, cfg.train)

    def no_pretraining(*args):
        raise AssertionError("pretrained again although the backbone is cached")
    # run_path returns a copy of the script's globals: patch the dict its functions actually read
    monkeypatch.setitem(ns["pretrained_backbone"].__globals__, "pretrain", no_pretraining)
    assert ns["pretrained_backbone"](cfg.pretrain, cfg.train) == first
    other = load_config(CONFIG, tiny + ["pretrain.seed=1"], ns["ImageClsConfig"])  # other settings, other folder
    with pytest.raises(AssertionError, match="pretrained again"):
        ns["pretrained_backbone"](other.pretrain, other.train)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(first).name]  # the failed one left nothing


def test_config_refuses_overlapping_classes():
    import importlib

    from qlora.util.configs import load_config
    ns = vars(importlib.import_module("qlora_recipes.image_cls"))
    with pytest.raises(QLoRAError, match="overlap"):
        load_config(CONFIG, ["classes=[4, 5, 6]"], ns["ImageClsConfig"])
    with pytest.raises(QLoRAError, match="patch_size"):
        load_config(CONFIG, ["pretrain.patch_size=5"], ns["ImageClsConfig"])
