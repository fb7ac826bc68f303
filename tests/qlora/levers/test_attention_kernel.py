"""Attention on qlora's training path keeps no [seq, seq] tensor: what sdpa receives, and the kernel it picks.

transformers' sdpa integration passes no mask and is_causal=True when nothing is padded (no mask, or an
all-ones one), and then sets enable_gqa (K/V not repeated to all heads). With that, torch picks its
flash kernel (CPU and CUDA), which works in tiles and keeps only the log-sum-exp per row for backward.
A padded batch does get a 4-D [B, 1, S, S] boolean mask (S² bytes per sequence): for long context, pack
sequences without padding (batch 1).
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

import qlora
from qlora.objectives.losses import causal_lm_loss


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every call of torch's sdpa from transformers' integration: (mask, is_causal, enable_gqa, backend)."""
    import transformers.integrations.sdpa_attention as integration
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        backend = SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                     is_causal=is_causal, scale=scale, enable_gqa=enable_gqa))
        calls.append((None if attn_mask is None else tuple(attn_mask.shape), is_causal, enable_gqa, backend))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)
    monkeypatch.setattr(integration.torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("mask", [None, "ones"])
def test_training_step_uses_a_causal_kernel_without_a_mask(tiny_llama, sdpa_calls, mask):
    model = tiny_llama(attn_implementation="sdpa")
    qlora.add_lora(model, qlora.LoraConfig(r=4, target_modules="all-linear"))
    qlora.prepare_for_training(model)
    model.train()
    ids = torch.randint(1, 96, (1, 48), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids) if mask == "ones" else None
    causal_lm_loss(model, ids, ids, attention_mask, chunk_size=16).backward()
    assert len(sdpa_calls) == 4                         # 2 layers, forward + recompute
    assert set(sdpa_calls) == {(None, True, True, SDPBackend.FLASH_ATTENTION)}


def test_padding_materialises_a_square_mask(tiny_llama, sdpa_calls):
    """The documented exception: a padded row makes transformers build the [B, 1, S, S] mask."""
    model = tiny_llama(attn_implementation="sdpa")
    ids = torch.randint(1, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    assert sdpa_calls and all(c[0] == (2, 1, 32, 32) and c[1] is False for c in sdpa_calls)
