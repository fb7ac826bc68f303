"""Export from files where the checkpoint's layout is not the model's: read through transformers' conversion mapping.

    .venv/bin/python -m pytest -q tests/qlora/export/test_layouts.py      (~10 s)

Sarvam-MoE / Param2-MoE store a fused `attention.query_key_value` that transformers splits into q/k/v_proj (and
rename `attention.dense`, `word_embeddings`, per-expert tensors); MiniCPM5-MoE's `q_proj` is the model's
`q_gate_proj`; Gemma 3 (image-text) checkpoints say `language_model.model.layers...` for the model's
`model.language_model.layers...`. An adapter trained on the 4-bit model names the model's modules; the export
(`qlora export --base --adapter`) once failed on these ("adapter module ... has no weight ... in the base").
Independent references: stock transformers loads the exported folder and gives the live 4-bit model's logits;
PEFT loads the adapter onto the dequantized base and gives them too.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import qlora
from qlora.export.from_files import export_adapter
from tests.qlora.export.test_experts import keys
from tests.qlora.quant.test_experts import bnb_roundtrip

pytestmark = pytest.mark.usefixtures("single_thread")
IDS = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(4))
MOE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
           n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=64)
GEMMA3 = dict(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"]),
              vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=28, patch_size=7),
              mm_tokens_per_image=4, image_token_index=63, boi_token_index=61, eoi_token_index=62)
FAMILIES = {"sarvam_moe": MOE, "param2moe": MOE, "minicpm5_moe": MOE, "gemma3": GEMMA3}


def save_base(family: str, folder: Path) -> Path:
    """A tiny random bf16 checkpoint, as transformers' save_pretrained writes it (the family's checkpoint layout)."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, **FAMILIES[family])
    auto = transformers.AutoModelForImageTextToText if family == "gemma3" else transformers.AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():     # routers and norms get values (some inits are constant)
            if "mlp.gate." in name or "norm" in name or name.endswith("_bias"):
                p.normal_(0, 0.5)
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder




def stock(folder: Path) -> torch.nn.Module:
    """The folder loaded by stock transformers, in fp32, as the class its config.json names."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder, dtype=torch.float32).eval()


def trained(family: str, root: Path):
    """(the live 4-bit model with a random all-linear LoRA, its base folder, its saved adapter folder)."""
    base = save_base(family, root / "base")
    model = qlora.load_4bit(str(base), compute_dtype=torch.float32)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    qlora.save_adapter(model, root / "adapter")
    return model.eval(), base, root / "adapter"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_from_files_of_a_converted_layout(family, tmp_path):
    model, base, adapter = trained(family, tmp_path)
    adapted = {n.split(".lora_")[0] for n in load_file(adapter / "adapter_model.safetensors")}
    assert any(k.removeprefix("base_model.model.") + ".weight" not in keys(base) for k in adapted)   # layouts differ
    result = export_adapter(base, adapter, tmp_path / "out", dtype="float32", verify_live=False, progress=False)
    assert result.verification["passed"], result.verification
    assert keys(tmp_path / "out") == keys(base)                     # the family's own layout, as save_pretrained
    assert result.layers
    with torch.no_grad():
        ours = model(IDS).logits
        torch.testing.assert_close(stock(tmp_path / "out")(IDS).logits, ours, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["sarvam_moe", "gemma3"])
def test_peft_on_the_dequantized_base_agrees(family, tmp_path):
    """PEFT's load of the same adapter onto the base with every 4-bit weight put back to dequant(quant(W)),
    computed here with bitsandbytes, gives the live model's logits (and so the export's)."""
    from peft import PeftModel
    model, base, adapter = trained(family, tmp_path)
    settings = json.loads((adapter / "qlora_adapter.json").read_text())
    plain = stock(base)
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name in [p + ".weight" for p in settings["quantized_modules"]] + settings.get("quantized_experts", []):
            params[name].copy_(bnb_roundtrip(params[name].to(getattr(torch, settings["quantized_from_dtype"]))).float())
        peft = PeftModel.from_pretrained(plain, adapter).eval()
        torch.testing.assert_close(peft(IDS).logits, model(IDS).logits, rtol=0, atol=2e-5)


def test_an_export_too_large_to_load_is_checked_layer_by_layer(tmp_path, monkeypatch):
    """When the merged model does not fit in memory, the export from files checks each merged tensor read back
    through transformers' conversion (the fused q/k/v split again) instead of loading the model, and says what
    it skipped; the same check against the live model's weights passes, and fails on a changed tensor."""
    import qlora.export.verify as ev
    from qlora.export.from_model import merged_tensors
    model, base, adapter = trained("sarvam_moe", tmp_path)
    monkeypatch.setattr(ev, "available_memory", lambda: 1 << 10)
    result = export_adapter(base, adapter, tmp_path / "out", dtype="float32", progress=False)
    v = result.verification
    assert v["mode"] == "per-layer" and v["passed"] and v["layers_checked"] == len(result.layers) > 0
    assert "does not fit in the memory available (1.00 KiB)" in v["skipped"]
    assert "verified layer by layer" in qlora.export.summary(result)

    def live(name):
        return merged_tensors(model, name, torch.float32)
    assert ev.verify_layers(tmp_path / "out", result, live, reason="test")["worst_relative_error"] < 1e-6
    shard = tmp_path / "out" / "model.safetensors"
    tensors = load_file(shard)
    key = "model.layers.0.attention.query_key_value.weight"
    tensors[key][-8:] *= 1.01                                    # v_proj's rows of layer 0, 1 % off
    save_file(tensors, shard, metadata={"format": "pt"})
    bad = ev.verify_layers(tmp_path / "out", result, live, reason="test")
    assert not bad["passed"] and bad["worst_tensor"] == "model.layers.0.self_attn.v_proj.weight"


def test_requantize_refuses_a_layer_the_checkpoint_stores_elsewhere(tmp_path):
    """--requantize writes 4-bit layers under the model's names; where the checkpoint's layout differs (Gemma 3:
    `language_model.model.layers...`) it says so in one line and writes nothing."""
    from qlora.errors import QLoRAError
    _, base, adapter = trained("gemma3", tmp_path)
    with pytest.raises(QLoRAError, match="--requantize writes 4-bit layers in the model's own layout") as e:
        export_adapter(base, adapter, tmp_path / "out", requantize="nf4", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
