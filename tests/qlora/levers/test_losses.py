"""Chunked linear + cross-entropy equals the unchunked loss and its gradients, and holds less memory."""
import pytest
import torch
import torch.nn.functional as F

import qlora
from qlora.objectives.losses import causal_lm_loss, chunked_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_full_cross_entropy_fp32(chunk):
    torch.manual_seed(0)
    h = torch.randn(150, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (150,))
    y[::5] = -100                                                   # ignored positions
    loss = chunked_cross_entropy(h, w, y, chunk_size=chunk)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))                # a non-unit upstream gradient
    ref = F.cross_entropy(h @ w.T, y)
    rh, rw = torch.autograd.grad(ref * 3.0, (h, w))
    assert torch.allclose(loss, ref, atol=1e-6, rtol=1e-6)
    assert torch.allclose(gh, rh, atol=1e-6)
    assert torch.allclose(gw, rw, atol=1e-6)


def test_bf16_matches_upcast_reference():
    torch.manual_seed(0)
    h = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(100, 32, dtype=torch.bfloat16)                  # frozen head: no weight gradient
    y = torch.randint(0, 100, (64,))
    loss = chunked_cross_entropy(h, w, y, chunk_size=16)
    (gh,) = torch.autograd.grad(loss, (h,))
    ref = F.cross_entropy((h @ w.T).float(), y)                     # what transformers' loss does
    (rh,) = torch.autograd.grad(ref, (h,))
    assert gh.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(gh.float(), rh.float(), atol=1e-3, rtol=1e-2)


def test_causal_lm_loss_equals_model_loss(tiny_llama):
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    ours = causal_lm_loss(model, ids, labels, chunk_size=5)
    theirs = model(input_ids=ids, labels=labels).loss
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_peak_is_one_chunk_not_all_logits():
    from memprofile.peak import CpuPeakTracker
    torch.manual_seed(0)
    n, hdim, vocab = 512, 32, 4000
    h = torch.randn(n, hdim, requires_grad=True)
    w = torch.randn(vocab, hdim)
    y = torch.randint(0, vocab, (n,))

    def peak(fn):
        t = CpuPeakTracker()
        t.start()
        fn().backward()
        t.stop()
        return t.max_increase()
    full = peak(lambda: F.cross_entropy(h @ w.T, y))
    chunked = peak(lambda: chunked_cross_entropy(h, w, y, chunk_size=64))
    logits_bytes = n * vocab * 4
    assert full >= 2 * logits_bytes                # logits + their softmax/gradient
    assert chunked < logits_bytes / 2              # about one [64, vocab] chunk plus grad_hidden


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_moe_asking_for_router_logits_gets_the_aux_loss_and_train_logs_it(family, tmp_path):
    """config.output_router_logits: the chunked loss adds router_aux_loss_coef x the model's own load-balancing
    loss, the value model(..., labels=).loss has; qlora.train logs it as aux_loss."""
    import json

    import qlora
    from qlora.train import TrainConfig, train
    from tests.qlora.quant.test_experts import tiny_moe
    model = tiny_moe(family)
    model.config.output_router_logits = True
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    own = model(input_ids=ids, labels=ids)
    ours = causal_lm_loss(model, ids, ids, chunk_size=5)
    torch.testing.assert_close(ours, own.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.metrics["aux_loss"], own.aux_loss)
    qlora.add_lora(model, qlora.LoraConfig(r=2, target_modules="all-linear"))
    data = [{"input_ids": ids[i % 2]} for i in range(4)]

    def collate(rows):
        x = torch.stack([r["input_ids"] for r in rows])
        return {"input_ids": x, "labels": x}
    train(model, data, collate, lambda m, b: causal_lm_loss(m, b["input_ids"], b["labels"]),
          TrainConfig(batch_size=2, max_steps=2, log_every=1, out_dir=str(tmp_path), progress=False))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["aux_loss"] > 0 for r in rows if "loss" in r] == [True, True]


@pytest.mark.parametrize("family,extra", [("gemma2", dict(final_logit_softcapping=2.0, head_dim=16)),
                                          ("cohere", dict(logit_scale=0.25)), ("granite", dict(logits_scaling=4.0))])
def test_models_that_scale_or_cap_their_logits_get_their_own_values(family, extra):
    """The chunked head would skip the model's logit scale / soft-cap: those models use their own forward, and
    the loss and the preference log-probs are the model's."""
    import transformers

    from qlora.objectives.preference import sequence_logps
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(family, vocab_size=128, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            initializer_range=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                            **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        torch.testing.assert_close(causal_lm_loss(model, ids, ids), model(input_ids=ids, labels=ids).loss)
        mask = torch.ones_like(ids)
        want = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)
        torch.testing.assert_close(sequence_logps(model, ids, None, mask)[0], want, rtol=1e-5, atol=1e-4)


def test_llama4_text_the_decoder_below_its_head_is_found():
    """Llama4ForCausalLM.get_decoder() is the model itself (its base model is named language_model but lives
    in `model`): the chunked loss finds the decoder by one rule (qlora.arch.heads.decoder) and equals the model's
    own loss on the 4-bit model; the router (an nn.Linear returning scores and indices) stays float."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama4_text", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, intermediate_size=24, intermediate_size_mlp=32, head_dim=16,
                               num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                               no_rope_layers=[1, 1], attention_chunk_size=16, tie_word_embeddings=False)
    model = qlora.quantize_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), compute_dtype=torch.float32)
    assert not qlora.quant.is_4bit(model.model.layers[0].feed_forward.router)
    qlora.add_lora(model, qlora.LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = qlora.causal_lm_loss(model, ids, ids, chunk_size=5)
    torch.testing.assert_close(ours, model(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
    ours.backward()
