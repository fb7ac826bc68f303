"""`qlora train sft model=<image-text folder>`: the recipe loads the checkpoint's own image-text class.

    PYTHONPATH=$PWD python -m pytest -q tests/recipes/test_image_text_model.py      (~20 s)

A tiny random Qwen3-VL over SmolLM2's vocabulary, saved with SmolLM2's tokenizer, trained 2 steps on text chats
(rows holding images are the data side's, not checked here) and exported: the export is the same image-text
class with the vision tower's tensors as the checkpoint stores them, and no adapter was put on the tower.
"""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from tests.qlora.arch.test_image_text import FAMILIES
from tests.recipes.test_sft import CHAT, CONFIG, write

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sft_on_an_image_text_folder_trains_its_language_model(tmp_path, smol_tok_dir):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from qlora.cli import main
    torch.manual_seed(0)
    spec = dict(FAMILIES["qwen3_vl"])
    config = AutoConfig.for_model("qwen3_vl", **{**spec, "text_config": {**spec["text_config"], "vocab_size": 49152}})
    folder = tmp_path / "vlm"
    AutoModelForImageTextToText.from_config(config).save_pretrained(str(folder))
    for p in smol_tok_dir.iterdir():
        shutil.copy(p, folder / p.name)
    data = write(tmp_path / "chats.jsonl", [{"messages": CHAT[:2]}, {"messages": CHAT}] * 4)
    out = tmp_path / "run"
    assert main(["train", str(CONFIG), f"model={folder}", f"data={data}", f"out_dir={out}", "eval_fraction=0.25",
                 "train.batch_size=2", "train.max_steps=2", "train.progress=false", "samples=0", "lora.r=4",
                 "export=true", "export_dtype=float32"]) == 0
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        targets = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in f.keys()}
    assert targets and all(t.startswith("model.language_model.") for t in targets)
    assert json.loads((out / "merged" / "config.json").read_text())["architectures"] == ["Qwen3VLForConditionalGeneration"]
    merged = AutoModelForImageTextToText.from_pretrained(str(out / "merged"), dtype=torch.float32)
    stock = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
    assert type(merged) is type(stock)
    theirs = dict(stock.named_parameters())
    for name, p in merged.named_parameters():
        if name.startswith("model.visual."):
            assert torch.equal(p, theirs[name]), name
