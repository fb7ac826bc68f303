"""GRPO's advantages and loss (qlora.objectives.grpo) against TRL's GRPOTrainer on the same batch.

    .venv/bin/python -m pytest -q tests/qlora/objectives/test_grpo.py      (~10 s)

TRL's own `GRPOTrainer._compute_loss` runs on a stand-in trainer whose model returns the given per-token
log-probs (everything else is TRL's code: ratios, clipping, KL, each loss type's reduction, its metrics);
advantages are checked against Python's statistics module per group. With num_iterations=2, TRL's real
GRPOTrainer trains a tiny qlora model twice on one sampled batch, and our log-probs and loss on that batch give
its loss on both steps.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from qlora.objectives.grpo import LOSS_TYPES, group_advantages, policy_loss


def trl_loss(logps, old, ref, adv, mask, *, loss_type, eps_low, eps_high, beta, max_len, bias_kl):
    rows, T = logps.shape
    accel = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                            reduce=lambda x, reduction="sum": x)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=bias_kl, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=accel, _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(rows, 3, dtype=torch.long), "prompt_mask": torch.ones(rows, 3),
              "completion_ids": torch.zeros(rows, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("beta, bias_kl", [(0.0, True), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_gradients_and_metrics_equal_trl(loss_type, beta, bias_kl):
    torch.manual_seed(0)
    rows, T = 6, 9
    mask = (torch.rand(rows, T) > 0.25).float()
    mask[:, 0] = 1
    old = -torch.rand(rows, T) * 3
    ref = old + 0.3 * torch.randn(rows, T)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    base = old + 0.4 * torch.randn(rows, T)              # ratios well outside [0.8, 1.28]: both clips are hit
    ours_in, theirs_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    ours, stats = policy_loss(ours_in, old, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                              beta=beta, ref_logps=ref, max_completion_length=T, tokens=mask.sum(),
                              use_bias_correction_kl=bias_kl)
    theirs, metrics = trl_loss(theirs_in, old, ref, adv, mask, loss_type=loss_type, eps_low=0.2, eps_high=0.28,
                               beta=beta, max_len=T, bias_kl=bias_kl)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-7)
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (["kl"] if beta else [])
    for name in names:
        assert float(stats[name]) == pytest.approx(metrics[name], abs=1e-6), name
    assert 0 < stats["clip_ratio/low_mean"] and 0 < stats["clip_ratio/high_mean"]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_are_the_group_relative_rewards(scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, float("nan"), 1.0, 0.0])       # 3 prompts x 3
    adv = group_advantages(rewards, num_generations=3, scale_rewards=scale)
    flat = [r for r in rewards.tolist() if r == r]
    for g in range(3):
        group = rewards[3 * g:3 * g + 3].tolist()
        seen = [r for r in group if r == r]
        mean = statistics.mean(seen)
        std = {"group": statistics.stdev(seen), "batch": statistics.stdev(flat), "none": 1.0}[scale]
        for i, r in enumerate(group):
            want = 0.0 if r != r else (r - mean) / (std + (1e-4 if scale != "none" else 0.0))
            assert adv.values[3 * g + i].item() == pytest.approx(want, abs=1e-6)
    if scale == "group":     # the middle group's rewards are all equal
        assert adv.frac_zero_std == pytest.approx(3 / 9)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w1"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w1", pad_token="w0", eos_token="w2")


def _reward_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_num_iterations_2_equals_trl_on_its_reused_batch(beta, tiny_llama, tmp_path):
    """TRL's GRPOTrainer with num_iterations=2 trains twice on one sampled batch, keeping the sampling policy's
    log-probs; on each of its steps, our completion_logps + policy_loss (with those old log-probs, its reference
    log-probs, its default use_bias_correction_kl) on TRL's very batch and model give TRL's loss: ratio 1 on the
    first step, not on the second."""
    import trl
    from accelerate.state import AcceleratorState
    from datasets import Dataset

    import qlora
    from qlora.objectives.grpo import completion_logps
    torch.manual_seed(0)
    model = qlora.add_lora(tiny_llama(), qlora.LoraConfig(r=4, target_modules="all-linear"))
    args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=4, num_iterations=2, beta=beta, learning_rate=5e-2, report_to=[],
                          use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, gradient_checkpointing=False)
    prompts = Dataset.from_list([{"prompt": f"w{3 + i} w{4 + i} w5"} for i in range(4)])    # one length: no padding
    seen = []
    try:
        AcceleratorState._reset_state(reset_partial_state=True)
        trainer = trl.GRPOTrainer(model=qlora.for_trainer(model), reward_funcs=_reward_length, args=args,
                                  train_dataset=prompts, processing_class=_tiny_tokenizer())
        theirs = trainer._compute_loss

        def compare(m, inputs):
            loss = theirs(m, inputs)
            P = inputs["prompt_ids"].shape[1]
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            comp = torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]], 1)
            with torch.no_grad():
                logps = completion_logps(model, ids, attn, comp)[:, P - 1:]
                ours, _ = policy_loss(logps, inputs["old_per_token_logps"], inputs["advantages"],
                                      inputs["completion_mask"], loss_type=args.loss_type, epsilon_low=args.epsilon,
                                      epsilon_high=args.epsilon_high, beta=beta,
                                      ref_logps=inputs.get("ref_per_token_logps"),
                                      max_completion_length=args.max_completion_length,
                                      tokens=inputs["num_items_in_batch"])
            seen.append((inputs["completion_ids"].clone(), inputs["old_per_token_logps"], logps, loss.detach(), ours))
            return loss
        trainer._compute_loss = compare
        trainer.train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert len(seen) == 2
    (ids1, old1, now1, trl1, ours1), (ids2, old2, now2, trl2, ours2) = seen
    assert torch.equal(ids1, ids2) and old1 is not None and old2 is old1            # one batch, used twice
    mask = (ids1 != 0).float()
    torch.testing.assert_close(now1 * mask, old1 * mask, rtol=0, atol=1e-5)          # step 1: the sampling policy
    assert ((now2 - old2).abs() * mask).max() > 1e-3                                 # step 2: it has moved
    torch.testing.assert_close(ours1, trl1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours2, trl2, rtol=1e-5, atol=1e-6)
