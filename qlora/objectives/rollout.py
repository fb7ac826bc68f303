"""Sampling completions from the policy being trained (online RL: GRPO), behind one small interface.

    sampler = Sampler(model, eos_id=tok.eos_token_id, pad_id=pad_id, max_new_tokens=64, temperature=1.0)
    batch = sampler(prompts, n=4)        # prompts: list of token-id lists -> Rollout of len(prompts) * n rows

The sampler is the trained model itself: the same 4-bit base with the adapters on, no second copy. It runs in
eval mode under no_grad (gradient checkpointing is a training-mode behaviour: off while generating), with the
KV cache, all rows of a step in one batched `generate` (prompts left-padded, each prompt's n completions
adjacent, as TRL orders them). A completion ends at its first EOS (kept, and counted in the mask) or at
max_new_tokens (then "clipped"). Another engine (vLLM on a GPU, with the adapter synced) can stand in for
`Sampler` by returning the same Rollout: the loss never sees which one ran.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [rows, longest prompt]: each prompt right-aligned, pad_id before it (generate's layout)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    return ids, mask


@dataclass
class Rollout:
    input_ids: torch.Tensor          # [rows, P + T]: left-padded prompt, then the completion (right-padded)
    attention_mask: torch.Tensor     # [rows, P + T]
    completion_mask: torch.Tensor    # [rows, P + T]: 1 on completion tokens up to and including the first EOS
    completions: list[list[int]]     # each row's completion ids (up to and including EOS)
    clipped: torch.Tensor            # [rows] bool: no EOS within max_new_tokens


@dataclass
class Sampler:
    model: torch.nn.Module
    eos_id: int
    pad_id: int
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False

    def __call__(self, prompts: list[list[int]], n: int = 1) -> Rollout:
        model = self.model
        device = next(model.parameters()).device
        rows = [p for p in prompts for _ in range(n)]
        ids, mask = left_padded(rows, self.pad_id)
        width = ids.shape[1]
        was_training = model.training
        model.eval()
        options = dict(do_sample=False) if self.greedy else dict(
            do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        try:
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                                     max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                                     eos_token_id=self.eos_id, **options).cpu()
        finally:
            model.train(was_training)
        new = out[:, width:]                                               # [rows, T]
        is_eos = new == self.eos_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((len(rows),), new.shape[1]))
        keep = torch.arange(new.shape[1])[None, :] <= first[:, None]       # through the first EOS
        completions = [new[r, :min(first[r].item() + 1, new.shape[1])].tolist() for r in range(len(rows))]
        new = torch.where(keep, new, torch.full_like(new, self.pad_id))
        return Rollout(input_ids=torch.cat([ids, new], 1), attention_mask=torch.cat([mask, keep.long()], 1),
                       completion_mask=torch.cat([torch.zeros_like(mask), keep.long()], 1),
                       completions=completions, clipped=~is_eos.any(1))
