"""Chunked linear + cross-entropy: the LM head and the loss without the full [tokens, vocab] logits.

    loss = causal_lm_loss(model, input_ids, labels, chunk_size=256)    # = model(..., labels=).loss

Where the memory goes without it (batch·seq = N tokens, vocab V): the head's logits [N, V] in the
compute dtype, their fp32 up-cast for the loss, log-softmax's fp32 output saved for backward and,
in backward, an fp32 gradient of the same size: about 14·N·V bytes. At N = 2,048 and V = 32,000
that is ~0.9 GB, more than everything else in a checkpointed QLoRA step of a 100M model.

Here the head and the loss run chunk by chunk: for each chunk of C tokens we form its logits
[C, V] in fp32, take the loss, and since d(loss)/d(logits) = softmax - onehot is known right
there, immediately compute the gradient for the hidden states [C, H] (and for the head weight
when it trains). Only those gradients are kept for backward, so the peak is one chunk's logits
(4·C·V bytes: 33 MB at C = 256, V = 32,000; the buffer is reused in place for the softmax) and no
logits are recomputed. The forward does the backward's head matmul early,
so the total work is the same as the unchunked path.
"""
from __future__ import annotations

import sys

import torch
from torch._subclasses.fake_tensor import is_fake

from qlora.arch.heads import decoder
from qlora.lora.layers import LoRALayer

IGNORE_INDEX = -100


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over non-ignored tokens of CE(hidden @ weight.T, labels), computed in chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, ignore_index: int):
        # hidden [N, H] (compute dtype), weight [V, H], labels [N] int64
        n = hidden.shape[0]
        valid = labels != ignore_index
        count = valid.sum().clamp_min(1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in chunk_starts(hidden, n, chunk_size):
            h = hidden[start:start + chunk_size]                       # [C, H]
            y = labels[start:start + chunk_size]                        # [C]
            ok = valid[start:start + chunk_size]
            logits = (h @ weight.T).float()                             # [C, V] fp32: the chunk's peak
            safe_y = torch.where(ok, y, torch.zeros_like(y))
            # one [C, V] buffer, reused in place: shift, exponentiate, normalise into the softmax
            logits.sub_(logits.max(dim=-1, keepdim=True).values)       # logits - max
            picked = logits.gather(1, safe_y[:, None]).squeeze(1)       # [C]
            probs = logits.exp_()
            norm = probs.sum(dim=-1)                                    # [C]: lse - max = log(norm)
            total += ((norm.log() - picked) * ok).sum()
            if need_h or need_w:
                probs.div_(norm[:, None])                               # softmax
                probs[torch.arange(len(y), device=y.device), safe_y] -= 1.0
                probs.mul_((ok.float() / count)[:, None])               # d(mean loss)/d(logits)
                if need_h:
                    grad_hidden[start:start + chunk_size] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_weight += probs.T @ h.float()                  # [V, H]
            del logits
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight) if t is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        need_h, need_w = ctx.has
        grad_hidden = grad_weight = None
        if need_h:
            g = next(saved)
            grad_hidden = g * grad_out.to(g.dtype)
        if need_w:
            grad_weight = (next(saved) * grad_out).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def chunk_starts(hidden: torch.Tensor, n: int, chunk_size: int):
    """The chunks' first rows. Under a memory trace on fake tensors (memprofile.trace, `qlora plan`)
    only the first and the last chunk run: every chunk but the last allocates and frees exactly
    what the first does (the [N, H] gradient is allocated once, before the loop), so the trace's
    bytes are the same and its time no longer grows with the tokens (512 chunks at 128k)."""
    starts = range(0, n, chunk_size)
    return (starts[0], starts[-1]) if len(starts) > 2 and is_fake(hidden) else starts


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          chunk_size: int = 256, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, never holding all logits.

    hidden [..., H], weight [V, H], labels [...]. Equals F.cross_entropy on the full fp32 logits."""
    return ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                           labels.reshape(-1), chunk_size, ignore_index)


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None, *,
                   chunk_size: int = 256, position_ids=None, **media) -> torch.Tensor:
    """The next-token loss of a transformers causal LM, the same value as `model(..., labels=).loss`,
    with the head and loss chunked. Needs a plain (or frozen) `lm_head` without bias.

    Packed rows: pass `position_ids` restarting at 0 for each example and no attention_mask;
    transformers then masks attention block-diagonally (no KV cache is made, which would turn that
    detection off). An image-text model's inputs (pixel_values, image_grid_thw, mm_token_type_ids, ...:
    `media`) go to its forward; with them the body is the model's base model (the one that takes them),
    not the text decoder."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": False, **media}
    if not head_is_chunkable(model):
        return model(**inputs, labels=labels).loss
    head = model.get_output_embeddings()
    aux = bool(getattr(getattr(model, "config", None), "output_router_logits", False))   # a MoE asked for it
    body = model.base_model if media else decoder(model)
    out = body(**inputs, **({"output_router_logits": True} if aux else {}))
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)   # [B, S]: token t predicts t+1
    loss = chunked_cross_entropy(out.last_hidden_state, head.weight, shifted, chunk_size=chunk_size)
    return with_router_aux_loss(model, loss, out, attention_mask) if aux else loss


def with_router_aux_loss(model, loss: torch.Tensor, out, attention_mask) -> torch.Tensor:
    """loss + router_aux_loss_coef x the load-balancing loss, as the model's own forward adds it when its
    config says output_router_logits (the model's own load_balancing_loss_func, from its modeling module);
    the aux loss rides along as `loss.metrics["aux_loss"]` (qlora.train logs it)."""
    fn = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    logits = getattr(out, "router_logits", None)
    if fn is None or logits is None:
        return loss
    top_k = getattr(model, "num_experts_per_tok", None) or model.config.num_experts_per_tok
    aux = fn(logits, getattr(model, "num_experts", None), top_k, attention_mask)
    total = loss + model.config.router_aux_loss_coef * aux.to(loss.device)
    total.metrics = {"aux_loss": aux.detach()}
    return total


def head_is_chunkable(model) -> bool:
    """Whether the decoder's hidden states and the head's weight can be used directly (the chunked paths). Not
    for an adapted / biased / 4-bit head, nor for a model sharded by FSDP2 (its root and head are all-gathered by
    their own forward hooks, which calling the decoder and the head's weight directly would skip), nor for a
    model whose forward scales or caps the logits (Cohere's logit_scale, Granite's logits_scaling, Gemma 2/3's
    final_logit_softcapping): those use the model's own forward."""
    head = model.get_output_embeddings()
    fsdp = sys.modules.get("torch.distributed.fsdp")
    config = getattr(model, "config", None)
    transformed = (getattr(config, "final_logit_softcapping", None) is not None
                   or getattr(config, "logit_scale", 1) not in (1, None)
                   or getattr(config, "logits_scaling", 1) not in (1, None))
    return not (isinstance(head, LoRALayer) or getattr(head, "bias", None) is not None
                or head.weight.dtype == torch.uint8 or transformed
                or (fsdp is not None and isinstance(model, getattr(fsdp, "FSDPModule", ()))))
