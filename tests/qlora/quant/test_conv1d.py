"""GPT-2-style models (transformers' Conv1D: weight [in, out], y = x @ W + b) in every qlora mode.

    PYTHONPATH=$PWD python -m pytest -q tests/qlora/quant/test_conv1d.py

References: bitsandbytes' own quantize/dequantize of Wᵀ, transformers' 4-bit loader (the same
codes), PEFT 0.21 (its fan_in_fan_out adapters load here and ours load there with the same
logits), stock transformers loading the merged export (Conv1D layout), and the live model.
"""
import copy
import json
import warnings

import pytest
import torch

import qlora
from qlora import LoraConfig, add_lora
from qlora.quant import dequantize_weight, is_4bit, load_4bit, quantize_model

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]   # transformers: is_gradient_checkpointing (via PEFT)
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def conv1d_paths(model):
    return [f"transformer.h.{i}.{n}" for i in range(model.config.n_layer) for n in CONV1D]


def test_conv1d_layers_quantize_like_bitsandbytes_and_transformers(tiny_gpt2, token_ids, tmp_path):
    import bitsandbytes.functional as F
    base = tiny_gpt2()
    base.save_pretrained(tmp_path)
    q = quantize_model(copy.deepcopy(base), compute_dtype=torch.float32)
    assert [n for n, m in q.named_modules() if qlora.quant.is_linear4bit(m)] == conv1d_paths(base)
    assert type(q.lm_head).__name__ == "Linear" and q.lm_head.weight is q.transformer.wte.weight  # head kept, tied
    for path in conv1d_paths(base):
        w = base.get_submodule(path).weight                        # [in, out]
        layer = q.get_submodule(path)
        assert (layer.in_features, layer.out_features) == tuple(w.shape)
        packed, state = F.quantize_4bit(w.T.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(layer.weight.data, packed)               # the codes of Wᵀ [out, in]
        assert torch.equal(dequantize_weight(layer), F.dequantize_4bit(packed, state))
        x = torch.randn(3, w.shape[0])
        y = x @ dequantize_weight(layer).T + base.get_submodule(path).bias
        torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)
    # transformers' 4-bit loader (load_4bit) quantizes the same layers to the same codes
    loaded = load_4bit(str(tmp_path), compute_dtype=torch.float32)
    for path in conv1d_paths(base):
        assert torch.equal(loaded.get_submodule(path).weight.data, q.get_submodule(path).weight.data)
    torch.testing.assert_close(loaded(token_ids).logits, q(token_ids).logits)


@pytest.mark.parametrize("four_bit", [False, True])
def test_lora_on_conv1d_forward_merge_and_unmerge(tiny_gpt2, token_ids, four_bit):
    base = tiny_gpt2()
    model = quantize_model(copy.deepcopy(base), compute_dtype=torch.float32) if four_bit else copy.deepcopy(base)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    layers = qlora.lora.inject.lora_layers(model)
    assert sorted(layers) == sorted(conv1d_paths(base))             # all-linear: every Conv1D, not lm_head
    path = "transformer.h.0.mlp.c_fc"
    layer, conv = layers[path], base.get_submodule(path)
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (128, 4)   # [r, in], [out, r]
    x = torch.randn(2, 5, 32)
    w = dequantize_weight(layer) if four_bit else conv.weight.T      # [out, in]
    by_hand = x @ w.T + conv.bias + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), by_hand, rtol=1e-4, atol=1e-4)
    if four_bit:
        with pytest.raises(qlora.QLoRAError, match="export_merged"):
            qlora.merge_lora(model)
        return
    before = {p: m.base_layer.weight.detach().clone() for p, m in layers.items()}
    y = model(token_ids).logits
    qlora.merge_lora(model)
    torch.testing.assert_close(model(token_ids).logits, y, rtol=1e-5, atol=1e-5)
    qlora.unmerge_lora(model)
    for p, m in layers.items():
        torch.testing.assert_close(m.base_layer.weight, before[p], rtol=0, atol=1e-6)
    plain = qlora.unload_lora(model)
    assert type(plain.get_submodule(path)).__name__ == "Conv1D"
    torch.testing.assert_close(plain(token_ids).logits, y, rtol=1e-5, atol=1e-5)


def test_adapters_are_peft_compatible_both_ways(tiny_gpt2, token_ids, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    ours = add_lora(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    ours.eval()
    qlora.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")   # PEFT warns when the flag is wrong
        peft_model = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_model(token_ids).logits, ours(token_ids).logits, rtol=0, atol=1e-6)

    theirs = get_peft_model(tiny_gpt2(), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         fan_in_fan_out=True, init_lora_weights=False))
    theirs.eval().save_pretrained(tmp_path / "theirs")
    loaded = qlora.load_adapter(tiny_gpt2(), tmp_path / "theirs").eval()
    torch.testing.assert_close(loaded(token_ids).logits, theirs(token_ids).logits, rtol=0, atol=1e-6)
    assert sorted(qlora.lora.files.adapter_state_dict(loaded)) == sorted(
        k.replace(".default", "") for k, v in theirs.state_dict().items() if "lora_" in k)


def test_qlora_export_loads_in_stock_transformers_and_matches_the_live_model(tiny_gpt2, token_ids, tmp_path):
    from transformers import GPT2LMHeadModel

    from qlora.export.from_files import export_adapter
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    live = quantize_model(copy.deepcopy(base), compute_dtype=torch.float32)
    # adapters on part of the layers: the frozen 4-bit c_proj / c_fc are exported as dequant(quant(W)) too
    add_lora(live, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    live.eval()
    qlora.save_adapter(live, tmp_path / "adapter")
    want = live(token_ids).logits
    for name, run in [("from_files", lambda out: export_adapter(tmp_path / "base", tmp_path / "adapter", out,
                                                                dtype="float32", progress=False)),
                      ("in_memory", lambda out: qlora.export_merged(live, out, dtype="float32", progress=False))]:
        result = run(tmp_path / name)
        assert result.verification["passed"], (name, result.verification)
        merged = GPT2LMHeadModel.from_pretrained(tmp_path / name).eval()
        c_attn = merged.transformer.h[0].attn.c_attn
        assert type(c_attn).__name__ == "Conv1D" and c_attn.weight.shape == (32, 96)     # [in, out]
        got = merged(token_ids).logits
        assert ((got - want).norm() / want.norm()).item() < 1e-4, name
    with pytest.raises(qlora.QLoRAError, match="Conv1D"):
        export_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "rq", requantize="nf4", progress=False)


def test_qlora_adapter_in_peft_on_transformers_4bit_gpt2(tiny_gpt2, token_ids, tmp_path):
    """Our QLoRA GPT-2 adapter on transformers' own 4-bit GPT-2 under PEFT: the same logits as the live model."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    live = quantize_model(copy.deepcopy(base), compute_dtype=torch.float32)
    add_lora(live, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)).eval()
    qlora.save_adapter(live, tmp_path / "adapter")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"])
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "base", quantization_config=bnb_config, dtype=torch.float32,
                                             device_map="cpu")
    # On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit in place on its first eval/no-grad forward
    # for its bf16 CPU kernel: the absmax rounded to bf16 (weights up to ~0.4% off), and for in_features <
    # blocksize, as in this 32-wide model, the repack fails (a [96, 0] reshape). qlora's layers opt out
    # (qlora.quant.convert.mark_layer); transformers' do not: opt them out too, to compare the same weights.
    for module in theirs.modules():
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = False
    peft_model = PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(token_ids).logits, live(token_ids).logits, rtol=1e-5, atol=1e-5)


def test_export_of_a_peft_written_gpt2_adapter(tiny_gpt2, token_ids, tmp_path):
    """A PEFT adapter has no qlora facts: its fan_in_fan_out flag says the targets are stored [in, out]."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import GPT2LMHeadModel

    from qlora.export.from_files import export_adapter
    tiny_gpt2().save_pretrained(tmp_path / "base")
    theirs = get_peft_model(tiny_gpt2(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                         fan_in_fan_out=True, init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    result = export_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", dtype="float32", progress=False)
    assert result.verification["passed"], result.verification
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(token_ids).logits, theirs(token_ids).logits, rtol=1e-5, atol=1e-5)
