"""Supervised fine-tuning (SFT) of a causal LM on your own chat or instruction data, QLoRA by default.

    qlora train sft                                                   # SmolLM2-135M-Instruct on WordNet, offline
    qlora train sft model=FOLDER_OR_HUB_ID data=my.jsonl              # your model, your data
    qlora train recipes/configs/sft.yaml data=chats/ eval_data=dev.jsonl packing=true export=true

Data (recipes/sft_data.py): a .jsonl / .json / .csv / .parquet file, a folder of them or a Hub data
set, in the `messages`, `prompt`+`completion`, Alpaca or `text` format; the loss is on the assistant
/ completion tokens (train_on=completions). The default data, `wordnet`, is WordNet 3.0 turned into
chats ("What does the noun 'X' mean?" -> gloss + example; recipes/wordnet_chat.py), split by word.

Memory savers, on by default and each switchable (the first-step memory line names them): the NF4
base with double quantization (mode=qlora), LoRA in the compute dtype, gradient checkpointing
(non-reentrant), chunked cross-entropy instead of the model's [tokens, vocab] logits, no fp32 up-casts.
Evaluation (eval loss, perplexity, greedy samples) runs before training, every train.eval_every steps
and at the end. out_dir gets adapter/, metrics.jsonl, curves.png, samples.jsonl, summary.json,
checkpoints/ (train.save_every) and, with export=true, merged/ (a failed verification: exit 1).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import qlora
from qlora.arch.loading import from_pretrained_quietly
from qlora.bundled import resolve_model
from qlora.errors import QLoRAError
from qlora.lora.config import LoraConfig
from qlora.train.loop import TrainConfig, train
from qlora.util.checks import check_ints
from qlora.util.dtypes import parse_dtype
from qlora_recipes import sft_data
from qlora_recipes.common import RecipeFailed, export_verified, split_validation, subset

MODES = ("qlora", "lora", "full")
LOSSES = ("chunked", "model")


@dataclass
class SFTConfig:
    model: str = "smollm2"
    """A model folder, a bundled name (smollm2) or a Hub id; any transformers causal LM."""
    data: str = "wordnet"
    """Training data: a file (.jsonl/.json/.csv/.parquet), a folder of them, a Hub data set name, or
    `wordnet` (the bundled WordNet chat set)."""
    eval_data: Optional[str] = None
    """Evaluation data: a file/folder, or a split name of the Hub data set. None: eval_fraction of data
    (for data=wordnet: its own eval split, whose words are unseen in training)."""
    eval_fraction: float = 0.05
    """Share of the rows held out (seeded) for evaluation when eval_data is None; 0: no evaluation."""
    split: str = "train"
    """The split of a Hub data set to train on."""
    format: str = "auto"
    """auto (from the columns) | messages | prompt_completion | alpaca | text."""
    train_on: str = "completions"
    """completions: loss on assistant / completion tokens only; all: on every token."""
    max_length: int = 512
    """Tokens per example; longer ones are cut (counted), those left with nothing to learn dropped."""
    packing: bool = False
    """Concatenate examples into rows of max_length tokens (position ids restart, no cross-attention)."""
    train_size: Optional[int] = None
    """None: every training row; an int: a seeded subset (quick runs)."""
    eval_size: Optional[int] = 256
    """Evaluation rows used (seeded subset); None: all."""
    mode: str = "qlora"
    """qlora (NF4 base + LoRA) | lora (float base + LoRA) | full (every weight trains)."""
    compute_dtype: str = "auto"
    """auto = bfloat16 on CUDA, float32 on CPU; the float base's dtype and the adapters' dtype."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer in backward (non-reentrant) instead of keeping its activations."""
    loss: str = "chunked"
    """chunked: qlora.levers.losses' chunked head + cross-entropy (never the full logits); model: the model's own loss."""
    loss_chunk_size: int = 256
    """Tokens per chunk of the chunked loss (peak: 4 x chunk x vocab bytes of fp32 logits)."""
    upcast_norms: bool = False
    """Cast norms, embeddings and the head to fp32 (PEFT's habit; costs memory)."""
    mlp_tile: int = 0
    """Long context: the MLPs in sequence tiles of this many tokens (qlora.levers.tiled_mlp; same result, one
    tile's [tile, intermediate] tensors at a time, one more MLP forward per step); 0: off."""
    mlp_tile_min_tokens: int = 4096
    """With mlp_tile: only inputs of more than this many tokens are tiled."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05,
                                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    """Adapter settings (modes lora and qlora)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4, batch_size=8, out_dir="runs/sft"))
    """The loop: epochs, max_steps, batch_size, lr, optimizer, eval_every, save_every, offload_activations..."""
    eval_batch_size: int = 8
    """Examples per evaluation forward pass."""
    samples: int = 3
    """Greedy generation samples per evaluation (prompt, reference, generated)."""
    max_new_tokens: int = 64
    """Tokens generated per sample."""
    export: bool = False
    """After training: merge the adapter into a plain model folder out_dir/merged, verified."""
    export_dtype: str = "bfloat16"
    """dtype of the merged export."""
    out_dir: str = "runs/sft"
    """Where everything goes (train.out_dir follows it)."""

    def __post_init__(self):
        checks = {"mode": (self.mode, MODES), "loss": (self.loss, LOSSES),
                  "train_on": (self.train_on, ("completions", "all")),
                  "format": (self.format, ("auto", *sft_data.FORMATS))}
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise QLoRAError(f"{key}={value!r}; allowed: {', '.join(allowed)}")
        if self.compute_dtype != "auto":
            parse_dtype(self.compute_dtype)
        check_ints(self, ("max_length", "loss_chunk_size", "eval_batch_size", "max_new_tokens"))
        check_ints(self, ("mlp_tile", "mlp_tile_min_tokens"), minimum=0)
        check_ints(self, ("train_size", "eval_size"), null="")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise QLoRAError(f"samples={self.samples!r}: must be an integer >= 0")
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)) \
                or not 0 <= self.eval_fraction < 1:
            raise QLoRAError(f"eval_fraction={self.eval_fraction!r}: must be in [0, 1)")
        for key in ("packing", "gradient_checkpointing", "upcast_norms", "export"):
            if not isinstance(getattr(self, key), bool):
                raise QLoRAError(f"{key}={getattr(self, key)!r}: must be true or false")
        if not isinstance(self.data, str) or not self.data.strip():
            raise QLoRAError("data= is empty: give a file, a folder, a Hub data set or wordnet")
        self.train = dataclasses.replace(self.train, out_dir=self.out_dir)

    def resolved_compute_dtype(self) -> torch.dtype:
        if self.compute_dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return parse_dtype(self.compute_dtype)

    def savers(self) -> str:
        """The memory savers of this run, in words (the first-step memory line)."""
        return ", ".join([
            "NF4 base + double quant" if self.mode == "qlora" else f"{self.mode} (no 4-bit base)",
            f"gradient checkpointing {'on (non-reentrant)' if self.gradient_checkpointing else 'OFF'}",
            f"chunked loss ({self.loss_chunk_size} tokens)" if self.loss == "chunked" else "model loss (full logits)",
            "fp32 up-casts ON" if self.upcast_norms else "no fp32 up-casts",
            f"optimizer {self.train.optimizer}",
            f"activation offload {'on' if self.train.offload_activations else 'off'}"]
            + ([f"MLP in {self.mlp_tile}-token tiles above {self.mlp_tile_min_tokens} tokens"] if self.mlp_tile else []))


def load_data(cfg: SFTConfig, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """(train examples, eval examples, stats): read, split, subset, encode, truncate."""
    data, eval_data = cfg.data, cfg.eval_data
    if data == "wordnet":
        from qlora_recipes.wordnet_chat import wordnet_chat_files
        train_file, eval_file = wordnet_chat_files()
        data, eval_data = str(train_file), eval_data or str(eval_file)
    rows = sft_data.read_rows(data, cfg.split)
    if eval_data is not None:
        local = Path(eval_data).expanduser().exists() or sft_data._looks_local(eval_data)
        hub = not Path(data).expanduser().exists()
        eval_rows = sft_data.read_rows(data, eval_data) if hub and not local else sft_data.read_rows(eval_data)
    elif cfg.eval_fraction > 0:
        rows, eval_rows = split_validation(rows, cfg.eval_fraction, cfg.train.seed)
    else:
        eval_rows = []
    rows = subset(rows, cfg.train_size, cfg.train.seed)
    eval_rows = subset(eval_rows, cfg.eval_size, cfg.train.seed)
    encoder = sft_data.Encoder(tokenizer, train_on=cfg.train_on)
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


def build_model(cfg: SFTConfig, path: str):
    from transformers import AutoModelForCausalLM

    from qlora.levers.checkpointing import prepare_for_training
    from qlora.modes import build_for_mode
    dtype = cfg.resolved_compute_dtype()
    lora = dataclasses.replace(cfg.lora, dtype=cfg.lora.dtype or (dtype if cfg.mode == "qlora" else None))
    model = build_for_mode(cfg.mode, load_float=lambda: from_pretrained_quietly(AutoModelForCausalLM, path, dtype=dtype),
                           load_4bit=lambda: qlora.load_4bit(path, AutoModelForCausalLM, compute_dtype=dtype),
                           lora=lora)
    model = prepare_for_training(model, checkpointing=cfg.gradient_checkpointing, upcast_norms=cfg.upcast_norms)
    if cfg.mlp_tile:
        from qlora.levers.tiled_mlp import tile_mlps
        tile_mlps(model, tile=cfg.mlp_tile, min_tokens=cfg.mlp_tile_min_tokens)
    return model


def make_loss(cfg: SFTConfig):
    """loss_fn(model, batch): the mean cross-entropy over the batch's learned tokens. In training, its
    first call of step 2 prints the first step's memory line (train() has logged it by then)."""
    calls = [0]

    def loss_fn(model, batch):
        if model.training:
            calls[0] += 1
            if calls[0] == cfg.train.grad_accum + 1:
                _print_first_step(cfg)
        if cfg.loss == "chunked":
            return qlora.causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                                        position_ids=batch.get("position_ids"), chunk_size=cfg.loss_chunk_size)
        return model(**batch, use_cache=False).loss
    return loss_fn


def make_eval(cfg: SFTConfig, eval_set: list[dict], tokenizer, loss_fn, pad_id: int):
    """evaluate(model) -> {loss, perplexity}; prints greedy samples and appends them to samples.jsonl."""
    from tqdm.auto import tqdm
    samples_path = Path(cfg.out_dir) / "samples.jsonl"
    calls = [0]

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
        samples = []
        chosen = eval_set[:cfg.samples]
        if chosen:
            # one batched greedy generate, prompts left-padded: each new token costs one pass over the
            # weights (on a CPU, dequantizing every 4-bit layer), so all samples share it
            prompts = [tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"] for ex in chosen]
            width = max(map(len, prompts))
            ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(prompts):
                ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for ex, new in zip(chosen, out[:, width:]):
                samples.append({"eval": calls[0], "prompt": ex["prompt"], "reference": ex["reference"],
                                "generated": tokenizer.decode(new, skip_special_tokens=True)})
        calls[0] += 1
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        with open(samples_path, "a") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
        tqdm.write(f"eval: loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f} ({count:,} tokens)")
        for s in samples:
            shown = re.sub(r"<\|[^|>]*\|>", "", s["prompt"]).rstrip().splitlines()   # the log shows the last user line
            question = shown[-2] if len(shown) >= 2 else s["prompt"]
            tqdm.write(f"  sample | {question.strip()!r}\n    reference: {s['reference']!r}\n"
                       f"    generated: {s['generated']!r}")
        return {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    return evaluate


def _print_first_step(cfg: SFTConfig) -> None:
    from tqdm.auto import tqdm

    from qlora.train.loop import read_metrics
    path = Path(cfg.out_dir) / "metrics.jsonl"
    rows = [r for r in read_metrics(path) if "first_step_peak_bytes" in r] if path.is_file() else []
    if rows:
        tqdm.write(memory_line(cfg, rows[-1]["first_step_peak_bytes"], rows[-1]["peak_method"]))


def memory_line(cfg: SFTConfig, peak, method: str) -> str:
    from memprofile.report import human
    return f"first step: peak {human(peak, digits=1)} ({method}); savers: {cfg.savers()}"


def main(cfg: SFTConfig) -> dict:
    from transformers import AutoTokenizer
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    path = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise QLoRAError(f"the tokenizer of {cfg.model} has neither a pad nor an EOS token")
    train_set, eval_set, stats = load_data(cfg, tokenizer)
    if cfg.packing:
        train_set = sft_data.pack(train_set, cfg.max_length)
        print(f"packing: {stats['train']['kept']:,} examples -> {len(train_set):,} rows of <= {cfg.max_length} tokens")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, path)
    trainable, total = qlora.count_parameters(model)
    print(f"{cfg.model} · {cfg.mode}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.3f}%); savers: {cfg.savers()}")
    loss_fn = make_loss(cfg)
    evaluate = make_eval(cfg, eval_set, tokenizer, loss_fn, pad_id) if eval_set else None
    (out / "samples.jsonl").unlink(missing_ok=True)        # this run's samples only

    before = None
    if evaluate is not None:
        print("before training:")
        model.eval()
        with torch.no_grad():
            before = evaluate(model)
        model.train()
    result = train(model, train_set, lambda batch: sft_data.collate(batch, pad_id), loss_fn, cfg.train,
                   eval_fn=evaluate)
    print(memory_line(cfg, result.first_step_peak_bytes, result.peak_method))
    if before is not None:      # the curve starts from the untrained model (train() began a fresh log)
        from qlora.train.loop import plot_curves, read_metrics
        rows = [{"step": 0, **{f"eval_{k}": v for k, v in before.items()}}, *read_metrics(out / "metrics.jsonl")]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    after = result.evals[-1][1] if result.evals else None
    if cfg.mode == "full":
        model.save_pretrained(str(out / "model"))
        tokenizer.save_pretrained(str(out / "model"))
    # lora / qlora: train() wrote the final adapter to out_dir/adapter (gathered under FSDP)
    summary = {"model": cfg.model, "mode": cfg.mode, "data": cfg.data, "steps": result.steps,
               "trainable_params": trainable, "total_params": total, "savers": cfg.savers(),
               "first_step_peak_bytes": result.first_step_peak_bytes, "peak_method": result.peak_method,
               "mean_step_seconds": result.mean_step_seconds, "eval_before": before, "eval_after": after,
               "data_stats": stats, "packing": cfg.packing, "wall_seconds": None}
    if before and after:
        print(f"eval loss {before['loss']:.4f} -> {after['loss']:.4f} (perplexity {before['perplexity']:.2f} -> "
              f"{after['perplexity']:.2f}) after {result.steps} steps")
    failure = None
    if cfg.export:
        if cfg.mode == "full":
            print("export: mode=full has no adapter to merge; the trained model is in out_dir/model")
        else:
            export = export_verified(model, out / "merged", dtype=cfg.export_dtype, tokenizer=tokenizer)
            summary["export"] = {"out": str(export.out), "verification": export.verification}
            failure = None if export.verification.get("passed") is not False else export
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done in {summary['wall_seconds']:.0f} s: {out}/adapter (or model/), metrics.jsonl, curves.png, "
          "samples.jsonl, summary.json")
    if failure is not None:
        raise RecipeFailed(f"the merged export in {failure.out} failed its verification (it differs from the "
                           "trained model more than the limits allow)")
    return summary
