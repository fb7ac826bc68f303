"""4-bit mixture-of-experts matrices (qlora.quant.experts) on tiny random models of five families.

    .venv/bin/python -m pytest -q tests/qlora/quant/test_experts.py      (~10 s)

Reference: the plain transformers model (its own experts kernel) whose expert matrices were quantized and
dequantized with bitsandbytes' own functions (the whole 3-D tensor, flattened: bitsandbytes 0.50's CPU
kernel mis-scales matrices whose last dimension is shorter than a block).
"""
from __future__ import annotations

import copy

import pytest
import torch

import qlora
from qlora.arch.experts import expert_weight_names, is_experts_module
from qlora.quant import quant_settings, quantized_bytes, quantized_numel

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)
FAMILIES = {
    "mixtral": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "qwen3_moe": dict(intermediate_size=32, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[], head_dim=16, norm_topk_prob=True),
    "olmoe": dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2),
    # MLA attention, a shared expert, group-limited routing; the first layer dense
    "deepseek_v3": dict(intermediate_size=32, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                        num_hidden_layers=3, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16),
    # transposed [E, in, out] matrices, biases, interleaved gate/up with a clamped activation
    "gpt_oss": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
}


# beyond the five the issue names: no code of ours is written for any family (the experts interface's flags)
MORE_FAMILIES = {
    "qwen2_moe": dict(intermediate_size=32, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                      num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
    "phimoe": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),   # an nn.Linear router
    "glm4_moe": dict(intermediate_size=32, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1,
                     num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16),
    "granitemoe": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(intermediate_size=32, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
    "ernie4_5_moe": dict(intermediate_size=32, moe_intermediate_size=24, moe_num_experts=4, moe_k=2,
                         moe_layer_start_index=0, moe_num_shared_experts=1),
    "hunyuan_v1_moe": dict(intermediate_size=24, num_experts=4, moe_topk=2, head_dim=16),
    "dots1": dict(intermediate_size=32, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1,
                  num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16),
    "minimax": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    layer_types=["full_attention", "full_attention"]),
    "flex_olmo": dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2, pad_token_id=0),
    "jamba": dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2, attn_layer_period=1,
                  attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0, use_mamba_kernels=False),
    # issue 29's families that PEFT could not load (dense / shared MLP Linears named like the experts' tensors)
    "glm4_moe_lite": dict(intermediate_size=32, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1,
                          num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16,
                          q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "qwen3_next": dict(intermediate_size=32, moe_intermediate_size=24, shared_expert_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], head_dim=16,
                       layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                       linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4),
    "afmoe": dict(intermediate_size=32, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                  num_shared_experts=1, num_dense_layers=1, head_dim=16, n_group=1, topk_group=1,
                  layer_types=["full_attention", "full_attention"]),
    "exaone_moe": dict(intermediate_size=32, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                       num_shared_experts=1, first_k_dense_replace=1, head_dim=16, n_group=1, topk_group=1),
    # Qwen3.5-MoE's language model (what its image-text checkpoints hold): gated delta-net + full attention
    "qwen3_5_moe_text": dict(moe_intermediate_size=24, shared_expert_intermediate_size=32, num_experts=4,
                             num_experts_per_tok=2, head_dim=16, layer_types=["linear_attention", "full_attention"],
                             linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                             linear_value_head_dim=8, linear_conv_kernel_dim=4),
    # MLA attention, two attention+MLP sub-layers per layer, "zero experts" (identity experts past the routed ones)
    "longcat_flash": dict(num_layers=2, ffn_hidden_size=32, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                          qk_rope_head_dim=8, head_dim=8, v_head_dim=16, moe_topk=2, n_routed_experts=4,
                          zero_expert_num=2, expert_ffn_hidden_size=24),
    # a grouped output projection (an nn.Linear subclass whose forward reads weight.view(groups, ...)): it stays
    # float and out of all-linear (qlora.arch.quantized.runs_as_linear)
    "deepseek_v4": dict(moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                        head_dim=16, q_lora_rank=16, o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8,
                        index_topk=4, num_nextn_predict_layers=0, sliding_window=8, mlp_layer_types=["moe", "moe"]),
}


def tiny_moe(family: str, seed: int = 0):
    """A random fp32 CausalLM; routers and expert biases get non-trivial values (some inits are zeros)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **{**COMMON, **{**FAMILIES, **MORE_FAMILIES}[family]})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name or "mlp.gate" in name or name.endswith("_bias") or "e_score_correction" in name:
                p.normal_(0, 0.5)
    return model


def bnb_roundtrip(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True):
    import bitsandbytes.functional as F
    packed, state = F.quantize_4bit(w.reshape(-1), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)
    return F.dequantize_4bit(packed, state).view(w.shape)


def reference(model, **settings):
    """The plain model with every expert matrix replaced by bitsandbytes' quantize + dequantize of it, and
    every other Linear as qlora.quantize_model quantizes it (same codes: bitsandbytes' own layer)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if is_experts_module(m):
                for name in expert_weight_names(m):
                    getattr(m, name).copy_(bnb_roundtrip(getattr(m, name), **settings))
    return ref


@pytest.mark.parametrize("family", list(FAMILIES) + list(MORE_FAMILIES))
def test_4bit_experts_give_the_bnb_dequantized_models_logits(family):
    model = tiny_moe(family)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = reference(model)    # its Linear layers 4-bit as ours; its experts float, on transformers' own kernel
    qlora.quantize_model(ref, compute_dtype=torch.float32, skip_modules=["experts"])
    experts_before = {n: m for n, m in model.named_modules() if is_experts_module(m)}
    qlora.quantize_model(model, compute_dtype=torch.float32)
    assert experts_before, family
    for name, m in experts_before.items():
        for w in expert_weight_names(m):
            p = m.get_parameter(w)
            assert p.dtype == torch.uint8 and not p.requires_grad and p.quant_state.shape[0] == m.num_experts
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("settings", [dict(quant_type="fp4", blocksize=64, double_quant=True),
                                      dict(quant_type="nf4", blocksize=128, double_quant=False)])
def test_fp4_blocksize_and_no_double_quant(settings):
    model = tiny_moe("qwen3_moe")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = reference(model, **settings)
    qlora.quantize_model(ref, compute_dtype=torch.float32, skip_modules=["experts"], **settings)
    qlora.quantize_model(model, compute_dtype=torch.float32, **settings)
    assert quant_settings(model) == {**settings, "compute_dtype": "float32", "quantized_from_dtype": "float32"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=2e-6)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_bytes_and_settings_count_the_experts(family):
    model = tiny_moe(family)
    experts = [m for m in model.modules() if is_experts_module(m)]
    numel = sum(m.get_parameter(n).numel() for m in experts for n in expert_weight_names(m))
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    qlora.quantize_model(model, compute_dtype=torch.float32)
    assert quantized_numel(model) == numel + linear
    # the 4-bit arithmetic per matrix: n/2 codes + n/64 absmax bytes (uint8, double quant) + fp32 nested
    # absmax per 256 blocks + fp32 code books (16 + 256) + the fp32 offset
    want = 0
    for _, _, _, p in qlora.arch.quantized.four_bit_params(model):
        n = p.quant_state.shape.numel()
        want += n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4 * (16 + 256) + 4
    assert quantized_bytes(model) == want
    assert quant_settings(model) == {"quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                     "compute_dtype": "float32", "quantized_from_dtype": "float32"}


def test_experts_backward_keeps_no_weight_and_reaches_the_input():
    model = tiny_moe("mixtral")
    qlora.quantize_model(model, compute_dtype=torch.float32)
    experts = next(m for m in model.modules() if is_experts_module(m))
    x = torch.randn(5, 32, requires_grad=True)
    idx = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 1], [3, 0]])
    w = torch.softmax(torch.randn(5, 2), -1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = experts(x, idx, w)
    assert not any(t.dtype == torch.float32 and t.dim() == 3 for t in saved)  # no dequantized [k, a, b] kept
    y.sum().backward()
    # against the float experts on the dequantized weights, differentiated by autograd
    from qlora.quant.experts import dequantize_experts
    ref = copy.deepcopy(experts)
    ref.__dict__.pop("forward")
    for n in expert_weight_names(ref):
        ref._parameters[n] = torch.nn.Parameter(dequantize_experts(experts.get_parameter(n)), requires_grad=False)
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2, idx, w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_skip_modules_keeps_matching_experts_float():
    model = tiny_moe("mixtral")
    qlora.quantize_model(model, compute_dtype=torch.float32, skip_modules=["layers.0"])
    for name, m in model.named_modules():
        if is_experts_module(m):
            four_bit = [m.get_parameter(w).dtype == torch.uint8 for w in expert_weight_names(m)]
            assert four_bit == ([False, False] if ".layers.0." in name + "." else [True, True]), name


def test_a_shared_experts_single_output_gate_is_left_alone_like_a_router():
    """Qwen2-MoE's shared_expert_gate (Linear(H, 1)) scales the shared expert: not quantized, not in all-linear."""
    model = qlora.quantize_model(tiny_moe("qwen2_moe"), compute_dtype=torch.float32)
    gates = {n: m for n, m in model.named_modules() if n.endswith("shared_expert_gate")}
    assert gates and not any(qlora.quant.is_4bit(m) for m in gates.values())
    qlora.add_lora(model, qlora.LoraConfig(r=2, target_modules="all-linear"))
    assert not any(n.endswith("shared_expert_gate") for n in qlora.lora.lora_layers(model))


def test_experts_outside_the_interface_are_named_in_one_line(capsys):
    """Llama 4 text keeps its experts in a module transformers' experts interface does not describe: they stay
    float and quantize_model says which, with their bytes; a family inside the interface says nothing."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("llama4_text", **{**COMMON, "intermediate_size": 24, "intermediate_size_mlp": 32,
                                                 "num_local_experts": 4, "num_experts_per_tok": 1, "head_dim": 16,
                                                 "interleave_moe_layer_step": 1, "no_rope_layers": [1, 1],
                                                 "attention_chunk_size": 16})
    qlora.quantize_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), compute_dtype=torch.float32)
    said = capsys.readouterr().out
    size = 2 * 4 * (32 * 48 + 24 * 32) * 4                       # 2 layers x (gate_up [4, 32, 48] + down [4, 24, 32]) fp32
    assert said.startswith("note: 4 expert matrices stay float32 (") and f"{size / 1024:.2f} KiB" in said
    assert "model.layers.0.feed_forward.experts.gate_up_proj [4, 32, 48]" in said
    qlora.quantize_model(tiny_moe("qwen3_moe"), compute_dtype=torch.float32)
    assert capsys.readouterr().out == ""
