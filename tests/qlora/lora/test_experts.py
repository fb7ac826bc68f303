"""LoRA on every expert (qlora.lora.experts) against PEFT 0.21's `target_parameters`, both ways.

    .venv/bin/python -m pytest -q tests/qlora/lora/test_experts.py      (~20 s)

The base for PEFT is the plain transformers model whose expert matrices hold bitsandbytes' quantize +
dequantize of ours (what our 4-bit experts compute with); the Linear layers stay float in both (tiny
layers narrower than a quantization block are not what this file tests).

Targets: the attention projections and every expert matrix. Not the dense / shared-expert MLP Linears
named gate_proj / up_proj / down_proj: on the families transformers converts like qwen2_moe (DeepSeek-V2/V3,
GLM-4-MoE, Qwen3-MoE, OLMoE, ...) PEFT 0.21 rewrites every such target into the fused experts' parameters
(its v4 -> v5 adapter conversion, peft/utils/transformers_weight_conversion.py), whatever the file says,
so PEFT cannot load (or create) adapters on those Linears for these models; ours train them.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qlora
import qlora.arch.experts
from qlora.arch.experts import expert_weight_names, is_experts_module, is_router
from qlora.arch.quantized import runs_as_linear
from qlora.lora.experts import LoRAExperts
from tests.qlora.quant.test_experts import FAMILIES, MORE_FAMILIES, reference, tiny_moe

pytestmark = [pytest.mark.usefixtures("single_thread"),   # PEFT reads the deprecated is_gradient_checkpointing
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


MLP_NAMES = {"gate_proj", "up_proj", "down_proj", "gate", "lm_head"}


def targets(model) -> tuple[list[str], list[str]]:
    """(the Linear layers to adapt, every expert matrix), as full paths."""
    parents = dict(model.named_modules())
    linears = [n for n in linear_names(model) if n.rpartition(".")[2] not in MLP_NAMES
               and not is_router(parents[n], parents[n.rpartition(".")[0]]) and runs_as_linear(parents[n])]
    matrices = [f"{n}.{w}" for n, m in model.named_modules() if is_experts_module(m) for w in expert_weight_names(m)]
    return linears, matrices


def qlora_moe(family: str, init=False):
    """(our model: 4-bit experts + LoRA r=4 on the attention and every expert matrix, the PEFT base)."""
    model = tiny_moe(family)
    base = reference(model)
    qlora.quantize_model(model, compute_dtype=torch.float32, skip_modules=linear_names(model))
    linears, matrices = targets(model)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules=linears + matrices,
                                           init_lora_weights=init))
    return model, base


def peft_config(model):
    from peft import LoraConfig
    linears, matrices = targets(model)
    return LoraConfig(r=4, lora_alpha=8, target_modules=linears, target_parameters=matrices, init_lora_weights=False)


@pytest.mark.parametrize("family", list(FAMILIES) + list(MORE_FAMILIES))
def test_peft_loads_our_adapter_and_gives_our_logits(family, tmp_path):
    from peft import PeftModel
    model, base = qlora_moe(family)
    experts = [m for m in qlora.lora.lora_layers(model).values() if isinstance(m, LoRAExperts)]
    assert len(experts) == 2 * sum(is_experts_module(m) for m in model.modules())
    qlora.save_adapter(model, tmp_path / "ours")
    peft = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        ours, theirs = model(IDS).logits, peft(IDS).logits
        with qlora.disable_adapters(model):
            plain = model(IDS).logits
    assert (ours - plain).abs().max() > 1e-2                   # the adapter does something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_our_files_are_what_peft_writes(family, tmp_path):
    from peft import get_peft_model
    from safetensors import safe_open
    model, base = qlora_moe(family)
    qlora.save_adapter(model, tmp_path / "ours")
    get_peft_model(tiny_moe(family), peft_config(base)).save_pretrained(tmp_path / "peft")

    def shapes(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes(tmp_path / "ours") == shapes(tmp_path / "peft")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_we_load_a_peft_written_adapter(family, tmp_path):
    from peft import get_peft_model
    float_model = reference(tiny_moe(family))
    torch.manual_seed(5)
    peft = get_peft_model(copy.deepcopy(float_model), peft_config(float_model)).eval()
    peft.save_pretrained(tmp_path / "peft")
    model = tiny_moe(family)
    qlora.quantize_model(model, compute_dtype=torch.float32, skip_modules=linear_names(model))
    qlora.load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, peft(IDS).logits, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", list(FAMILIES) + list(MORE_FAMILIES))
def test_training_lowers_the_loss_and_moves_every_experts_adapter(family):
    model, _ = qlora_moe(family, init=True)
    qlora.prepare_for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    layers = [m for m in qlora.lora.lora_layers(model).values() if isinstance(m, LoRAExperts)]
    before = [m.lora_B.detach().clone() for m in layers]
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    model.train()
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01 and all(b < a for a, b in zip(losses, losses[1:])), losses
    for layer, b0 in zip(layers, before):      # B starts at 0: each expert's B moved, for every expert
        moved = (layer.lora_B.detach() - b0).flatten(1).abs().amax(1)
        assert (moved > 0).all(), moved


def test_merge_unmerge_and_unload_on_float_experts():
    model = tiny_moe("olmoe")
    original = copy.deepcopy(model)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules=["experts"], init_lora_weights=False))
    layers = qlora.lora.lora_layers(model)
    assert sorted(n.rpartition(".")[2] for n in layers) == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]
    with torch.no_grad():
        adapted = model(IDS).logits
        qlora.merge_lora(model)
        torch.testing.assert_close(model(IDS).logits, adapted, rtol=0, atol=2e-5)
        qlora.unmerge_lora(model)
        with qlora.disable_adapters(model):
            torch.testing.assert_close(model(IDS).logits, original(IDS).logits, rtol=0, atol=1e-5)
        qlora.unload_lora(model)             # merged into the float experts; transformers' forward back
        assert not any("forward" in m.__dict__ for m in model.modules() if is_experts_module(m))
        torch.testing.assert_close(model(IDS).logits, adapted, rtol=0, atol=2e-5)


def test_4bit_experts_refuse_an_in_place_merge():
    model, _ = qlora_moe("mixtral")
    with pytest.raises(qlora.QLoRAError, match="4-bit experts"):
        qlora.merge_lora(model)


def test_a_router_with_its_own_forward_is_refused_in_one_line():
    model = tiny_moe("phimoe")
    qlora.add_lora(model, qlora.LoraConfig(r=2, target_modules="all-linear"))      # all-linear leaves routers out
    assert not any("router" in n for n in qlora.lora.lora_layers(model))
    with pytest.raises(qlora.QLoRAError, match="router with a forward of its own"):
        qlora.add_lora(tiny_moe("phimoe"), qlora.LoraConfig(r=2, target_modules=["router"]))


@pytest.mark.parametrize("family", list(FAMILIES) + list(MORE_FAMILIES))
def test_an_all_linear_adapter_loads_in_peft_with_our_logits(family, tmp_path, capsys):
    """target_modules="all-linear" as a user writes it. In the families whose checkpoints store each expert's
    gate/up/down separately (DeepSeek, GLM-4-MoE, ERNIE, HunYuan, dots1, Qwen2-MoE, ...), PEFT maps any target of
    those names onto the fused experts, so the dense / shared-expert MLP Linears of those names are left out (one
    line) and PEFT loads the adapter with our logits; before, it crashed on 11 families (size mismatch)."""
    from peft import PeftModel
    model = tiny_moe(family)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    said = capsys.readouterr().out
    clash = qlora.arch.experts.per_expert_names(model)       # e.g. gate_proj / up_proj / down_proj (DeepSeek-V4: w1-w3)
    dense = [n for n, m in tiny_moe(family).named_modules() if isinstance(m, nn.Linear)
             and n.rpartition(".")[2] in clash and ".experts." not in n]
    assert ("all-linear:" in said) == bool(dense), said
    assert not any(n in qlora.lora.lora_layers(model) for n in dense)
    qlora.save_adapter(model, tmp_path / "ours")
    peft = PeftModel.from_pretrained(tiny_moe(family), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, peft(IDS).logits, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "dots1"])
def test_peft_s_own_2r_experts_convention_loads_both_ways(family, tmp_path):
    """A PEFT user names gate_proj/up_proj/down_proj: PEFT turns that into target_parameters with the fused
    gate_up_proj at rank 2r and alpha 2a (rank_pattern / alpha_pattern). qlora reads it (per-module rank, PEFT's
    pattern rule) onto its 4-bit experts with PEFT's logits, and what qlora writes back loads in PEFT the same."""
    from peft import LoraConfig, PeftModel, get_peft_model
    float_model = reference(tiny_moe(family))
    torch.manual_seed(5)
    peft = get_peft_model(copy.deepcopy(float_model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=False)).eval()
    assert peft.peft_config["default"].rank_pattern == {r".*\.gate_up_proj": 8}
    peft.save_pretrained(tmp_path / "peft")
    model = tiny_moe(family)
    qlora.quantize_model(model, compute_dtype=torch.float32, skip_modules=linear_names(model))
    qlora.load_adapter(model, tmp_path / "peft")
    ranks = {n: layer.r for n, layer in qlora.lora.lora_layers(model).items()}
    assert {r for n, r in ranks.items() if "gate_up_proj" in n} == {8} and {r for n, r in ranks.items() if "q_proj" in n} == {4}
    with torch.no_grad():
        want = peft(IDS).logits
        torch.testing.assert_close(model(IDS).logits, want, rtol=0, atol=2e-5)
    qlora.save_adapter(model, tmp_path / "ours")
    again = PeftModel.from_pretrained(copy.deepcopy(float_model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, want, rtol=0, atol=2e-5)
