"""Supervised fine-tuning (SFT) of a causal LM on your own chat or instruction data, QLoRA by default.

    qlora train sft                                                   # SmolLM2-135M-Instruct on WordNet, offline
    qlora train sft model=FOLDER_OR_HUB_ID data=my.jsonl              # your model, your data
    qlora train recipes/configs/sft.yaml data=chats/ eval_data=dev.jsonl packing=true export=true

Data (qlora/data/sft.py): a .jsonl / .json / .csv / .parquet file, a folder of them or a Hub data
set, in the `messages`, `prompt`+`completion`, Alpaca or `text` format; the loss is on the assistant
/ completion tokens (train_on=completions). Chat rows may hold images (image parts, an `images` column;
qlora/data/images.py) for an image-text model: its processor renders them, its tensors reach the forward.
The default data, `wordnet`, is WordNet 3.0 turned into chats ("What does the noun 'X' mean?" -> gloss +
example; recipes/wordnet_chat.py), split by word.

Memory savers, on by default and each switchable (the first-step memory line names them): the NF4
base with double quantization (mode=qlora), LoRA in the compute dtype, gradient checkpointing
(non-reentrant), chunked cross-entropy instead of the model's [tokens, vocab] logits, no fp32 up-casts.
Evaluation (eval loss, perplexity, greedy samples) runs before training, every train.eval_every steps
and at the end. out_dir gets adapter/, metrics.jsonl, curves.png, samples.jsonl, summary.json,
checkpoints/ (train.save_every) and, with export=true, merged/ (a failed verification: exit 1).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

import qlora
from qlora.data import images
from qlora.data import sft as sft_data
from qlora.errors import QLoRAError
from qlora.train.loop import TrainConfig, train
from qlora.util.checks import check_bools
from qlora_recipes.causal_lm import (
    LMRecipeConfig,
    append_samples,
    build_model,
    clear_samples,
    evaluate_before,
    finish,
    greedy,
    load_tokenizer,
    read_splits,
    report_first_step,
    shown_question,
)
from qlora_recipes.image_chat_default import fashion_photo_files, heldout_accuracy, read_rows
from qlora_recipes.wordnet_chat import wordnet_chat_files

LOSSES = ("chunked", "model")


@dataclass
class SFTConfig(LMRecipeConfig):
    """The keys every causal-LM recipe shares (recipes/causal_lm.py: model, data, eval_data, max_length, mode,
    the memory savers, lora, train, samples, export, out_dir, ...) and SFT's own below."""
    format: str = "auto"
    """auto (from the columns) | messages | prompt_completion | alpaca | text."""
    train_on: str = "completions"
    """completions: loss on assistant / completion tokens only; all: on every token."""
    packing: bool = False
    """Concatenate examples into rows of max_length tokens (position ids restart, no cross-attention)."""
    loss: str = "chunked"
    """chunked: qlora.objectives.losses' chunked head + cross-entropy (never the full logits); model: the model's own loss."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4, batch_size=8, out_dir="runs/sft"))
    """The loop: epochs, max_steps, batch_size, lr, optimizer, eval_every, save_every, offload_activations..."""
    out_dir: str = "runs/sft"
    """Where everything goes (train.out_dir follows it)."""

    def __post_init__(self):
        super().__post_init__()
        checks = {"loss": (self.loss, LOSSES), "train_on": (self.train_on, ("completions", "all")),
                  "format": (self.format, ("auto", *sft_data.FORMATS))}
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise QLoRAError(f"{key}={value!r}; allowed: {', '.join(allowed)}")
        check_bools(self, ("packing",))

    def head_words(self) -> str:
        return f"chunked loss ({self.loss_chunk_size} tokens)" if self.loss == "chunked" else "model loss (full logits)"


def load_data(cfg: SFTConfig, tokenizer, path: str) -> tuple[list[dict], list[dict], dict]:
    """(train examples, eval examples, stats): read, split, subset, encode, truncate. Rows with images bring in
    the model's processor (none: the first such row is refused)."""
    rows, eval_rows = read_splits(cfg, {"wordnet": wordnet_chat_files, "fashion_photos": fashion_photo_files})
    processor = images.load_processor(path) if any(map(images.mentions_images, rows + eval_rows)) else None
    encoder = sft_data.Encoder(tokenizer, train_on=cfg.train_on, processor=processor)
    train_set, train_stats = sft_data.encode_rows(rows, sft_data.detect_format(rows, cfg.format), encoder,
                                                  cfg.max_length)
    print(train_stats.line("train", cfg.max_length))
    if not train_set:
        raise QLoRAError(f"no training example has anything left to learn at max_length={cfg.max_length}; raise it")
    eval_set, eval_stats = [], None
    if eval_rows:
        eval_set, eval_stats = sft_data.encode_rows(eval_rows, sft_data.detect_format(eval_rows, cfg.format),
                                                    encoder, cfg.max_length)
        print(eval_stats.line("eval", cfg.max_length))
    stats = {"train": dataclasses.asdict(train_stats), "eval": dataclasses.asdict(eval_stats) if eval_stats else None}
    return train_set, eval_set, stats


def make_loss(cfg: SFTConfig):
    """loss_fn(model, batch): the mean cross-entropy over the batch's learned tokens (the processor's tensors of
    rows with images go to the forward)."""
    def loss_fn(model, batch):
        if cfg.loss == "chunked":
            media = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask", "position_ids")}
            return qlora.causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                                        position_ids=batch.get("position_ids"), chunk_size=cfg.loss_chunk_size,
                                        **media)
        return model(**batch, use_cache=False).loss
    return loss_fn


def make_eval(cfg: SFTConfig, eval_set: list[dict], tokenizer, loss_fn, pad_id: int, path: str):
    """evaluate(model) -> {loss, perplexity} (and, on data=fashion_photos, the held-out accuracy: the ten answers
    scored by log-likelihood, recipes/image_chat_default.py); prints greedy samples, appends them to samples.jsonl."""
    calls = [0]
    photos = None
    if cfg.data == "fashion_photos":
        processor, photos = images.load_processor(path), read_rows(fashion_photo_files()[1])[:cfg.eval_size]

    def evaluate(model):
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(eval_set), cfg.eval_batch_size):
            batch = {k: v.to(device) for k, v in
                     sft_data.collate(eval_set[i:i + cfg.eval_batch_size], pad_id).items()}
            n = int((batch["labels"][:, 1:] != sft_data.IGNORE).sum())
            total += loss_fn(model, batch).item() * n          # the batch mean, weighted by its tokens
            count += n
        loss = total / max(count, 1)
        chosen = eval_set[:cfg.samples]
        prompts = [ex.get("prompt_ids") or tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"] for ex in chosen]
        texts = greedy(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, pad_id=pad_id,
                       inputs=[{"input_ids": p, "pictures": ex.get("pictures")} for ex, p in zip(chosen, prompts)])
        samples = [{"eval": calls[0], "prompt": ex["prompt"], "reference": ex["reference"], "generated": text}
                   for ex, text in zip(chosen, texts)]
        calls[0] += 1
        append_samples(cfg, samples)
        tqdm.write(f"eval: loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f} ({count:,} tokens)")
        for s in samples:
            tqdm.write(f"  sample | {shown_question(s['prompt'])!r}\n    reference: {s['reference']!r}\n"
                       f"    generated: {s['generated']!r}")
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        if photos:
            metrics["accuracy"] = heldout_accuracy(model, processor, photos)
            tqdm.write(f"eval: held-out accuracy {100 * metrics['accuracy']:.1f}% on {len(photos)} photos "
                       "(\"What is this?\", 10 answers; chance 10%)")
        return metrics
    return evaluate


def main(cfg: SFTConfig) -> dict:
    t0 = time.perf_counter()
    path, tokenizer, pad_id = load_tokenizer(cfg)
    train_set, eval_set, stats = load_data(cfg, tokenizer, path)
    if cfg.packing:
        train_set = sft_data.pack(train_set, cfg.max_length)
        print(f"packing: {stats['train']['kept']:,} examples -> {len(train_set):,} rows of <= {cfg.max_length} tokens")
    model = build_model(cfg, path)
    loss_fn = make_loss(cfg)
    evaluate = make_eval(cfg, eval_set, tokenizer, loss_fn, pad_id, path) if eval_set else None
    clear_samples(cfg)
    before = evaluate_before(evaluate, model)
    result = train(model, train_set, lambda batch: sft_data.collate(batch, pad_id), loss_fn, cfg.train,
                   eval_fn=evaluate, on_first_step=report_first_step(cfg))
    after = result.evals[-1][1] if result.evals else None
    if before and after:
        print(f"eval loss {before['loss']:.4f} -> {after['loss']:.4f} (perplexity {before['perplexity']:.2f} -> "
              f"{after['perplexity']:.2f}) after {result.steps} steps"
              + (f"; held-out accuracy {100 * before['accuracy']:.1f}% -> {100 * after['accuracy']:.1f}%"
                 if "accuracy" in after else ""))
    return finish(cfg, model, tokenizer, result, before, {"data_stats": stats, "packing": cfg.packing}, t0)
