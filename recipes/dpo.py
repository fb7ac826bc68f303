"""Preference tuning (DPO and relatives) of a causal LM on pairs of responses, with one 4-bit base in memory.

    qlora train dpo                                                   # SmolLM2-135M-Instruct on WordNet pairs, offline
    qlora train dpo model=FOLDER_OR_HUB_ID data=pairs.jsonl           # your model (an SFT'd one), your pairs
    qlora train recipes/configs/dpo.yaml data=pairs/ loss_type=ipo beta=0.5 precompute_ref=true export=true

Data (qlora/data/preference.py): rows with `prompt` / `chosen` / `rejected` as texts or chat messages, or `chosen` /
`rejected` as whole conversations sharing their beginning (TRL's formats); files, folders, Hub data sets as
for SFT; an image-text model's prompts may hold images as in SFT (qlora/data/images.py). The default,
`wordnet`, asks "What does the noun 'X' mean?": chosen is X's WordNet definition, rejected another word's
(recipes/wordnet_chat.py), eval words unseen in training.

One step (qlora.objectives.preference.preference_step), B pairs = 2B rows (chosen rows, then rejected):
  1. the reference log-probs: the same 4-bit base with the adapters disabled, no gradients (the activations
     of one layer at a time), or read from the batch with precompute_ref=true (one pass over the training
     pairs before training; no reference pass in the steps);
  2. the policy's log-probs of the response tokens: one forward of the 2B rows, the LM head in checkpointed
     chunks of loss_chunk_size response positions (never the [2B, L, vocab] logits);
  3. the loss of `loss_type` (sigmoid = DPO, hinge, ipo, robust; simpo: reference-free, no step 1).
Logged as TRL logs them: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected (metrics.jsonl, the log, curves.png); evaluation on held-out pairs before training, every
train.eval_every steps and at the end, with greedy samples. out_dir gets adapter/ (PEFT format),
metrics.jsonl, curves.png, samples.jsonl, summary.json, checkpoints/ (train.save_every; resume=true
continues exactly) and, with export=true, merged/.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

from tqdm.auto import tqdm

from qlora.data import images
from qlora.data import preference as dpo_data
from qlora.errors import QLoRAError
from qlora.objectives.preference import LOSS_TYPES, REFERENCE_FREE, precompute_reference, preference_step
from qlora.train.loop import TrainConfig, train
from qlora.util.checks import check_bools, check_ints, check_numbers
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
from qlora_recipes.wordnet_chat import wordnet_pair_files

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@dataclass
class DPOConfig(LMRecipeConfig):
    """The keys every causal-LM recipe shares (recipes/causal_lm.py: model, data, eval_data, max_length, mode,
    the memory savers, lora, train, samples, export, out_dir, ...) and preference tuning's own below."""
    format: str = "auto"
    """auto (from the columns) | preference (prompt, chosen, rejected) | implicit_prompt (chosen, rejected)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) | hinge | ipo | robust | simpo (reference-free): TRL's names and formulas."""
    beta: float = 0.1
    """How far the policy may move from the reference (DPO's β; SimPO's reward scale)."""
    label_smoothing: float = 0.0
    """The share of pairs assumed mislabelled: sigmoid becomes conservative DPO; robust needs it < 0.5."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin γ."""
    max_prompt_length: Optional[int] = None
    """Prompts longer than this keep their last max_prompt_length tokens (None: no separate prompt limit)."""
    truncation_mode: str = "keep_start"
    """A sequence (prompt + response) longer than max_length: keep_start cuts the response's end, keep_end the
    prompt's start (TRL 1.16's collator)."""
    precompute_ref: bool = False
    """Compute the reference log-probs of every training pair once before training (one no-grad pass): each step
    then skips its reference pass (less time per step; the same numbers)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5, batch_size=4, out_dir="runs/dpo"))
    """The loop: epochs, max_steps, batch_size (pairs), lr, optimizer, eval_every, save_every, ..."""
    out_dir: str = "runs/dpo"
    """Where everything goes (train.out_dir follows it)."""

    def __post_init__(self):
        super().__post_init__()
        if self.format not in ("auto", *dpo_data.FORMATS):
            raise QLoRAError(f"format={self.format!r}; allowed: auto, {', '.join(dpo_data.FORMATS)}")
        if self.loss_type not in LOSS_TYPES:
            raise QLoRAError(f"loss_type={self.loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
        if self.truncation_mode not in dpo_data.TRUNCATION_MODES:
            raise QLoRAError(f"truncation_mode={self.truncation_mode!r}; allowed: "
                             f"{', '.join(dpo_data.TRUNCATION_MODES)}")
        check_numbers(self, ("beta", "simpo_gamma"), above=0)
        check_numbers(self, ("label_smoothing",), at_least=0, below=0.5)
        check_ints(self, ("max_prompt_length",), null="off")
        check_bools(self, ("precompute_ref",))

    def head_words(self) -> str:
        reference = ("no reference (reference-free)" if self.loss_type in REFERENCE_FREE else
                     "reference log-probs precomputed" if self.precompute_ref else
                     "reference = the same base, adapters off, no grad")
        return f"chunked log-probs ({self.loss_chunk_size} tokens), {reference}"


def load_data(cfg: DPOConfig, tokenizer, path: str) -> tuple[list[dict], list[dict], dict]:
    rows, eval_rows = read_splits(cfg, {"wordnet": wordnet_pair_files})
    processor = images.load_processor(path) if any(map(images.mentions_images, rows + eval_rows)) else None
    sets, stats = [], {}
    for name, part in (("train", rows), ("eval", eval_rows)):
        if not part:
            sets.append([])
            continue
        examples, s = dpo_data.encode_pairs(part, dpo_data.detect_format(part, cfg.format), tokenizer,
                                            max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                                            truncation_mode=cfg.truncation_mode, processor=processor)
        print(s.line(name, cfg.max_length))
        sets.append(examples)
        stats[name] = dataclasses.asdict(s)
    if not sets[0]:
        raise QLoRAError(f"no training pair is left at max_length={cfg.max_length}; raise it (or max_prompt_length)")
    return sets[0], sets[1], stats


def make_loss(cfg: DPOConfig):
    def loss_fn(model, batch):
        return preference_step(model, batch, loss_type=cfg.loss_type, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                               simpo_gamma=cfg.simpo_gamma, chunk_size=cfg.loss_chunk_size)
    return loss_fn


def make_eval(cfg: DPOConfig, eval_set: list[dict], tokenizer, loss_fn, collate, pad_id: int):
    """evaluate(model) -> {loss, rewards/..., logps/...} over the held-out pairs (each pair weighted alike);
    prints greedy samples and appends them to samples.jsonl."""
    calls = [0]

    def evaluate(model):
        device = next(model.parameters()).device
        sums, pairs = dict.fromkeys(("loss", *METRICS), 0.0), 0
        for i in range(0, len(eval_set), cfg.eval_batch_size):
            part = eval_set[i:i + cfg.eval_batch_size]
            loss = loss_fn(model, {k: v.to(device) for k, v in collate(part).items()})
            for k, v in (("loss", loss), *loss.metrics.items()):
                sums[k] = sums.get(k, 0.0) + v.item() * len(part)      # batch means, weighted by their pairs
            pairs += len(part)
        metrics = {k: v / max(pairs, 1) for k, v in sums.items()}
        chosen = eval_set[:cfg.samples]
        texts = greedy(model, tokenizer, [ex["prompt_ids"] for ex in chosen], max_new_tokens=cfg.max_new_tokens,
                       pad_id=pad_id, inputs=[{"input_ids": ex["prompt_ids"], "pictures": ex.get("pictures")} for ex in chosen])
        samples = [{"eval": calls[0], "prompt": ex["prompt"], "chosen": ex["reference"], "generated": text}
                   for ex, text in zip(chosen, texts)]
        calls[0] += 1
        append_samples(cfg, samples)
        tqdm.write(f"eval ({pairs} pairs): loss {metrics['loss']:.4f}, rewards/accuracies "
                   f"{metrics['rewards/accuracies']:.3f}, rewards/margins {metrics['rewards/margins']:.4f}, "
                   f"rewards/chosen {metrics['rewards/chosen']:.4f}, rewards/rejected {metrics['rewards/rejected']:.4f}")
        for s in samples:
            tqdm.write(f"  sample | {shown_question(s['prompt'])!r}\n    chosen:    {s['chosen']!r}\n"
                       f"    generated: {s['generated']!r}")
        return metrics
    return evaluate


def main(cfg: DPOConfig) -> dict:
    t0 = time.perf_counter()
    path, tokenizer, pad_id = load_tokenizer(cfg)
    train_set, eval_set, stats = load_data(cfg, tokenizer, path)
    model = build_model(cfg, path)

    def collate(examples):
        return dpo_data.collate(examples, pad_id, cfg.max_length, cfg.truncation_mode)
    if cfg.precompute_ref and cfg.loss_type not in REFERENCE_FREE:
        train_set = precompute_reference(model, train_set, collate, cfg.eval_batch_size, cfg.loss_chunk_size)
    loss_fn = make_loss(cfg)
    evaluate = make_eval(cfg, eval_set, tokenizer, loss_fn, collate, pad_id) if eval_set else None
    clear_samples(cfg)
    before = evaluate_before(evaluate, model)
    result = train(model, train_set, collate, loss_fn, cfg.train, eval_fn=evaluate,
                   on_first_step=report_first_step(cfg))
    after = result.evals[-1][1] if result.evals else None
    if before and after:
        print(f"held-out pairs after {result.steps} steps: rewards/accuracies {before['rewards/accuracies']:.3f} -> "
              f"{after['rewards/accuracies']:.3f}, rewards/margins {before['rewards/margins']:.4f} -> "
              f"{after['rewards/margins']:.4f}, loss {before['loss']:.4f} -> {after['loss']:.4f}")
    return finish(cfg, model, tokenizer, result, before, {"data_stats": stats, "loss_type": cfg.loss_type,
                                                          "beta": cfg.beta}, t0)
