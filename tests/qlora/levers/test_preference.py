"""qlora.objectives.preference against TRL 1.16's DPOTrainer on the same batch, model and adapter weights.

    .venv/bin/python -m pytest -q tests/qlora/levers/test_preference.py      (~15 s)

The policy is a tiny 4-bit Llama with a random (non-zero) adapter; the reference is the same base with the
adapters disabled (qlora.train.hf.reference_model for TRL, qlora.disable_adapters for us). TRL tokenizes the
pairs and computes its loss with its own fused head; we score the same token ids with our chunked log-probs.
"""
from __future__ import annotations

import pytest
import torch

import qlora
from qlora.objectives.preference import preference_loss, sequence_logps
from tests.qlora.train.test_hf import qlora_model, tiny_folder  # noqa: F401  (tiny_folder: a fixture)

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]


def trl_trainer(model, loss_type, tmp_path, label_smoothing=0.0):
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from qlora.train.hf import reference_model
    vocab = {f"w{i}": i for i in range(96)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w1", pad_token="w0", eos_token="w2")
    data = Dataset.from_list([{"prompt": f"w{3 + i} w{4 + i} w5" + " w6" * i, "chosen": f" w{7 + i} w8" + " w9" * (i % 3),
                               "rejected": f" w{20 + i} w21"} for i in range(4)])
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                     disable_tqdm=True, gradient_checkpointing=False, loss_type=[loss_type], beta=0.3,
                     label_smoothing=label_smoothing)
    AcceleratorState._reset_state(reset_partial_state=True)
    return DPOTrainer(model=qlora.for_trainer(model), ref_model=reference_model(model), args=args,
                      train_dataset=data, processing_class=tok)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_loss_and_rewards_equal_trls(loss_type, eps, tmp_path, tiny_folder):  # noqa: F811  (the fixture)
    from accelerate.state import AcceleratorState
    model = qlora_model(tiny_folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    try:
        trainer = trl_trainer(model, loss_type, tmp_path, eps)
        batch = next(iter(trainer.get_train_dataloader()))
        model.eval()
        want = trainer.compute_loss(model, batch).item()
        metrics = {k: v[-1] for mode in ("train", "eval") for k, v in trainer._metrics[mode].items() if v}
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        logps, counts = sequence_logps(model, ids, mask, completion, chunk_size=7)
        with qlora.disable_adapters(model):
            ref, _ = sequence_logps(model, ids, mask, completion, chunk_size=7)
    loss, chosen, rejected = preference_loss(logps, ref, counts, loss_type=loss_type, beta=0.3, label_smoothing=eps)
    assert abs(loss.item() - want) < 1e-5, (loss.item(), want)
    assert abs(chosen.mean().item() - metrics["rewards/chosen"]) < 1e-5
    assert abs(rejected.mean().item() - metrics["rewards/rejected"]) < 1e-5
    assert abs((chosen > rejected).float().mean().item() - metrics["rewards/accuracies"]) < 1e-6


def test_the_reference_is_the_base_and_the_chunked_logps_have_gradients(tiny_folder):  # noqa: F811
    model = qlora_model(tiny_folder)
    base = qlora.load_4bit(str(tiny_folder), compute_dtype=torch.float32).eval()
    ids = torch.randint(1, 96, (4, 9), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros_like(ids)
    completion[:, 5:] = 1
    with torch.no_grad():
        with qlora.disable_adapters(model):
            ref, counts = sequence_logps(model, ids, None, completion)
        logits = base(input_ids=ids).logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(ref, (logits * completion[:, 1:]).sum(1), rtol=0, atol=1e-5)
    assert counts.tolist() == [4, 4, 4, 4]
    logps, _ = sequence_logps(model, ids, None, completion, chunk_size=3)
    loss, _, _ = preference_loss(logps, ref, counts, loss_type="sigmoid")
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    simpo, _, _ = preference_loss(logps.detach(), None, counts, loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    chosen, rejected = (logps.detach() / 4).chunk(2)
    torch.testing.assert_close(simpo, -torch.nn.functional.logsigmoid(2.0 * (chosen - rejected) - 0.5).mean())
    with pytest.raises(qlora.QLoRAError, match="loss_type"):
        preference_loss(logps, ref, counts, loss_type="kto")


def test_label_smoothing_is_conservative_dpo():
    """sigmoid with ε: the cDPO formula (TRL 1.16 dropped ε from its sigmoid; at ε = 0 the two are TRL's)."""
    logps, ref = torch.tensor([-3.0, -5.0, -4.0, -2.0]), torch.tensor([-3.5, -4.0, -4.5, -2.5])
    counts = torch.tensor([3, 4, 5, 2])
    delta = (logps[:2] - ref[:2]) - (logps[2:] - ref[2:])
    F = torch.nn.functional
    want = (-(0.9) * F.logsigmoid(0.5 * delta) - 0.1 * F.logsigmoid(-0.5 * delta)).mean()
    got, _, _ = preference_loss(logps, ref, counts, loss_type="sigmoid", beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(got, want)
    with pytest.raises(qlora.QLoRAError, match="label_smoothing"):
        preference_loss(logps, ref, counts, loss_type="robust", label_smoothing=0.5)


def test_a_moe_asking_for_router_logits_adds_the_aux_loss_to_the_preference_loss():
    """config.output_router_logits: preference_step adds router_aux_loss_coef x the model's own load-balancing
    loss of the policy pass (the model's own forward's aux_loss on the same rows), logged as aux_loss."""
    from qlora.objectives.preference import preference_step
    from tests.qlora.quant.test_experts import tiny_moe
    model = tiny_moe("qwen3_moe")
    model.config.output_router_logits = True
    qlora.add_lora(model, qlora.LoraConfig(r=2, target_modules="all-linear"))
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros_like(ids)
    completion[:, 6:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
    with torch.no_grad():
        loss = preference_step(model, batch, chunk_size=3)
        own = model(**batch_without(batch, "completion_mask")).aux_loss
        model.config.output_router_logits = False
        plain = preference_step(model, batch, chunk_size=3)
    torch.testing.assert_close(loss.metrics["aux_loss"], own)
    torch.testing.assert_close(loss, plain + model.config.router_aux_loss_coef * own)
    assert "aux_loss" not in plain.metrics and "rewards/margins" in loss.metrics


def batch_without(batch, key):
    return {k: v for k, v in batch.items() if k != key}
