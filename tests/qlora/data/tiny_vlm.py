"""Tiny image-text checkpoints built offline for the image tests: a random model and its processor saved to a folder.

    folder = save_tiny_vlm("llava", tmp_path / "llava", smol_tok_dir)     # or "gemma3", "llava_next"
    pictures = write_pictures(tmp_path, {"a.png": (32, 32), "b.png": (16, 48)})   # random RGB PNGs

The processor joins SmolLM2-135M-Instruct's tokenizer (its ChatML template, extended to write each image
part's placeholder) with an image processor of the family constructed with small sizes (the PIL ones:
torchvision is not installed here, which rules out the Qwen2-VL / Qwen2.5-VL and Pixtral processors): LLaVA's
CLIP processor crops every picture to 16 x 16 (patch 8: 4 image tokens after the `<image>` placeholder);
Gemma 3's resizes to 32 x 32 and replaces its `<start_of_image>` placeholder by "\n\n<start_of_image>", 4
soft image tokens, "<end_of_image>\n\n", with `token_type_ids` (1 on image tokens); LLaVA-NeXT's tiles each
picture at the best of 16 x 32 / 32 x 16 / 32 x 32 (16 x 16 tiles plus the whole: 3 or 5 of them per picture,
so pictures of different shapes give pixel_values of different sizes, and `image_sizes`). The models are 1-2
layers, hidden 32, in float32.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PLACEHOLDER = {"llava": "<image>", "gemma3": "<start_of_image>", "llava_next": "<image>"}
GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}PLACEHOLDER{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokens_per_image(family: str, height: int, width: int) -> int:
    """The image tokens a picture of this size becomes (LLaVA and Gemma 3 resize to one size: 4 for any picture)."""
    assert family in ("llava", "gemma3")
    return 4


def processor_for(family: str, tok_dir, template: str | None = None):
    from transformers import AutoTokenizer
    extra = GEMMA3_TOKENS if family == "gemma3" else {"image_token": "<image>"}
    tok = AutoTokenizer.from_pretrained(str(tok_dir), extra_special_tokens=extra)
    tok.add_tokens(list(extra.values()), special_tokens=True)
    template = template if template is not None else TEMPLATE.replace("PLACEHOLDER", PLACEHOLDER[family])
    if family == "llava":
        from transformers import CLIPImageProcessorPil, LlavaProcessor
        images = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        return LlavaProcessor(images, tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=template)
    if family == "llava_next":
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
        images = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                            image_grid_pinpoints=PINPOINTS)
        return LlavaNextProcessor(images, tok, patch_size=8, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1, chat_template=template)
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return Gemma3Processor(images, tok, chat_template=template, image_seq_length=4)


def model_for(family: str, processor):
    tok = processor.tokenizer
    vocab = len(tok)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if family in ("llava", "llava_next"):
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
        )
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  image_size=16, patch_size=8, projection_dim=32)
        common = dict(vision_config=vision, text_config=LlamaConfig(**text), vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
        if family == "llava":
            return LlavaForConditionalGeneration(LlavaConfig(**common, image_token_id=processor.image_token_id)).eval()
        cfg = LlavaNextConfig(**common, image_token_index=processor.image_token_id, image_grid_pinpoints=PINPOINTS)
        return LlavaNextForConditionalGeneration(cfg).float().eval()
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    cfg = Gemma3Config(text_config=Gemma3TextConfig(**text, head_dim=8, sliding_window=16),
                       vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=4, image_size=32, patch_size=8),
                       mm_tokens_per_image=4, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                       image_token_index=tok.image_token_id)
    return Gemma3ForConditionalGeneration(cfg).float().eval()


PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def save_tiny_vlm(family: str, folder, tok_dir):
    """A random tiny `family` model and its processor, saved to `folder` (returned)."""
    processor = processor_for(family, tok_dir)
    model_for(family, processor).save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def write_pictures(folder, sizes: dict, seed: int = 0) -> dict:
    """{name: path} of random RGB PNGs of the given (height, width)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (h, w) in sizes.items():
        out[name] = folder / name
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out[name])
    return out
