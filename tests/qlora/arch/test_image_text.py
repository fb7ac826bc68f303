"""Image-text models (qlora.arch.multimodal): load_4bit, LoRA and PEFT files on twelve families.

    .venv/bin/python -m pytest -q tests/qlora/arch/test_image_text.py      (~25 s)

Tiny random checkpoints saved by transformers itself. Six families are fed a prompt holding an image (pixel
values and the family's image tokens): Qwen3-VL, Qwen3.5 (hybrid: gated delta-net + full attention), Qwen3.5-MoE
(hybrid and experts), Gemma 3 (sliding + full attention), LLaVA and Mistral 3. Independent references: the plain
float model with the language model's Linear layers and experts matrices replaced by bitsandbytes'
quantize + dequantize of them (found here by the family's own module path, not by qlora's rule), and PEFT.
Six more (Qwen2.5-VL, Qwen3-VL-MoE, SmolVLM, Idefics3, Llama 4, Gemma 4) are loaded and adapted on text.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import qlora
from qlora.arch.quantized import is_4bit, is_4bit_param
from qlora.errors import QLoRAError
from qlora.lora.layers import LoRALayer
from tests.qlora.quant.test_experts import bnb_roundtrip

pytestmark = pytest.mark.usefixtures("single_thread")

_QWEN_VISION = dict(depth=1, in_chans=3, hidden_act="gelu_pytorch_tanh", intermediate_size=32, out_hidden_size=32,
                    hidden_size=32, num_heads=4, patch_size=8, spatial_merge_size=1, temporal_patch_size=2,
                    num_position_embeddings=16)
_QWEN_IDS = dict(image_token_id=3, video_token_id=4, vision_start_token_id=5, vision_end_token_id=6,
                 tie_word_embeddings=False)
_QWEN35_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, layer_types=["full_attention", "linear_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10_000, "mrope_section": [2, 1, 1],
                                     "mrope_interleaved": True},
                    linear_conv_kernel_dim=2, linear_key_head_dim=16, linear_value_head_dim=16,
                    linear_num_key_heads=4, linear_num_value_heads=8, max_position_embeddings=64)
FAMILIES = {
    "qwen3_vl": dict(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10_000,
                                                       "mrope_section": [16, 8, 8], "mrope_interleaved": True}),
                     vision_config=dict(_QWEN_VISION, deepstack_visual_indexes=[0]), **_QWEN_IDS),
    "qwen3_5": dict(text_config=_QWEN35_TEXT, vision_config=_QWEN_VISION, **_QWEN_IDS),
    "qwen3_5_moe": dict(text_config=dict(_QWEN35_TEXT, head_dim=8, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=32, num_experts_per_tok=2, num_experts=4),
                        vision_config=_QWEN_VISION, **_QWEN_IDS),
    "gemma3": dict(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"]),
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=28, patch_size=7),
                   mm_tokens_per_image=4, image_token_index=98, boi_token_index=96, eoi_token_index=97),
    "llava": dict(text_config=dict(model_type="llama", vocab_size=99, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                  vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, image_size=8, patch_size=4,
                                     projection_dim=32),
                  image_token_index=98, vision_feature_layer=-1, vision_feature_select_strategy="default",
                  image_seq_length=4),
    "mistral3": dict(text_config=dict(model_type="mistral", vocab_size=99, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      sliding_window=None),
                     vision_config=dict(model_type="pixtral", hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, intermediate_size=64, image_size=30, patch_size=6,
                                        head_dim=8),
                     image_token_index=98, image_seq_length=4, vision_feature_layer=-1),
}
LANGUAGE_MODEL = "model.language_model"      # where each of these families keeps it (the test's own knowledge)

_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
_IDEFICS = dict(text_config=dict(_TEXT, model_type="llama"), scale_factor=2, image_token_id=98,
                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   image_size=16, patch_size=4))
# six more families, loaded and adapted on text: (config, where the family keeps its language model, its towers)
MORE_FAMILIES = {
    "qwen2_5_vl": (dict(text_config=dict(_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                                 "rope_theta": 10_000}),
                        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                                           patch_size=8, spatial_merge_size=1, temporal_patch_size=2, window_size=16,
                                           fullatt_block_indexes=[1]), **_QWEN_IDS),
                   "model.language_model", {"model.visual"}),
    "qwen3_vl_moe": (dict(FAMILIES["qwen3_vl"], text_config=dict(FAMILIES["qwen3_vl"]["text_config"], num_experts=4,
                                                                  moe_intermediate_size=16, num_experts_per_tok=2)),
                     "model.language_model", {"model.visual"}),
    "smolvlm": (_IDEFICS, "model.text_model", {"model.vision_model", "model.connector"}),
    "idefics3": (_IDEFICS, "model.text_model", {"model.vision_model", "model.connector"}),
    "llama4": (dict(text_config=dict(_TEXT, head_dim=8, intermediate_size_mlp=64, num_local_experts=4,
                                     num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[1, 1],
                                     attention_chunk_size=16),
                    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       image_size=16, patch_size=8, vision_output_dim=32, projector_input_dim=32,
                                       projector_output_dim=32, pixel_shuffle_ratio=0.5)),
               "language_model", {"vision_model", "multi_modal_projector"}),
    "gemma4": (dict(text_config=dict(_TEXT, head_dim=8),
                    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=4)),
               "model.language_model", {"model.vision_tower", "model.embed_vision"}),
}


def build(family: str) -> nn.Module:
    """The family's image-text model in fp32, random weights (norms and routers too: some inits are constant)."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, **(FAMILIES.get(family) or MORE_FAMILIES[family][0]))
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "mlp.gate." in name or name.endswith("_bias") or "A_log" in name:
                p.normal_(0, 0.3)
    return model.eval()


def save_base(family: str, folder: Path) -> Path:
    """The tiny checkpoint as transformers writes it, with a processor file beside it."""
    build(family).save_pretrained(folder)
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "tiny", "size": 8}))
    return Path(folder)


def image_inputs(family: str, config) -> dict:
    """A prompt of 12 tokens holding one image: the family's pixel tensors and image tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 90, (1, 12), generator=gen)
    if family.startswith("qwen"):
        vision = config.vision_config
        grid = 16 // vision.patch_size                                       # a 16x16 image: grid x grid patches
        pixels = torch.randn(grid * grid, 3 * vision.temporal_patch_size * vision.patch_size ** 2, generator=gen)
        ids[0, 2], ids[0, 3:3 + grid * grid], ids[0, 3 + grid * grid] = 5, 3, 6
        out = {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, grid, grid]]),
               "mm_token_type_ids": (ids == 3).long()}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **out}
    size = config.vision_config.image_size
    ids[0, 2:6] = config.image_token_index
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "pixel_values": torch.randn(1, 3, size, size, generator=gen)}
    if family == "mistral3":
        out["image_sizes"] = torch.tensor([[size, size]])
    if family == "gemma3":
        out["token_type_ids"] = (ids == config.image_token_index).long()
    return out


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def nf4_reference(plain: nn.Module) -> nn.Module:
    """The plain model with its language model's Linear layers (not the head, not a shared expert's 1-wide gate)
    and experts matrices put back to bitsandbytes' dequant(quant(W)); the vision side untouched. In place."""
    language_model = plain.get_submodule(LANGUAGE_MODEL)
    with torch.no_grad():
        for name, m in language_model.named_modules():
            if type(m) is nn.Linear and m.out_features > 1:
                m.weight.copy_(bnb_roundtrip(m.weight.data))
            for pname in ("gate_up_proj", "down_proj"):
                p = m._parameters.get(pname) if name.endswith("experts") else None
                if p is not None:
                    p.copy_(bnb_roundtrip(p.data))
    return plain


def lm_linears(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if n.startswith(LANGUAGE_MODEL + ".")
            and type(m) is nn.Linear and m.out_features > 1}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loads_as_its_class_with_the_language_model_in_nf4_and_the_towers_in_float(family, tmp_path):
    base = save_base(family, tmp_path / "base")
    plain = build(family)
    model = qlora.load_4bit(str(base), compute_dtype=torch.float32).eval()
    arch = json.loads((base / "config.json").read_text())["architectures"][0]
    assert type(model).__name__ == arch == type(plain).__name__
    four_bit = {n for n, m in model.named_modules() if is_4bit(m)}
    assert four_bit == lm_linears(plain) - {n for n in lm_linears(plain) if n.endswith("shared_expert_gate")}
    experts = {n for n, p in model.named_parameters() if is_4bit_param(p) and not n.endswith(".weight")}
    assert all(n.startswith(LANGUAGE_MODEL + ".") for n in experts) and bool(experts) == (family == "qwen3_5_moe")
    floats = dict(model.named_parameters())
    for name, p in plain.named_parameters():       # every tower weight (and the embeddings) as in the checkpoint
        if not name.startswith(LANGUAGE_MODEL + ".") and not name.startswith("lm_head"):
            assert floats[name].dtype == torch.float32 and torch.equal(floats[name], p), name
    inputs = image_inputs(family, plain.config)
    ours, before = logits(model, inputs), logits(plain, inputs)
    reference = logits(nf4_reference(plain), inputs)
    assert (ours - before).abs().max() > 1e-3                   # 4 bits changed the logits...
    torch.testing.assert_close(ours, reference, rtol=0, atol=3e-5)   # ...exactly as NF4 of the language model does


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3"])
def test_quantize_vision_makes_the_towers_4bit_too(family, tmp_path):
    base = save_base(family, tmp_path / "base")
    model = qlora.load_4bit(str(base), compute_dtype=torch.float32, quantize_vision=True)
    towers = {n for n, m in model.named_modules() if is_4bit(m) and not n.startswith(LANGUAGE_MODEL + ".")}
    assert towers and all(n.startswith("model.") and "language_model" not in n for n in towers)
    plain = build(family)
    qlora.quantize_model(plain, compute_dtype=torch.float32, quantize_vision=True)
    assert {n for n, m in plain.named_modules() if is_4bit(m)} == {n for n, m in model.named_modules() if is_4bit(m)}


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5_moe", "gemma3", "llava"])
def test_all_linear_adapts_the_language_model_and_peft_agrees_both_ways(family, tmp_path):
    """all-linear: LoRA on the language model's Linear layers and experts only. PEFT loads our adapter onto the
    dequantized plain model with the live model's logits on an image prompt; we load PEFT's adapter with PEFT's."""
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model
    base = save_base(family, tmp_path / "base")
    model = qlora.load_4bit(str(base), compute_dtype=torch.float32)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    assert adapted and all(n.startswith(LANGUAGE_MODEL + ".") for n in adapted)
    assert {n for n in lm_linears(build(family)) if not n.endswith("shared_expert_gate")} <= {
        n.split(".expert_deltas.")[0] for n in adapted}
    qlora.save_adapter(model, tmp_path / "ours")
    inputs = image_inputs(family, model.config)
    live = logits(model.eval(), inputs)
    peft = PeftModel.from_pretrained(nf4_reference(build(family)), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(peft, inputs), live, rtol=0, atol=5e-5)

    # PEFT's own adapter (its names for these modules) into a fresh 4-bit model
    targets = sorted({n for n in lm_linears(build(family)) if n.endswith(("q_proj", "v_proj"))})
    theirs = get_peft_model(nf4_reference(build(family)), PeftConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                    init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    fresh = qlora.load_adapter(qlora.load_4bit(str(base), compute_dtype=torch.float32), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(fresh, inputs), logits(theirs, inputs), rtol=0, atol=5e-5)


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3"])
def test_adapted_towers_load_in_peft_with_the_live_logits(family, tmp_path):
    """vision=True: the towers' adapters (float base) change the image's features, and PEFT reads them by path."""
    from peft import PeftModel
    base = save_base(family, tmp_path / "base")
    model = qlora.load_4bit(str(base), compute_dtype=torch.float32)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", vision=True,
                                           init_lora_weights=False))
    qlora.save_adapter(model, tmp_path / "ours")
    inputs = image_inputs(family, model.config)
    live = logits(model.eval(), inputs)
    with qlora.disable_adapters(model):
        assert (logits(model, inputs) - live).abs().max() > 1e-3
    peft = PeftModel.from_pretrained(nf4_reference(build(family)), tmp_path / "ours").eval()
    assert any(n.startswith("base_model.model.model.") and "lora_A" in n and LANGUAGE_MODEL not in n
               for n, _ in peft.named_parameters())                # PEFT put adapters on the tower too
    torch.testing.assert_close(logits(peft, inputs), live, rtol=0, atol=5e-5)


def test_the_towers_are_adapted_only_when_asked(tmp_path):
    """vision=True adds the towers to all-linear; a name on both sides (Gemma 3's q_proj, also in SigLIP) adapts the
    language model's; a name only in the tower (fc1) adapts the tower's; the file lists them by path for PEFT."""
    def adapted(model):
        return {n for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    model = qlora.quantize_model(build("gemma3"), compute_dtype=torch.float32)
    vision = {n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("model.vision_tower.")}
    both = qlora.add_lora(qlora.quantize_model(build("gemma3"), compute_dtype=torch.float32),
                          qlora.LoraConfig(target_modules="all-linear", vision=True))
    assert vision and vision <= adapted(both) and not vision & adapted(
        qlora.add_lora(qlora.quantize_model(build("gemma3"), compute_dtype=torch.float32),
                       qlora.LoraConfig(target_modules="all-linear")))
    got = adapted(qlora.add_lora(model, qlora.LoraConfig(target_modules=["q_proj", "fc1"])))
    assert {n for n in got if n.startswith("model.vision_tower.")} == {n for n in vision if n.endswith("fc1")}
    assert {n for n in got if n.endswith("q_proj")} == {n for n in lm_linears(build("gemma3")) if n.endswith("q_proj")}
    qlora.save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(saved) == sorted(got)                            # by path: PEFT adapts exactly these


@pytest.mark.parametrize("family,causal_lm", [("qwen3_5", "Qwen3_5ForCausalLM"), ("gemma3", "Gemma3ForCausalLM"),
                                              ("llava", "LlamaForCausalLM"), ("mistral3", "MistralForCausalLM")])
def test_text_only_loads_the_language_model_alone(family, causal_lm, tmp_path, capsys):
    """text_only=True: the causal-LM class, said in one line, reading the language model and head from the
    composite checkpoint (whatever its layout): on text its logits are the image-text 4-bit model's."""
    base = save_base(family, tmp_path / "base")
    model = qlora.load_4bit(str(base), compute_dtype=torch.float32, text_only=True).eval()
    assert type(model).__name__ == causal_lm
    assert f"text only: {causal_lm}, the language model of" in capsys.readouterr().out
    whole = qlora.load_4bit(str(base), compute_dtype=torch.float32).eval()
    ids = torch.randint(10, 90, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(model, {"input_ids": ids}), logits(whole, {"input_ids": ids}), rtol=0, atol=1e-5)


def test_text_only_is_refused_in_one_line_where_it_cannot_be(tmp_path):
    base = save_base("qwen3_vl", tmp_path / "qwen3_vl")
    with pytest.raises(QLoRAError) as e:
        qlora.load_4bit(str(base), text_only=True)       # transformers has no causal LM for Qwen3-VL's text model
    assert "no causal-LM class" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(QLoRAError, match="drop model_class"):
        qlora.load_4bit(str(base), transformers.AutoModelForCausalLM, text_only=True)
    with pytest.raises(QLoRAError, match="AutoModelForCausalLM has no class for model type 'qwen3_vl'; leave "
                       "model_class out to load it as Qwen3VLForConditionalGeneration"):
        qlora.load_4bit(str(base), transformers.AutoModelForCausalLM)


@pytest.mark.parametrize("family", list(MORE_FAMILIES))
def test_more_families_follow_the_one_rule(family, tmp_path, capsys):
    """Qwen2.5-VL, Qwen3-VL-MoE, SmolVLM / Idefics3 (`text_model`), Llama 4 (its language model a causal LM of
    its own) and Gemma 4 (an embedder beside the tower): the checkpoint's class, 4-bit and all-linear LoRA inside
    the language model only, every tower weight as saved."""
    from qlora.arch.multimodal import tower_paths
    spec, language_model, towers = MORE_FAMILIES[family]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, **spec)
    plain = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    plain.save_pretrained(tmp_path)
    model = qlora.load_4bit(str(tmp_path), compute_dtype=torch.float32)
    assert type(model) is type(plain) and set(tower_paths(model)) == towers
    four_bit = {n for n, m in model.named_modules() if is_4bit(m)}
    assert four_bit and all(n.startswith(language_model + ".") for n in four_bit)
    saved = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if any(name.startswith(t + ".") for t in towers):
            assert p.dtype == torch.float32 and torch.equal(p, saved[name]), name
    assert "expert matrices stay" not in capsys.readouterr().out or family == "llama4"   # a tower has no experts
    qlora.add_lora(model, qlora.LoraConfig(target_modules="all-linear"))
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    assert adapted and all(n.startswith(language_model + ".") for n in adapted)
    ids = torch.randint(10, 90, (1, 8), generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(logits(model.eval(), {"input_ids": ids})).all()


@pytest.mark.parametrize("family", list(MORE_FAMILIES))
def test_the_chunked_loss_finds_the_body_of_every_family(family):
    """qlora's chunked head reads the hidden states of the language model's body (qlora.arch.heads.decoder): on
    Llama 4 get_decoder() is a Llama4ForCausalLM whose output has no hidden states, so the body is below it.
    Text-only input: the chunked loss = the model's own loss."""
    spec, _, _ = MORE_FAMILIES[family]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, **spec)
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(10, 90, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(qlora.causal_lm_loss(model, ids, ids, chunk_size=5),
                                   model(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-5)
