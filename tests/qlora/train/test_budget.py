"""qlora.train.budget.settings_of: the RunSettings of a model built for training, its mode read from its layers."""
from __future__ import annotations

import pytest
import torch

from qlora import LoraConfig, add_lora, quantize_model
from qlora.train.budget import settings_of
from qlora.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("layer", ["Linear4bit", "LinearNF4", "LinearFP4", None])
def test_the_mode_is_read_from_the_layers(tiny_llama, layer):
    """Any bitsandbytes 4-bit layer (qlora.arch.quantized.is_4bit: Linear4bit and its LinearNF4 / LinearFP4
    subclasses) makes the model qlora; LoRA on float layers is lora."""
    model = tiny_llama()
    if layer is not None:
        quantize_model(model, quant_type="fp4" if layer == "LinearFP4" else "nf4", compute_dtype=torch.float32)
        import bitsandbytes as bnb
        for m in model.modules():
            if type(m) is bnb.nn.Linear4bit:
                m.__class__ = getattr(bnb.nn, layer)        # what a model built from bnb.nn.LinearFP4 (...) holds
        assert any(type(m).__name__ == layer for m in model.modules())
    add_lora(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    assert settings_of(model, TrainConfig()).mode == ("lora" if layer is None else "qlora")
