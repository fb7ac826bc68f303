"""Does the offline image-text default learn? Build it, QLoRA-SFT it on Fashion-MNIST chat rows, held-out accuracy
before and after, and the time of each phase.

    python benchmarks/image_chat_default.py                     # the defaults below: ~9 min on 2 busy CPU cores
    python benchmarks/image_chat_default.py --steps 20 --n-eval 50 --json runs/image_chat_default.json

The model is qlora_recipes.image_chat_default's (a ViT pretrained here on Fashion-MNIST + a random projector +
SmolLM2-135M-Instruct, transformers' LlavaForConditionalGeneration; built and cached on the first run). Here:
NF4 language model (qlora.quantize_model; the vision tower and the projector stay float), LoRA on the language
model's Linear layers, the projector trained in full (modules_to_save), labels on the assistant's tokens only,
then qlora_recipes.image_chat_default.heldout_accuracy on photos of the test split (chance: 1 in 10).
This is the loop `qlora train sft` will run on these files once it reads image rows; until then, this script.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import qlora
from qlora.train.loop import TrainConfig, train
from qlora_recipes.image_chat_default import (
    ENCODER,
    build_default_model,
    encode_example,
    heldout_accuracy,
    read_rows,
    write_default_data,
)
from qlora_recipes.image_cls import pretrained_backbone

LANGUAGE_LINEARS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def collate(pad_id: int):
    def batch(examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        pad = lambda t, value: torch.nn.functional.pad(t, (0, width - len(t)), value=value)  # noqa: E731
        return {"input_ids": torch.stack([pad(e["input_ids"], pad_id) for e in examples]),
                "attention_mask": torch.stack([pad(torch.ones_like(e["input_ids"]), 0) for e in examples]),
                "labels": torch.stack([pad(e["labels"], -100) for e in examples]),
                "pixel_values": torch.stack([e["pixel_values"] for e in examples])}
    return batch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a busy CPU)")
    ap.add_argument("--cache", default=None, help="cache folder (default $QLORA_CACHE)")
    ap.add_argument("--data", default="runs/image_chat_default/data")
    ap.add_argument("--json", default="runs/image_chat_default/result.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    times, result = {}, {}

    def phase(name, fn):
        start = time.perf_counter()
        value = fn()
        times[name] = round(time.perf_counter() - start, 1)
        print(f"[{name}: {times[name]} s]", flush=True)
        return value

    out_dir = str(Path(args.json).parent)
    phase("encoder pretraining", lambda: pretrained_backbone(ENCODER, TrainConfig(out_dir=out_dir), args.cache))
    folder = phase("build", lambda: build_default_model(args.cache))
    train_file, eval_file = phase("data", lambda: write_default_data(args.data, args.n_train, args.n_eval, seed=0))

    def load():
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        qlora.quantize_model(model, compute_dtype=torch.float32, skip_modules=["vision_tower", "multi_modal_projector"])
        return model, AutoProcessor.from_pretrained(folder)
    model, processor = phase("load + NF4", load)
    rows = read_rows(eval_file)
    result["accuracy_before"] = phase("eval before", lambda: heldout_accuracy(model, processor, rows))
    print(f"held-out accuracy before: {100 * result['accuracy_before']:.1f}% (chance 10%)", flush=True)

    qlora.add_lora(model, qlora.LoraConfig(r=args.r, lora_alpha=args.r, target_modules=LANGUAGE_LINEARS,
                                           modules_to_save=["multi_modal_projector"]))
    examples = [encode_example(processor, row["messages"]) for row in read_rows(train_file)]
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_ratio=0.05,
                         log_every=10, out_dir=str(Path(out_dir) / "train"), overwrite=True)
    run = phase("train", lambda: train(model, examples, collate(processor.tokenizer.pad_token_id),
                                       lambda m, batch: m(**batch).loss, config))
    result["accuracy_after"] = phase("eval after", lambda: heldout_accuracy(model, processor, rows))
    print(f"held-out accuracy after: {100 * result['accuracy_after']:.1f}% (chance 10%)", flush=True)
    result.update(times_s=times, steps=run.steps, batch=args.batch, lr=args.lr, r=args.r, n_train=args.n_train,
                  n_eval=len(rows), threads=torch.get_num_threads(), image_tokens=int(
                      (examples[0]["input_ids"] == model.config.image_token_id).sum()),
                  final_loss=run.losses[-1][1] if run.losses else None, model=folder)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
