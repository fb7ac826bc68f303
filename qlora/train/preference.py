"""Preference objectives on one 4-bit base: DPO and its relatives from sequence log-probabilities.

    logps, n = sequence_logps(model, input_ids, attention_mask, completion_mask)   # chosen rows, then rejected
    with qlora.disable_adapters(model), torch.no_grad():
        ref_logps, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)   # the same base: no 2nd model
    loss, chosen_rewards, rejected_rewards = preference_loss(logps, ref_logps, n, loss_type="sigmoid", beta=0.1)

`sequence_logps` sums log p(token | prefix) over each row's completion tokens with the LM head applied in chunks
of `chunk_size` selected positions, each chunk recomputed in backward (torch.utils.checkpoint): the step never
holds the [rows, seq, vocab] logits, only the [completion tokens, hidden] states. The batch layout is TRL's
(DPOTrainer): the chosen rows, then the rejected rows, `completion_mask` 1 on response tokens.

Objectives (`loss_type`, TRL's names and formulas, TRL 1.16):
- "sigmoid" (DPO, Rafailov et al. 2023, arXiv:2305.18290): -log σ(β·((π_c - ref_c) - (π_r - ref_r)));
- "ipo" (Azar et al. 2023, arXiv:2310.12036): ((π_c - ref_c)/n_c - (π_r - ref_r)/n_r - 1/(2β))², the
  length-normalised form TRL uses;
- "simpo" (Meng et al. 2024, arXiv:2405.14734; reference-free, TRL's CPOTrainer): -log σ(β·(π_c/n_c - π_r/n_r) - γ),
  γ = `simpo_gamma`; no reference pass at all.
Rewards (what TRL logs as rewards/chosen, rewards/rejected): β·(π - ref) (SimPO: β·π/n).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora.errors import QLoRAError

LOSS_TYPES = ("sigmoid", "ipo", "simpo")
REFERENCE_FREE = ("simpo",)


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T                                         # [c, V]: one chunk's logits only
    return logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   completion_mask: torch.Tensor, chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p over each row's completion tokens [N] fp32, completion token counts [N]). Token t+1 is scored
    by position t, where completion_mask[t+1] is 1."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None or head.weight.dtype == torch.uint8:
        raise QLoRAError("sequence_logps needs a plain (or frozen float) lm_head without bias")
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False).last_hidden_state            # [N, L, H]
    scored = completion_mask[:, 1:].bool()                                  # [N, L-1]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(scored)[scored]   # [M]
    states = hidden[:, :-1][scored]                                         # [M, H]: completion positions only
    targets = input_ids[:, 1:][scored]                                      # [M]
    weight = head.weight
    pieces = [checkpoint(_chunk_logps, states[i:i + chunk_size], weight, targets[i:i + chunk_size],
                         use_reentrant=False) if torch.is_grad_enabled() else
              _chunk_logps(states[i:i + chunk_size], weight, targets[i:i + chunk_size])
              for i in range(0, states.shape[0], chunk_size)]
    token_logps = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
    sums = token_logps.new_zeros(input_ids.shape[0]).index_add(0, rows, token_logps)
    return sums, scored.sum(1)


def preference_loss(logps: torch.Tensor, ref_logps: torch.Tensor | None, counts: torch.Tensor, *,
                    loss_type: str = "sigmoid", beta: float = 0.1, simpo_gamma: float = 0.5):
    """(mean loss, chosen rewards [B], rejected rewards [B]) from the rows' log-probs ([2B]: chosen, then
    rejected) and completion token counts; `ref_logps` None for a reference-free objective."""
    if loss_type not in LOSS_TYPES:
        raise QLoRAError(f"loss_type={loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    chosen, rejected = logps.chunk(2)
    n_c, n_r = counts.float().clamp(min=1).chunk(2)
    if loss_type == "simpo":
        margin = chosen / n_c - rejected / n_r
        loss = -F.logsigmoid(beta * margin - simpo_gamma)
        return loss.mean(), beta * (chosen / n_c).detach(), beta * (rejected / n_r).detach()
    if ref_logps is None:
        raise QLoRAError(f"loss_type={loss_type!r} needs the reference log-probs (the base with adapters disabled)")
    ref_c, ref_r = ref_logps.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_c, rejected - ref_r
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:   # ipo
        loss = (chosen_ratio / n_c - rejected_ratio / n_r - 1 / (2 * beta)) ** 2
    return loss.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
