"""Forward passes of the supported transformers models, written on memprofile.ops, line by line
after the HF code (transformers 5), so that what is saved and when it is freed matches.

Each function takes a `Model` (below: the config, the batch shape, and per-module `LinearSpec`s /
parameter Syms built by memprofile.estimate) and returns the loss Sym. Model outputs other than
the loss (logits) are dropped when the function returns, as measure_step does.

    llama   Llama / Mistral / Qwen2 (RMSNorm, RoPE, GQA, SwiGLU), causal-LM head
    gpt2    GPT-2 (LayerNorm, fused c_attn Conv1D, gelu_new in Python ops, tied head)
    bert    BERT / RoBERTa encoder + pooler + classifier (sequence classification)
    vit     ViT (patch conv, pre-LN) + classifier on the [CLS] token (image classification)

Shapes: b batch, s tokens, h hidden, I intermediate, H heads, K kv heads, d head dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memprofile import ops
from memprofile.symbolic import Sym, Tape


CPU_RNG_STATE = 5056  # bytes of torch.get_rng_state() (the MT19937 state as a uint8 tensor)


@dataclass
class Model:
    config: object
    tape: Tape
    batch: int
    seq: int  # tokens (for ViT: patches + 1)
    dtype: torch.dtype
    linears: dict = field(default_factory=dict)  # module name -> ops.LinearSpec
    params: dict = field(default_factory=dict)  # parameter name -> Sym
    checkpointing: bool = False
    training: bool = True
    # HF's activation_checkpointing_enable() on a text model (main input `input_ids`) also calls
    # enable_input_require_grads(): the input embedding's output becomes a leaf requiring grad,
    # so everything after it is recorded (and saved) even when the embeddings are frozen.
    input_requires_grad: bool = False

    def embedded(self, x: Sym) -> Sym:
        """Output of the model's input embedding (get_input_embeddings())."""
        return self.tape.requires_grad_(x) if self.input_requires_grad else x

    def p(self, name: str) -> Sym:
        return self.params[name]

    def lin(self, x: Sym, name: str) -> Sym:
        return ops.linear(self.tape, x, self.linears[name], name)

    def layer(self, x: Sym, fn, *args, keep=()) -> Sym:
        """One transformer block, checkpointed if enabled. HF checkpoints every block with
        torch.utils.checkpoint(use_reentrant=False): it saves the positional tensor input (the
        hidden states), its closure holds the keyword tensors (`keep`), and on CPU it stashes
        the 5056-byte CPU RNG state plus seven 8-byte tensors (measured with the profiler);
        the CUDA RNG state it also stashes lives in host memory."""
        if not (self.checkpointing and self.training):
            return fn(x, *args)
        state = CPU_RNG_STATE + 7 * 8 if self.tape.device == "cpu" else 0
        with self.tape.checkpoint([x], keep, state):
            return fn(x, *args)


def _cfg(c, *names, default=None):
    for n in names:
        v = getattr(c, n, None)
        if v is not None:
            return v
    return default


# ----------------------------------------------------------------------------------- Llama
def llama(m: Model) -> Sym:
    t, c, b, s = m.tape, m.config, m.batch, m.seq
    h = c.hidden_size
    H = c.num_attention_heads
    K = _cfg(c, "num_key_value_heads", default=H)
    d = _cfg(c, "head_dim", default=h // H)
    ids = t.external((b, s), torch.int64)
    emb = m.embedded(ops.embedding(t, ids, m.p("model.embed_tokens.weight")))  # (b, s, h)
    x = emb  # LlamaModel.forward keeps `inputs_embeds` alive through the layer loop
    # rotary: cos, sin (1, s, d) in the model dtype (made from fp32 (1, s, d) temporaries),
    # shared by all layers: RoPE's mul saves them, once per model
    pos = t.tensor((1, s), torch.int64)  # position_ids = arange(s)[None], lives through the loop
    cos = ops.to(t, t.tensor((1, s, d), torch.float32), m.dtype)
    sin = ops.to(t, t.tensor((1, s, d), torch.float32), m.dtype)
    cos, sin = t.view(cos, (1, 1, s, d)), t.view(sin, (1, 1, s, d))
    dropout_p = float(_cfg(c, "attention_dropout", default=0.0)) if m.training else 0.0

    def rope(q: Sym, n_heads: int) -> Sym:
        # q * cos + rotate_half(q) * sin; rotate_half = cat(-q[..., d/2:], q[..., :d/2])
        a = ops.mul(t, q, cos)                                        # saves cos
        half = (b, n_heads, s, d // 2)
        x1 = ops.view_node(t, q, half)
        x2 = ops.view_node(t, q, half)
        rot = ops.cat(t, [ops.neg(t, x2), x1])
        del x1, x2
        r = ops.mul(t, rot, sin)                                      # saves sin
        del rot
        return ops.add(t, a, r)                                       # (b, n, s, d) new

    def attention(hs: Sym, pre: str) -> Sym:
        # LlamaAttention.forward: q/k/v and the attention output are locals, alive until the
        # o_proj result is returned (unless saved for backward)
        q = t.view(m.lin(hs, pre + "q_proj"), (b, H, s, d), contig=False)
        k = t.view(m.lin(hs, pre + "k_proj"), (b, K, s, d), contig=False)
        v = t.view(m.lin(hs, pre + "v_proj"), (b, K, s, d), contig=False)
        q, k = rope(q, H), rope(k, K)                                 # (b, H|K, s, d) new
        o = ops.merge_heads(t, ops.sdpa(t, q, k, v, dropout_p=dropout_p, is_causal=True))
        return m.lin(o, pre + "o_proj")

    def mlp(hs: Sym, pre: str) -> Sym:
        # down_proj(act_fn(gate_proj(x)) * up_proj(x)): SiLU saves gate (b, s, I), the product
        # saves act and up (b, s, I) each, down_proj saves the product if it trains/has LoRA
        act = ops.unary_saving_input(t, m.lin(hs, pre + "gate_proj"), "silu")
        prod = ops.mul(t, act, m.lin(hs, pre + "up_proj"))
        del act
        return m.lin(prod, pre + "down_proj")

    def block(x: Sym, i: int) -> Sym:
        pre = f"model.layers.{i}."
        residual = x
        hs = ops.rms_norm(t, x, m.p(pre + "input_layernorm.weight"))
        hs = attention(hs, pre + "self_attn.")  # the norm output lives until this returns
        hs = ops.add(t, residual, hs)
        residual = hs
        hs = ops.rms_norm(t, hs, m.p(pre + "post_attention_layernorm.weight"))
        hs = mlp(hs, pre + "mlp.")
        return ops.add(t, residual, hs)

    for i in range(c.num_hidden_layers):
        x = m.layer(x, block, i, keep=(cos, sin, pos))
    x = ops.rms_norm(t, x, m.p("model.norm.weight"))
    del pos, emb, cos, sin
    logits = m.lin(x, "lm_head")                                       # (b, s, V)
    del x
    return ops.causal_lm_loss(t, logits)


# ----------------------------------------------------------------------------------- GPT-2
def gpt2(m: Model) -> Sym:
    t, c, b, s = m.tape, m.config, m.batch, m.seq
    h, H = c.n_embd, c.n_head
    d = h // H
    I = c.n_inner or 4 * h
    tr = m.training
    ids = t.external((b, s), torch.int64)
    pos = t.tensor((1, s), torch.int64)                                # arange: saved by wpe
    # GPT2Model.forward keeps inputs_embeds and position_embeds alive through the block loop
    tok_emb = m.embedded(ops.embedding(t, ids, m.p("transformer.wte.weight")))
    pos_emb = ops.embedding(t, pos, m.p("transformer.wpe.weight"))
    x = ops.dropout(t, ops.add(t, tok_emb, pos_emb), c.embd_pdrop, tr)

    def attention(hs: Sym, pre: str) -> Sym:
        qkv = m.lin(hs, pre + "c_attn")                               # (b, s, 3h)
        # split + view + transpose: q, k, v are views of the one (b, s, 3h) storage; backward
        # of the split builds a (b, s, 3h) gradient from the three
        q, k, v = ops.view_node(t, qkv, (b, H, s, d), "split", n=3)
        o = ops.sdpa(t, q, k, v, dropout_p=c.attn_pdrop if tr else 0.0, is_causal=True)
        o = m.lin(ops.merge_heads(t, o), pre + "c_proj")
        return ops.dropout(t, o, c.resid_pdrop, tr)

    def mlp(hs: Sym, pre: str) -> Sym:
        f = _gelu_new(t, m.lin(hs, pre + "c_fc"))                      # (b, s, I)
        f = m.lin(f, pre + "c_proj")
        return ops.dropout(t, f, c.resid_pdrop, tr)

    def block(x: Sym, i: int) -> Sym:
        pre = f"transformer.h.{i}."
        residual = x
        hs = ops.layer_norm(t, x, m.p(pre + "ln_1.weight"), m.p(pre + "ln_1.bias"))
        a = attention(hs, pre + "attn.")
        hs = ops.add(t, a, residual)          # the ln_1 output lived until here
        del a
        residual = hs
        hs = ops.layer_norm(t, hs, m.p(pre + "ln_2.weight"), m.p(pre + "ln_2.bias"))
        f = mlp(hs, pre + "mlp.")
        return ops.add(t, residual, f)

    for i in range(c.n_layer):
        x = m.layer(x, block, i, keep=(pos,))
    x = ops.layer_norm(t, x, m.p("transformer.ln_f.weight"), m.p("transformer.ln_f.bias"))
    del tok_emb, pos_emb, pos
    logits = m.lin(x, "lm_head")
    del x
    return ops.causal_lm_loss(t, logits)


def _gelu_new(t: Tape, x: Sym) -> Sym:
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))), as Python ops: saves x (pow),
    tanh's result, 0.5*x and (1 + tanh) -- four (b, s, I) tensors."""
    half = ops.scale(t, x, "0.5*x")
    inner = ops.add(t, x, ops.scale(t, ops.pow3(t, x)))
    th = ops.unary_saving_result(t, ops.scale(t, inner), "tanh")
    del inner
    one_p = ops.add_scalar(t, th)
    del th
    return ops.mul(t, half, one_p)


# ----------------------------------------------------------------------------------- BERT
def bert(m: Model) -> Sym:
    t, c, b, s = m.tape, m.config, m.batch, m.seq
    h, H = c.hidden_size, c.num_attention_heads
    d = h // H
    tr = m.training
    roberta = c.model_type == "roberta"
    pfx = "roberta." if roberta else "bert."
    e = pfx + "embeddings."
    ids = t.external((b, s), torch.int64)
    if roberta:
        # position ids from the input ids (cumsum of the non-pad mask): a new (b, s) int64; the
        # token types gathered from the buffer at those positions: another
        pos = t.tensor((b, s), torch.int64)
        tt = t.tensor((b, s), torch.int64)
    else:
        # position ids: a slice of a buffer; token types: one gathered (1, s) copy, expanded
        pos = t.external((1, s), torch.int64)
        tt = t.view(t.tensor((1, s), torch.int64), (b, s))
    x = m.embedded(ops.embedding(t, ids, m.p(e + "word_embeddings.weight")))
    x = ops.add(t, x, ops.embedding(t, tt, m.p(e + "token_type_embeddings.weight")))
    del tt
    x = ops.add(t, x, ops.embedding(t, pos, m.p(e + "position_embeddings.weight")))
    del pos
    x = ops.layer_norm(t, x, m.p(e + "LayerNorm.weight"), m.p(e + "LayerNorm.bias"))
    x = ops.dropout(t, x, c.hidden_dropout_prob, tr)
    emb = x  # BertModel.forward keeps `embedding_output` alive through the encoder
    attn_p = c.attention_probs_dropout_prob if tr else 0.0

    def self_attention(x: Sym, pre: str) -> Sym:
        q = t.view(m.lin(x, pre + "query"), (b, H, s, d), contig=False)
        k = t.view(m.lin(x, pre + "key"), (b, H, s, d), contig=False)
        v = t.view(m.lin(x, pre + "value"), (b, H, s, d), contig=False)
        return ops.merge_heads(t, ops.sdpa(t, q, k, v, dropout_p=attn_p, is_causal=False))

    def output(hs: Sym, inp: Sym, pre: str) -> Sym:
        # BertSelfOutput / BertOutput: LayerNorm(dropout(dense(hs)) + input)
        o = ops.dropout(t, m.lin(hs, pre + "dense"), c.hidden_dropout_prob, tr)
        return ops.layer_norm(t, ops.add(t, o, inp), m.p(pre + "LayerNorm.weight"),
                              m.p(pre + "LayerNorm.bias"))

    def block(x: Sym, i: int) -> Sym:
        pre = f"{pfx}encoder.layer.{i}."
        a = self_attention(x, pre + "attention.self.")
        a = output(a, x, pre + "attention.output.")
        f = ops.unary_saving_input(t, m.lin(a, pre + "intermediate.dense"), "gelu")  # (b, s, I)
        return output(f, a, pre + "output.")

    for i in range(c.num_hidden_layers):
        x = m.layer(x, block, i)
    del emb
    p_drop = _cfg(c, "classifier_dropout", default=c.hidden_dropout_prob)
    # x[:, 0]: a view; if saved it keeps the whole (b, s, h) storage alive
    first = ops.view_node(t, x, (b, h), "select")
    del x
    if roberta:
        # RobertaClassificationHead: dropout -> dense -> tanh -> dropout -> out_proj
        f = ops.dropout(t, first, p_drop, tr)
        del first
        f = ops.unary_saving_result(t, m.lin(f, "classifier.dense"), "tanh")
        logits = m.lin(ops.dropout(t, f, p_drop, tr), "classifier.out_proj")
        del f
    else:
        # BertPooler: tanh(dense(x[:, 0])); then dropout and the classifier
        pooled = ops.unary_saving_result(t, m.lin(first, pfx + "pooler.dense"), "tanh")
        del first
        logits = m.lin(ops.dropout(t, pooled, p_drop, tr), "classifier")   # (b, num_labels)
        del pooled
    return ops.classification_loss(t, logits)


# ----------------------------------------------------------------------------------- ViT
def vit(m: Model) -> Sym:
    t, c, b, s = m.tape, m.config, m.batch, m.seq
    h, H = c.hidden_size, c.num_attention_heads
    d = h // H
    tr = m.training
    I = c.intermediate_size
    side = c.image_size // c.patch_size
    pixels = t.external((b, c.num_channels, c.image_size, c.image_size), m.dtype)
    w = m.p("vit.embeddings.patch_embeddings.projection.weight")
    # conv2d saves the pixels (a batch tensor) when its weight trains
    patches = t.op("conv2d", [w, m.p("vit.embeddings.patch_embeddings.projection.bias")],
                   (b, h, side, side), m.dtype, saved=[pixels] if w.rg else [])
    cls = m.p("vit.embeddings.cls_token")
    x = ops.cat(t, [ops.expand(t, cls, (b, 1, h)), t.view(patches, (b, s - 1, h), contig=False)], dim=1)
    del patches
    x = ops.add(t, x, m.p("vit.embeddings.position_embeddings"))
    x = ops.dropout(t, x, c.hidden_dropout_prob, tr)
    emb = x  # ViTModel.forward keeps `embedding_output` alive through the layer loop
    attn_p = c.attention_probs_dropout_prob if tr else 0.0

    def attention(hs: Sym, pre: str) -> Sym:
        q = t.view(m.lin(hs, pre + "q_proj"), (b, H, s, d), contig=False)
        k = t.view(m.lin(hs, pre + "k_proj"), (b, H, s, d), contig=False)
        v = t.view(m.lin(hs, pre + "v_proj"), (b, H, s, d), contig=False)
        o = ops.merge_heads(t, ops.sdpa(t, q, k, v, dropout_p=attn_p, is_causal=False))
        return m.lin(o, pre + "o_proj")        # q, k, v, o are locals until here

    def block(x: Sym, i: int) -> Sym:
        pre = f"vit.layers.{i}."
        residual = x
        hs = ops.layer_norm(t, x, m.p(pre + "layernorm_before.weight"), m.p(pre + "layernorm_before.bias"))
        hs = attention(hs, pre + "attention.")
        hs = ops.add(t, ops.dropout(t, hs, c.hidden_dropout_prob, tr), residual)
        residual = hs
        hs = ops.layer_norm(t, hs, m.p(pre + "layernorm_after.weight"), m.p(pre + "layernorm_after.bias"))
        f = ops.unary_saving_input(t, m.lin(hs, pre + "mlp.fc1"), "gelu")   # (b, s, I)
        del hs
        f = m.lin(f, pre + "mlp.fc2")
        return ops.add(t, ops.dropout(t, f, c.hidden_dropout_prob, tr), residual)

    for i in range(c.num_hidden_layers):
        x = m.layer(x, block, i)
    del emb
    x = ops.layer_norm(t, x, m.p("vit.layernorm.weight"), m.p("vit.layernorm.bias"))
    first = ops.view_node(t, x, (b, h), "select")
    del x
    logits = m.lin(first, "classifier")
    del first
    return ops.classification_loss(t, logits)


ARCHITECTURES = {"llama": llama, "mistral": llama, "qwen2": llama, "gpt2": gpt2,
                 "bert": bert, "roberta": bert, "vit": vit}
