"""Exports of image-text models: the whole model in its checkpoint layout, the language model merged.

    .venv/bin/python -m pytest -q tests/qlora/export/test_image_text.py      (~30 s)

For five families (tests/qlora/arch/test_image_text.py builds them; Qwen3.5-MoE: experts and hybrid attention)
both exports (live `export_merged`, and `export_adapter` from the base folder + adapter files) are loaded by stock
transformers as the checkpoint's class and give the live 4-bit model's logits on a prompt holding an image; every
vision / projector tensor is the checkpoint's, byte for byte; the processor file is copied.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import qlora
from qlora.export.from_files import export_adapter
from tests.qlora.arch.test_image_text import image_inputs, logits, save_base

pytestmark = pytest.mark.usefixtures("single_thread")


def raw_tensors(folder: Path) -> dict[str, bytes]:
    """{checkpoint key: its stored bytes} of a folder's safetensors files."""
    out = {}
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                t = s.get_tensor(k)
                out[k] = (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return out


@pytest.mark.parametrize("family,vision", [("qwen3_vl", False), ("qwen3_5_moe", False), ("gemma3", False),
                                           ("llava", False), ("mistral3", False), ("gemma3", True),
                                           ("qwen3_vl_moe", False)])
def test_both_exports_are_the_whole_model_with_the_live_logits_on_an_image(family, vision, tmp_path):
    """(vision=True: the towers adapted too, and 4-bit; their tensors are then merged, not the checkpoint's.
    Qwen3-VL-MoE: its experts' Transpose checks shapes, and its gate_up_proj is square here: the live export
    transposed it against the 4-bit packed shape, and the file loaded with the wrong weights.)"""
    base = save_base(family, tmp_path / "base")
    model = qlora.load_4bit(str(base), compute_dtype=torch.float32, quantize_vision=vision)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                           vision=vision))
    qlora.save_adapter(model, tmp_path / "adapter")
    inputs = image_inputs(family, model.config)
    live = logits(model.eval(), inputs)
    arch = json.loads((base / "config.json").read_text())["architectures"][0]
    checkpoint = raw_tensors(base)
    lm_keys = {k for k in checkpoint if "language_model" in k or k.startswith("lm_head")}
    assert checkpoint.keys() - lm_keys                                  # the towers' tensors
    live_export = qlora.export_merged(model, tmp_path / "live", dtype="float32", progress=False)
    from_files = export_adapter(base, tmp_path / "adapter", tmp_path / "files", dtype="float32", verify_live=False,
                                progress=False)
    for out, result in ((tmp_path / "live", live_export), (tmp_path / "files", from_files)):
        assert result.verification["passed"], result.verification
        assert "pixel_values" in result.verification["inputs"], result.verification    # checked with a picture
        exported = raw_tensors(out)
        assert exported.keys() == checkpoint.keys()                      # the checkpoint's own layout
        towers = checkpoint.keys() - lm_keys
        if vision:
            assert any(exported[k] != checkpoint[k] for k in towers)   # merged into the towers too
        for key in towers:
            assert vision or exported[key] == checkpoint[key], key     # vision / projector: the same bytes
        assert any(exported[k] != checkpoint[k] for k in lm_keys)       # the language model: merged
        assert (out / "preprocessor_config.json").read_text() == (base / "preprocessor_config.json").read_text()
        loaded = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
        assert type(loaded).__name__ == arch
        torch.testing.assert_close(logits(loaded, inputs), live, rtol=0, atol=5e-5)


def test_the_export_check_feeds_a_picture_to_a_family_that_tiles_and_drops_blank_ones(tmp_path):
    """SmolVLM (Idefics3's tower): pictures are tiled at the tower's resolution and all-zero ones are dropped as
    padding, so the check's picture is made at that resolution and is not blank (it crashed in transformers:
    0 images after the padding check, then tiles of the processor's default 364 px)."""
    from tests.qlora.arch.test_image_text import MORE_FAMILIES
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("smolvlm", **MORE_FAMILIES["smolvlm"][0])
    transformers.AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path / "base")
    model = qlora.load_4bit(str(tmp_path / "base"), compute_dtype=torch.float32)
    qlora.add_lora(model, qlora.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    result = qlora.export_merged(model, tmp_path / "out", dtype="float32", progress=False)
    assert result.verification["passed"], result.verification
    assert result.verification["inputs"]["pixel_values"][-2:] == [16, 16], result.verification
