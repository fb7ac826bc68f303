"""Group-relative policy optimisation (GRPO and its variants): advantages from rewards, the clipped loss.

    adv = group_advantages(rewards, num_generations=G)                 # rewards [B*G] -> advantages [B*G]
    logps = completion_logps(model, input_ids, attention_mask, completion_mask)    # [rows, L-1], chunked head
    loss, stats = policy_loss(logps, None, adv.values, completion_mask[:, 1:], loss_type="dapo")

Definitions (TRL's GRPOTrainer, whose numbers these equal on its own batches: tests/qlora/objectives):
  advantages   A_i = r_i - mean(r over i's group of G completions), divided by std + 1e-4 unless
               scale_rewards="none" (std over the group, or over the whole batch for "batch"; Bessel-corrected,
               NaN rewards -- a completion no reward function scored -- left out of both and given A = 0)
  ratio        rho_t = exp(logp_t - old_logp_t)       (old: the policy that sampled; = logp, detached, when
               each batch is used once: num_iterations = 1)
  token loss   l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * kl_t,
               kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (k3 estimator, Schulman 2020), times rho_t
               when use_bias_correction_kl (TRL's default since 1.x: the unbiased reverse-KL gradient of
               DeepSeek-V3.2; rho_t = 1 in value when on-policy, but it changes the gradient)
  reductions   grpo     mean over sequences of (sum_t l_t m_t / sum_t m_t)              (Shao et al. 2024)
               bnpo     sum l m / sum m over the micro-batch
               dr_grpo  sum l m / (rows * max_completion_length)                       (Liu et al. 2025)
               dapo     sum l m / tokens, `tokens` = completion tokens of the whole generation batch
                        (so micro-batches add up to the token mean)                    (Yu et al. 2025)
Shapes: logps, old_logps, ref_logps, mask [rows, T] (completion tokens only), advantages [rows].
`completion_logps` gives log p of every completion token through the chunked head (never the [rows, L, vocab]
logits: qlora.objectives.preference.scored_logps), 0 elsewhere, aligned with completion_mask[:, 1:].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora.objectives.preference import scored_logps

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN where fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    n = (~torch.isnan(x)).sum(dim=dim)
    return torch.sqrt(torch.where(n > 1, var * n / (n - 1), torch.full_like(var, float("nan"))))


@dataclass
class Advantages:
    values: torch.Tensor         # [N] the advantages (0 for unscorable completions)
    std: torch.Tensor            # [N] the std each was scaled by (group or batch)
    frac_zero_std: float         # share of completions whose group (or batch) rewards were all equal


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> Advantages:
    """rewards [N = prompts * num_generations], each prompt's completions adjacent -> Advantages."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: use one of {', '.join(SCALE_REWARDS)}")
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = nanstd(groups, dim=1).repeat_interleave(num_generations) if num_generations > 1 \
            else torch.zeros_like(rewards)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    zero = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
    return Advantages(torch.nan_to_num(adv, nan=0.0), std, zero)


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                     chunk_size: int = 256, last_scored: int | None = None) -> torch.Tensor:
    """[rows, L-1] fp32: log p(input_ids[:, t+1] | ...) where completion_mask[:, t+1] is 1, else 0.
    `last_scored`: a fake-tensor trace's count of scored positions (qlora.objectives.preference.scored_logps)."""
    values, _, scored = scored_logps(model, input_ids, attention_mask, completion_mask, chunk_size,
                                     last_scored=last_scored)
    if values.shape[0] == scored.numel():          # every position scored (as a fake trace scores them)
        return values.view(scored.shape)
    return values.new_zeros(scored.shape).masked_scatter(scored, values)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor (no device sync here; a fake-tensor trace has no value to give)."""
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).detach()


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *,
                loss_type: str = "dapo", epsilon_low: float = 0.2, epsilon_high: float | None = None,
                beta: float = 0.0, ref_logps: torch.Tensor | None = None, max_completion_length: int | None = None,
                tokens: torch.Tensor | float | None = None, use_bias_correction_kl: bool = True
                ) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch (see the module docstring) and its statistics with TRL's names
    (`kl`, `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    adv = advantages.unsqueeze(1)                                     # [rows, 1]
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)               # [rows, T]
    stats = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps (the reference policy's log-probs)")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask)                  # TRL logs the corrected one
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    else:
        total = mask.sum() if tokens is None else torch.as_tensor(tokens, dtype=logps.dtype)
        loss = (per_token * mask).sum() / total.clamp(min=1.0)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
        stats["clip_ratio/low_mean"] = _masked_mean(low, mask)
        stats["clip_ratio/high_mean"] = _masked_mean(high, mask)
        stats["clip_ratio/region_mean"] = _masked_mean(torch.clamp(low + high, max=1.0), mask)
    return loss, stats
