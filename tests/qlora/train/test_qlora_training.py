"""QLoRA end to end on a tiny Llama: LoRA on 4-bit layers matches LoRA on the dequantized weights,
training brings the loss down, and the packed 4-bit weights never change."""
import copy

import torch
from torch import nn

import qlora
from qlora.quant import dequantize_weight


def _qlora_model(tiny_llama, compute_dtype):
    model = tiny_llama()
    qlora.quantize_model(model, compute_dtype=compute_dtype)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model


def test_adapters_default_to_bf16_on_a_4bit_base_and_record_settings(tiny_llama):
    model = _qlora_model(tiny_llama, torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    assert layer.lora_A.weight.dtype == torch.bfloat16 and layer.lora_B.weight.dtype == torch.bfloat16
    facts = model.qlora_config.qlora
    assert facts["quant_type"] == "nf4" and facts["blocksize"] == 64 and facts["double_quant"] is True
    assert "model.layers.0.self_attn.q_proj" in facts["quantized_modules"]


def test_qlora_equals_lora_on_a_bf16_copy_of_the_dequantized_base(tiny_llama, token_ids):
    model = _qlora_model(tiny_llama, torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    # the reference: every 4-bit layer replaced by a bf16 nn.Linear holding dequant(quant(W)),
    # with the very same adapters beside it
    reference = copy.deepcopy(model).to(torch.bfloat16)
    for name, module in list(reference.named_modules()):
        if type(module).__name__ == "Linear4bit":
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=torch.bfloat16)
            with torch.no_grad():
                plain.weight.copy_(dequantize_weight(module).to(torch.bfloat16))
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, plain)
    assert not any(type(m).__name__ == "Linear4bit" for m in reference.modules())
    with torch.no_grad():
        got = model(token_ids).logits.float()
        want = reference(token_ids).logits.float()
        with qlora.disable_adapters(reference):
            without = reference(token_ids).logits.float()
    rel = ((got - want).norm() / want.norm()).item()
    effect = ((want - without).norm() / want.norm()).item()
    print(f"\nQLoRA vs LoRA on the dequantized bf16 base: relative logit error {rel:.2e} "
          f"(the adapters change the logits by {effect:.2e})")
    assert rel < 2e-2                     # bf16 rounding level, not a different model
    # and far below what the adapters do: a QLoRA forward that dropped (or mis-scaled) them would fail
    assert rel < effect / 5, (rel, effect)


def test_thirty_qlora_steps_bring_the_loss_down_and_leave_4bit_bytes_identical(tiny_llama):
    torch.manual_seed(0)
    model = _qlora_model(tiny_llama, torch.float32)
    # The random head (std 0.02) after the final RMSNorm caps every logit near 0.7, so no adapter
    # could fit anything; a larger frozen head lets the adapters show what they learn.
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    packed = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
              for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"\n30 QLoRA steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.5 * losses[0]
    for name, module in model.named_modules():
        if name in packed:
            weight, absmax = packed[name]
            assert torch.equal(module.weight.data, weight), name
            assert torch.equal(module.weight.quant_state.absmax, absmax), name
            assert not module.weight.requires_grad
