"""The output-head rule: which modules are a model's output head.

    output_head_paths(model)     # {'lm_head'} / {'classifier', 'classifier.dense', ...} / {'score'}
    task_head_paths(model)       # set() / {'classifier'} / {'score'}: a new task head, trained in full with LoRA
    decoder(model)               # the model below its head: what computes the hidden states the head reads

The head is every module whose dotted path has a part named `lm_head`, `classifier` or `score`
(with its insides), plus whatever `get_output_embeddings()` returns. It stays in float when the
body goes 4-bit (quant), is left out of `all-linear` LoRA targets (inject), is what head-only
training trains (modes), is up-cast with the norms (checkpointing) and is what a fresh checkpoint
load initialises (loading). One rule, here; everything else imports it.
"""
from __future__ import annotations

OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score")


def output_embedding(model):
    """`model.get_output_embeddings()`, or None for models without one."""
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out):
        return None
    try:
        return get_out()
    except (NotImplementedError, AttributeError):
        return None


def decoder(model):
    """The body of a causal LM (what returns hidden states): `get_decoder()`, unless that is the model itself
    (Llama 4's causal LM names its base model `language_model` but keeps it in `model`): then the one child that
    is a transformers model. A body that still has an LM head (Llama 4's image-text model: its language model is
    a Llama4ForCausalLM) is descended into the same way."""
    body = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if body is not None and body is not model:
        return decoder(body) if output_embedding(body) is not None else body
    children = [m for _, m in model.named_children() if hasattr(m, "config") and callable(getattr(m, "forward", None))]
    if len(children) == 1:
        return children[0]
    raise ValueError(f"{type(model).__name__}: no decoder below the head (get_decoder() is the model itself)")


def in_head_by_name(path: str) -> bool:
    """Whether a module path names (a part of) the head: 'classifier.dense' yes, 'classifiers' no."""
    return any(part in OUTPUT_HEAD_NAMES for part in path.split("."))


def output_head_paths(model) -> set[str]:
    """Paths of the output head: lm_head / classifier / score (and their insides), get_output_embeddings()."""
    out_emb = output_embedding(model)
    return {name for name, m in model.named_modules()
            if name and (in_head_by_name(name) or (out_emb is not None and m is out_emb))}


def task_head_paths(model) -> set[str]:
    """The outermost head modules that are not the language-model head (get_output_embeddings):
    a classifier's new head, which LoRA training trains in full (PEFT's task_type=SEQ_CLS does the
    same). Empty for a causal LM."""
    out_emb = output_embedding(model)
    modules = dict(model.named_modules())
    heads = {p for p in output_head_paths(model) if modules[p] is not out_emb}
    return {p for p in heads if not any(p.startswith(o + ".") for o in heads)}
