"""The offline image-text default: a LLaVA-style model built here, Fashion-MNIST photos as chat rows, and a
held-out accuracy that needs no generation.

    folder = build_default_model()                     # cached: $QLORA_CACHE/fmnist-llava-<hash of the settings>
    train_file, eval_file = write_default_data("data/fmnist-chat", n_train=2000, n_eval=200, seed=0)
    train_file, eval_file = fashion_photo_files()       # the same, cached: what `qlora train sft_images` reads
    accuracy = heldout_accuracy(model, processor, read_rows(eval_file))     # in [0, 1]; chance is 1/10

No pretrained image-text model ships in any package we can install (/work/shared/DATA.md), so this one
is assembled here, and it knows only what its parts know: transformers' own LlavaForConditionalGeneration
joining
- a small ViT (4 layers, hidden 64, 139k params) pretrained from scratch on all ten Fashion-MNIST classes
  (the 60,000 photos of the train split, 3 epochs; image_cls's pretraining, cached) and never on a test
  photo. It sees greyscale; in the model it takes RGB (what transformers' chat templates load) with its
  patch weights spread over the three channels, which gives the same features on a grey photo;
- a randomly initialised projector (Linear 64 -> 576, GELU, Linear 576 -> 576);
- SmolLM2-135M-Instruct (qlora.bundled, weights copied) with one added token, <image>.
A photo (resized to 28x28) is 16 patches of 7x7: 16 image tokens. Nothing connects the ViT to the language
model until fine-tuning, so the built model answers "What is this?" at about chance; QLoRA SFT (LoRA on the
language model, the projector trained in full) teaches it. `heldout_accuracy` scores the ten class answers
by their log-likelihood after the prompt and takes the argmax: deterministic, and independent of sampling.
`qlora train sft_images` (recipes/configs/sft_images.yaml) trains it and prints the accuracy before and after:

    qlora train sft_images
    .venv/bin/python -m pytest -q tests/recipes/test_image_chat_default.py
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    ViTModel,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from qlora.bundled import default_cache_dir, resolve_model
from qlora.train.config import TrainConfig
from qlora.util.staging import atomic_write, make_public, publish, staging_folder
from qlora_recipes.bundled_data import fashion_mnist
from qlora_recipes.image_cls import FMNIST_MEAN, FMNIST_STD, PretrainConfig, pretrained_backbone

VERSION = 1                     # bump when the assembly, the template or the processor changes: a new cache folder
IMAGE_TOKEN = "<image>"
QUESTION = "What is this?"
ANSWERS = ["A T-shirt.", "Trousers.", "A pullover.", "A dress.", "A coat.", "A sandal.", "A shirt.", "A sneaker.",
           "A bag.", "An ankle boot."]
"""The assistant's answer for each Fashion-MNIST label 0-9."""
ENCODER = PretrainConfig(classes=list(range(10)), train_size=None, test_size=1000, epochs=3)
"""The ViT: every class, the whole train split (the test split is where the held-out photos come from)."""
# SmolLM2's ChatML, plus content lists: an image part renders as the image token, a text part as its text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ------------------------------------------------------------------------------------------ the model

def build_default_model(cache_dir=None, encoder: PretrainConfig = ENCODER, language_model: str = "smollm2",
                        seed: int = 0) -> str:
    """Folder of the default image-text model (config.json, model.safetensors, processor files): cached under
    `cache_dir` (default $QLORA_CACHE) by a hash of the settings, else built now (the ViT pretrained first
    unless it is cached too). Loads with LlavaForConditionalGeneration / AutoProcessor.from_pretrained."""
    settings = {"version": VERSION, "encoder": dataclasses.asdict(encoder), "language_model": language_model,
                "seed": seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"fmnist-llava-{key}"
    if (target / "build.json").is_file():
        return str(target)
    tmp = staging_folder(target)
    try:
        vit = pretrained_backbone(encoder, TrainConfig(out_dir=str(tmp / "encoder-run"), log_every=100), cache)
        print(f"assembling the image-text model: {vit} + {language_model} -> {target}", flush=True)
        model, processor = assemble(vit, resolve_model(language_model), seed)
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        encoder_info = json.loads((Path(vit) / "pretrain.json").read_text())
        (tmp / "build.json").write_text(json.dumps({"settings": settings, "encoder": encoder_info}, indent=2))
        make_public(tmp)                    # safetensors writes 0600
        publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def assemble(vit_folder: str, lm_folder: str, seed: int = 0):
    """(LlavaForConditionalGeneration in bf16, LlavaProcessor): the ViT, a random projector, the language model."""
    vit = ViTModel.from_pretrained(vit_folder, add_pooling_layer=False, dtype=torch.float32)
    lm = AutoModelForCausalLM.from_pretrained(lm_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    vision_config = vit.config.to_dict() | {"num_channels": 3}
    config = LlavaConfig(vision_config=vision_config, text_config=lm.config.to_dict(),
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    if not lm.config.tie_word_embeddings:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    state = vit.state_dict()
    patch = "embeddings.patch_embeddings.projection.weight"
    state[patch] = state[patch].repeat(1, 3, 1, 1) / 3          # RGB of a grey photo -> the grey features
    missing, unexpected = model.model.vision_tower.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)  # pooler: unused
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():                    # the image token's row: never an input (replaced by the image)
        model.get_input_embeddings().weight[old:] = model.get_input_embeddings().weight[:old].mean(0)
    image_processor = ViTImageProcessorPil(size={"height": vit.config.image_size, "width": vit.config.image_size},
                                           image_mean=[FMNIST_MEAN] * 3, image_std=[FMNIST_STD] * 3,
                                           do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vit.config.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    return model.to(torch.bfloat16).eval(), processor


# ------------------------------------------------------------------------------------------ the data

def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> list[int]:
    """`n` indices, as even over the classes as `n` allows (class c gets n // 10, the first n % 10 one more)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        out += idx[torch.randperm(len(idx), generator=gen)][:n // 10 + (c < n % 10)].tolist()
    return sorted(out)


def chat_row(image_path: str, label: int) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "path": image_path}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": ANSWERS[label]}]}


def write_default_data(folder, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) in `folder`: Fashion-MNIST photos as PNG files under img/ (train from the train
    split, eval from the test split, both class-balanced and seeded) and one chat row each (user: the photo and
    "What is this?"; assistant: the class, ANSWERS), image paths relative to the data file."""
    folder = Path(folder)
    files = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        images, labels = fashion_mnist("train" if split == "train" else "test")
        (folder / "img" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in balanced_subset(labels, n, seed):
            path = f"img/{split}/{i:05d}.png"
            Image.fromarray(images[i].numpy(), mode="L").save(folder / path)
            rows.append(json.dumps(chat_row(path, int(labels[i]))))
        files.append(folder / f"{split}.jsonl")
        atomic_write(files[-1], lambda p: p.write_text("\n".join(rows) + "\n"))
    return files[0], files[1]


def fashion_photo_files(n_train: int = 2000, n_eval: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """write_default_data into the cache, once per (n_train, n_eval, seed): `data=fashion_photos` in the recipes."""
    folder = default_cache_dir() / f"fmnist-chat-{n_train}-{n_eval}-{seed}"
    if (folder / "train.jsonl").is_file() and (folder / "eval.jsonl").is_file():
        return folder / "train.jsonl", folder / "eval.jsonl"
    return write_default_data(folder, n_train, n_eval, seed)


def read_rows(jsonl) -> list[dict]:
    """Rows of a chat JSONL file with every image part's path made absolute (it is relative to the file)."""
    jsonl = Path(jsonl)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    for row in rows:
        for message in row["messages"]:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") == "image" and "path" in part:
                    part["path"] = str(jsonl.parent / part["path"])
    return rows


# ------------------------------------------------------------------------------------------ encoding, scoring

def images_of(messages: list) -> list:
    return [Image.open(part["path"]) for m in messages if isinstance(m["content"], list)
            for part in m["content"] if part.get("type") == "image"]


def encode_prompt(processor, messages: list) -> dict:
    """The messages before the last (the photo and the question) + the assistant's header: {input_ids [1, P]
    with the image tokens, attention_mask, pixel_values}."""
    prompt = processor.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], images=images_of(messages[:-1]) or None, return_tensors="pt")


def answer_ids(processor, messages: list, answer: str) -> list[int]:
    """The tokens the template puts after the prompt when the assistant says `answer` (its end-of-turn too)."""
    prompt = processor.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(messages[:-1] + [{"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(prompt), (prompt, full)
    return processor.tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]


@torch.no_grad()
def answer_scores(model, processor, rows: list[dict], answers: list[str] = ANSWERS,
                  batch_size: int = 16) -> torch.Tensor:
    """[len(rows), len(answers)]: log p(answer tokens | photo, question) of each candidate answer (float32).
    The prompt runs once per row; its cache is repeated for the candidates (right-padded: causal attention
    keeps the pads out of every real token). Rows are batched with others whose prompt has the same length."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = [encode_prompt(processor, row["messages"]) for row in rows]
    candidates = [[answer_ids(processor, row["messages"], a) for a in answers] for row in rows]
    scores = torch.empty(len(rows), len(answers))
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p["input_ids"].shape[1], []).append(i)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            ids = torch.cat([prompts[i]["input_ids"] for i in chunk]).to(device)
            pixels = torch.cat([prompts[i]["pixel_values"] for i in chunk]).to(device, model.dtype)
            out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
            out.cache.batch_repeat_interleave(len(answers))
            cands = [c for i in chunk for c in candidates[i]]
            width = max(map(len, cands))
            tokens = torch.tensor([c + [0] * (width - len(c)) for c in cands], device=device)
            mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in cands], device=device)
            rest = model(input_ids=tokens, cache=out.cache).logits[:, :-1]
            logits = torch.cat([out.logits[:, -1:].repeat_interleave(len(answers), 0), rest], 1).float()
            logp = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
            scores[chunk] = (logp * mask).sum(-1).view(len(chunk), len(answers)).cpu()
    model.train(was_training)
    return scores


def heldout_accuracy(model, processor, rows: list[dict], answers: list[str] = ANSWERS, batch_size: int = 16) -> float:
    """Fraction of `rows` whose own assistant answer scores highest among `answers` (answer_scores' argmax)."""
    truth = torch.tensor([answers.index(row["messages"][-1]["content"]) for row in rows])
    return (answer_scores(model, processor, rows, answers, batch_size).argmax(-1) == truth).float().mean().item()
