"""Preference objectives on one 4-bit base: DPO and its relatives from sequence log-probabilities.

    logps, n = sequence_logps(model, input_ids, attention_mask, completion_mask)   # chosen rows, then rejected
    with qlora.disable_adapters(model), torch.no_grad():
        ref_logps, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)   # the same base: no 2nd model
    loss, chosen_rewards, rejected_rewards = preference_loss(logps, ref_logps, n, loss_type="sigmoid", beta=0.1)
    examples = precompute_reference(model, examples, collate, batch_size=8, chunk_size=256)   # + "ref_logps"

`sequence_logps` sums log p(token | prefix) over each row's completion tokens with the LM head applied in chunks
of `chunk_size` selected positions, each chunk recomputed in backward (torch.utils.checkpoint): the step never
holds the [rows, seq, vocab] logits, only the [completion tokens, hidden] states. The batch layout is TRL's
(DPOTrainer): the chosen rows, then the rejected rows, `completion_mask` 1 on response tokens.

Objectives (`loss_type`, TRL's names and formulas, TRL 1.16):
- "sigmoid" (DPO, Rafailov et al. 2023, arXiv:2305.18290): -log σ(β·Δ), Δ = (π_c - ref_c) - (π_r - ref_r);
  with `label_smoothing` ε > 0 the conservative DPO of Mitchell 2023 (cDPO): -(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ)
  (TRL < 1.0's sigmoid; TRL 1.16's sigmoid ignores ε, the two agree at ε = 0);
- "hinge" (SLiC, Zhao et al. 2023, arXiv:2305.10425): max(0, 1 - β·Δ);
- "robust" (Chowdhury et al. 2024, arXiv:2403.00409): ((1-ε)·-log σ(β·Δ) + ε·log σ(-β·Δ)) / (1 - 2ε), ε < 0.5;
- "ipo" (Azar et al. 2023, arXiv:2310.12036): ((π_c - ref_c)/n_c - (π_r - ref_r)/n_r - 1/(2β))², the
  length-normalised form TRL uses;
- "simpo" (Meng et al. 2024, arXiv:2405.14734; reference-free, TRL's CPOTrainer): -log σ(β·(π_c/n_c - π_r/n_r) - γ),
  γ = `simpo_gamma`; no reference pass at all.
Rewards (what TRL logs as rewards/chosen, rewards/rejected): β·(π - ref) (SimPO: β·π/n).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from qlora.arch.heads import decoder
from qlora.errors import QLoRAError
from qlora.lora.inject import disable_adapters
from qlora.objectives.losses import chunk_starts, head_is_chunkable, with_router_aux_loss

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo")
REFERENCE_FREE = ("simpo",)


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T                                         # [c, V]: one chunk's logits only
    return logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   completion_mask: torch.Tensor, chunk_size: int = 256,
                   router_outputs: list | None = None, **media) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p over each row's completion tokens [N] fp32, completion token counts [N]). Token t+1 is scored
    by position t, where completion_mask[t+1] is 1. A head that cannot be chunked (adapted, biased, 4-bit, or
    an FSDP-sharded model: qlora.objectives.losses.head_is_chunkable) is run whole by the model's own forward.
    `router_outputs`: a list that gets the forward's output when the config asks for a MoE's router logits.
    `media`: an image-text model's inputs (pixel_values, ...), to its forward (the body: its base model)."""
    values, rows, scored = scored_logps(model, input_ids, attention_mask, completion_mask, chunk_size,
                                        router_outputs, **media)
    n = scored.shape[0]
    if values.shape[0] != rows.shape[0]:      # a fake trace ran the first and last chunks only (chunk_starts)
        return values.sum() + values.new_zeros(n), scored.sum(1)
    return values.new_zeros(n).index_add(0, rows, values), scored.sum(1)


def scored_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, completion_mask: torch.Tensor,
                 chunk_size: int = 256, router_outputs: list | None = None, last_scored: int | None = None, **media):
    """(log p of each scored token [M] fp32, its row [M], the scored positions [N, L-1] bool): what
    sequence_logps sums per row (and GRPO keeps per token). `last_scored` (fake tensors only): the scored
    positions are each row's last k (a GRPO rollout's completions), not every position but the first."""
    scored = completion_mask[:, 1:].bool()                                  # [N, L-1]
    n, length = scored.shape
    rows = torch.arange(n, device=input_ids.device)[:, None].expand_as(scored)
    if is_fake(input_ids):
        # a memory plan on fake tensors has no values to select with: its batch scores every position but the
        # first (qlora.plan.build.preference_batch) or its last `last_scored` (qlora.plan.grpo), which the same
        # bytes give without a data-dependent shape
        k = last_scored or length
        pick = lambda t: t[:, length - k:].reshape(n * k, *t.shape[2:])   # noqa: E731
    else:
        pick = lambda t: t[scored]                                         # noqa: E731
    rows, targets = pick(rows), pick(input_ids[:, 1:])                      # [M]: the scored positions
    routed = router_outputs is not None and bool(getattr(getattr(model, "config", None), "output_router_logits", False))
    extra = {"output_router_logits": True, **media} if routed else media
    if not head_is_chunkable(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        logits = out.logits                                                 # [N, L, V]
        token_logps = pick(logits[:, :-1]).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        body = model.base_model if media else decoder(model)
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        hidden = out.last_hidden_state                                      # [N, L, H]
        states = pick(hidden[:, :-1])                                       # [M, H]: completion positions only
        weight = model.get_output_embeddings().weight
        pieces = [checkpoint(_chunk_logps, states[i:i + chunk_size], weight, targets[i:i + chunk_size],
                             use_reentrant=False) if torch.is_grad_enabled() else
                  _chunk_logps(states[i:i + chunk_size], weight, targets[i:i + chunk_size])
                  for i in chunk_starts(states, states.shape[0], chunk_size)]
        token_logps = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
    if routed:
        router_outputs.append(out)
    return token_logps, rows, scored


def preference_step(model, batch: dict, *, loss_type: str = "sigmoid", beta: float = 0.1,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5, chunk_size: int = 256) -> torch.Tensor:
    """The loss of one batch in TRL's layout (input_ids, attention_mask, completion_mask [2B, L]: chosen rows,
    then rejected; optional ref_logps [2B] computed before training), with TRL's metrics attached as
    `loss.metrics` (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected; qlora.train logs them). A MoE whose config sets output_router_logits adds its router's
    load-balancing loss (x router_aux_loss_coef, logged as aux_loss), as its own forward and TRL do. The
    reference pass, when one is needed, runs first, without gradients and with the adapters disabled: the same
    4-bit base, never a second model."""
    ids, mask, completion = batch["input_ids"], batch.get("attention_mask"), batch["completion_mask"]
    ref, media = batch.get("ref_logps"), media_inputs(batch)
    if ref is None and loss_type not in REFERENCE_FREE:
        with disable_adapters(model), torch.no_grad():
            ref, _ = sequence_logps(model, ids, mask, completion, chunk_size, **media)   # freed layer by layer
    routed = []
    logps, counts = sequence_logps(model, ids, mask, completion, chunk_size, router_outputs=routed, **media)
    loss, chosen, rejected = preference_loss(logps, None if loss_type in REFERENCE_FREE else ref, counts,
                                             loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                                             simpo_gamma=simpo_gamma)
    if routed:      # a MoE asking for it: + router_aux_loss_coef x its load-balancing loss, as in SFT and TRL
        loss = with_router_aux_loss(model, loss, routed[0], mask)
    logps_c, logps_r = logps.detach().chunk(2)
    loss.metrics = {**getattr(loss, "metrics", {}), "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                    "rewards/accuracies": (chosen > rejected).float().mean(),
                    "rewards/margins": (chosen - rejected).mean(),
                    "logps/chosen": logps_c.mean(), "logps/rejected": logps_r.mean()}
    return loss


def media_inputs(batch: dict) -> dict:
    """The batch's image-text inputs (the processor's tensors): all but TRL's layout's own keys."""
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "completion_mask", "ref_logps")}


def preference_loss(logps: torch.Tensor, ref_logps: torch.Tensor | None, counts: torch.Tensor, *,
                    loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.5):
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
    delta, eps = chosen_ratio - rejected_ratio, label_smoothing
    if loss_type == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * delta)
    elif loss_type == "robust":
        if not 0 <= eps < 0.5:
            raise QLoRAError(f"loss_type=robust needs label_smoothing in [0, 0.5); got {eps}")
        loss = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:   # ipo
        loss = (chosen_ratio / n_c - rejected_ratio / n_r - 1 / (2 * beta)) ** 2
    return loss.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def precompute_reference(model, examples: list[dict], collate, batch_size: int, chunk_size: int) -> list[dict]:
    """The examples with "ref_logps": (chosen, rejected) from the base with its adapters disabled (new dicts)."""
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    with disable_adapters(model), torch.no_grad():
        for i in tqdm(range(0, len(examples), batch_size), desc="reference log-probs"):
            part = examples[i:i + batch_size]
            batch = {k: v.to(device) for k, v in collate(part).items()}
            logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                      chunk_size, **media_inputs(batch))
            chosen, rejected = logps.tolist()[:len(part)], logps.tolist()[len(part):]
            out += [{**ex, "ref_logps": (c, r)} for ex, c, r in zip(part, chosen, rejected)]
    model.train(was_training)
    return out
