"""One GRPO step (`qlora train grpo`) as the planner traces it and as a measured step runs it.

    loss = grpo_step(model, fake_batch(config, "grpo", B, T, dtype), settings)   # B prompts, completions of T

The batch holds B prompts of P = settings.prompt_length tokens (left-padded: the last one is a token short, as
prompts of different lengths are, when B > 1) and the completion length T. The step:

  1. generation: B x G rows (G = settings.num_generations), eval mode, no grad, the KV cache;
  2. (beta > 0) the reference's log-probs of every row, adapters off, no grad; (num_iterations > 1) the sampling
     policy's, no grad;
  3. the policy's chunked log-probs of the rows of P + T tokens and the clipped loss (qlora.objectives.grpo),
     whose backward memprofile's step runs.

On real tensors (a measured step) generation is the recipe's own sampler (qlora.objectives.rollout.Sampler), made to
write exactly T tokens (its EOS id is one the model never samples). On fake tensors `generate` cannot run (it
stops on values), so its memory is built from the same model calls: a prefill of the B x G prompts that fills
the model's own cache (logits of the last position only, as generate asks), the cache grown to P + T - 2 tokens
through its own `update` (each layer as its class keeps it: all tokens, a sliding window, or none for a
linear-attention state), then the last two decode steps with the tensors of generate's sampling loop (an fp32
copy of the last logits and the probabilities, [rows, vocab] each; the previous step's are still alive when the
next are made). Logits processors (temperature != 1, top-k, top-p) would add a [rows, vocab] copy each: not
modelled (the recipe's and TRL's defaults use none). Step 3 scores the last T positions of every row
(completions that run to max_completion_length: the most they hold).
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from memprofile.tracker import mark_phase
from qlora.lora.inject import disable_adapters
from qlora.objectives.grpo import completion_logps, policy_loss
from qlora.objectives.rollout import Sampler


def prompt_batch(prompts: torch.Tensor, completion_length: int) -> dict:
    """The planner's GRPO batch: prompts [B, P] (with B > 1, the last one left-padded by one token: the batch's
    attention mask is real, as prompts of different lengths make it; one prompt is never padded and gets no mask:
    transformers drops a mask of ones, which it cannot see on a fake tensor) and T."""
    mask = None
    if prompts.shape[0] > 1:
        mask = torch.ones_like(prompts)
        mask[-1, 0] = 0
    return {"prompt_ids": prompts, "prompt_mask": mask, "completion_length": completion_length}


def grpo_step(model, batch: dict, settings) -> torch.Tensor:
    """The loss of one GRPO step on `batch` (prompt_batch's layout); see the module docstring."""
    prompts, mask, T = batch["prompt_ids"], batch["prompt_mask"], batch["completion_length"]
    G, rows = settings.num_generations, prompts.shape[0] * settings.num_generations
    was_training = model.training
    mark_phase("generation")               # its peak is extrapolated on its own line (memprofile.extrapolate)
    model.eval()                           # as the Sampler: no checkpointing, no dropout while generating
    try:
        with torch.no_grad():
            if is_fake(prompts):
                ids, attn, comp = _traced_generation(model, prompts.repeat_interleave(G, 0),
                                                     None if mask is None else mask.repeat_interleave(G, 0), T)
            else:
                ids, attn, comp = _sampled(model, prompts, mask, G, T)
    finally:
        model.train(was_training)
    mark_phase("forward")
    size, last = settings.loss_chunk_size, (T if is_fake(prompts) else None)
    ref = old = None
    with torch.no_grad():
        if settings.beta:
            with disable_adapters(model):
                ref = completion_logps(model, ids, attn, comp, size, last)       # [rows, L-1] fp32
        if settings.num_iterations > 1:
            old = completion_logps(model, ids, attn, comp, size, last)
    logps = completion_logps(model, ids, attn, comp, size, last)
    advantages = torch.zeros(rows, device=ids.device)
    loss, _ = policy_loss(logps, old, advantages, comp[:, 1:], beta=settings.beta, ref_logps=ref,
                          max_completion_length=T)
    return loss


def _sampled(model, prompts, mask, G: int, T: int):
    """The recipe's sampler on real tensors, every completion exactly T tokens long."""
    mask = torch.ones_like(prompts) if mask is None else mask
    prompt_lists = [p[m.bool()].tolist() for p, m in zip(prompts.cpu(), mask.cpu())]
    never = model.config.get_text_config().vocab_size            # no token has this id: no row stops early
    roll = Sampler(model, eos_id=never, pad_id=0, max_new_tokens=T)(prompt_lists, n=G)
    device = prompts.device
    return roll.input_ids.to(device), roll.attention_mask.to(device), roll.completion_mask.to(device)


def _traced_generation(model, ids: torch.Tensor, mask: torch.Tensor, T: int):
    """generate's memory on fake tensors (module docstring); the rows it would return."""
    rows, P = ids.shape
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)   # prefill: cache of P
    cache = out.cache
    del out
    steps = min(2, T)                                     # decode steps run as generate runs them (below)
    for layer in getattr(cache, "layers", ()):            # each layer grown as its own class keeps tokens
        keys = getattr(layer, "keys", None)
        if not (isinstance(keys, torch.Tensor) and keys.dim() == 4 and hasattr(layer, "update")):
            continue                                      # a linear-attention state: the same size at any length
        window, left = getattr(layer, "sliding_window", None), T - steps
        while left:     # in pieces no longer than the window, the last of one token: what generate's steps leave
            n = 1 if left == 1 else min(left - 1, window or left)
            grow = lambda t: t.new_zeros(1, 1, 1, 1).expand(t.shape[0], t.shape[1], n, t.shape[3])  # noqa: E731 no bytes
            layer.update(grow(keys), grow(layer.values))        # keys and values apart: MLA's differ in width
            left -= n
    full = None if mask is None else torch.cat([mask, mask.new_ones(rows, T)], 1)      # [rows, P + T]
    # the last decode steps with generate's sampling loop's tensors and lifetimes (transformers' _sample: an fp32
    # copy of the last logits, the probabilities, the next tokens; the previous step's are alive until rebound)
    tokens = ids[:, -1:]
    for t in range(T - steps, T):
        step = model(input_ids=tokens, attention_mask=None if full is None else full[:, :P + t + 1], cache=cache,
                     use_cache=True)
        next_logits = step.logits[:, -1].to(copy=True, dtype=torch.float32)           # [rows, V] fp32
        probs = torch.softmax(next_logits, -1)                                         # [rows, V] fp32
        tokens = probs.argmax(-1, keepdim=True)          # multinomial's shape (its values do not matter here)
        del step
    del next_logits, probs, cache
    ids = torch.cat([ids, ids.new_zeros(rows, T)], 1)
    comp = torch.cat([torch.zeros_like(ids[:, :P]), ids.new_ones(rows, T)], 1)
    return ids, full, comp
