"""GRPO's advantages and loss (qlora.objectives.grpo) against TRL's GRPOTrainer on the same batch.

    .venv/bin/python -m pytest -q tests/qlora/objectives/test_grpo.py      (~5 s)

TRL's own `GRPOTrainer._compute_loss` runs on a stand-in trainer whose model returns the given per-token
log-probs (everything else is TRL's code: ratios, clipping, KL, each loss type's reduction, its metrics);
advantages are checked against Python's statistics module per group.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from qlora.objectives.grpo import LOSS_TYPES, group_advantages, policy_loss


def trl_loss(logps, old, ref, adv, mask, *, loss_type, eps_low, eps_high, beta, max_len):
    rows, T = logps.shape
    accel = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                            reduce=lambda x, reduction="sum": x)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=accel, _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(rows, 3, dtype=torch.long), "prompt_mask": torch.ones(rows, 3),
              "completion_ids": torch.zeros(rows, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_gradients_and_metrics_equal_trl(loss_type, beta):
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
                              beta=beta, ref_logps=ref, max_completion_length=T, tokens=mask.sum())
    theirs, metrics = trl_loss(theirs_in, old, ref, adv, mask, loss_type=loss_type, eps_low=0.2, eps_high=0.28,
                               beta=beta, max_len=T)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-7)
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (["kl"] if beta else [])
    for name in names:
        assert stats[name] == pytest.approx(metrics[name], abs=1e-6), name
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
