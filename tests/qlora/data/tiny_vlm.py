"""Tiny image-text checkpoints built offline for the image tests: a random model and its processor saved to a folder.

    folder = save_tiny_vlm("llava", tmp_path / "llava", smol_tok_dir)     # or "gemma3", "llava_next", "qwen3_vl"
    pictures = write_pictures(tmp_path, {"a.png": (32, 32), "b.png": (16, 48)})   # random RGB PNGs

The processor joins SmolLM2-135M-Instruct's tokenizer (its ChatML template, extended to write each image
part's placeholder) with an image processor of the family constructed with small sizes (the PIL ones: torchvision
is not installed here): LLaVA's CLIP processor crops every picture to 16 x 16 (patch 8: 4 image tokens after the
`<image>` placeholder); Gemma 3's resizes to 32 x 32 and replaces its `<start_of_image>` placeholder by
"\n\n<start_of_image>", 4 soft image tokens, "<end_of_image>\n\n", with `token_type_ids` (1 on image tokens);
LLaVA-NeXT's tiles each picture at the best of 16 x 32 / 32 x 16 / 32 x 32 (16 x 16 tiles plus the whole: 3 or 5
of them per picture, so pictures of different shapes give pixel_values of different sizes, and `image_sizes`);
Qwen3-VL's resizes each picture to a multiple of 8 between 16 x 16 and 32 x 32 pixels and keeps its shape (one
image token per 8 x 8 patch: 16 for 32 x 32, 12 for 16 x 48; `image_grid_thw`, `mm_token_type_ids`, and
`pixel_values` of [patches, 384] concatenated over the pictures). transformers 5.25 cannot build Qwen3-VL's
processor without torchvision (its video processor), so the tests build it themselves (UncheckedQwen3VLProcessor)
and hand it over; its saved folder names the real classes, so loading it here is the one-line error a user gets.
The models are 1-2
layers, hidden 32, in float32.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

PLACEHOLDER = {"llava": "<image>", "gemma3": "<start_of_image>", "llava_next": "<image>",
               "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
               "vision_end_token": "<|vision_end|>"}
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
    extra = {"gemma3": GEMMA3_TOKENS, "qwen3_vl": QWEN_TOKENS}.get(family, {"image_token": "<image>"})
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
    if family == "qwen3_vl":
        from transformers import Qwen2VLImageProcessorPil
        from transformers.video_processing_utils import BaseVideoProcessor
        images = Qwen2VLImageProcessorPil(patch_size=8, merge_size=1, temporal_patch_size=2, min_pixels=16 * 16,
                                          max_pixels=32 * 32)
        return UncheckedQwen3VLProcessor(images, tok, BaseVideoProcessor(), chat_template=template)
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return Gemma3Processor(images, tok, chat_template=template, image_seq_length=4)


class UncheckedQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor built without torchvision: transformers 5.25 cannot check a video processor's class
    (any class) when torchvision is missing, and Qwen3VLVideoProcessor needs it. Images only; not loadable from the
    saved folder here (its processor_config names this class): the tests hand it to the recipes directly."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None


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
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
        ids = {k + "_id": tok.convert_tokens_to_ids(v) for k, v in QWEN_TOKENS.items()}
        cfg = Qwen3VLConfig(
            text_config=dict(text, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10_000,
                                                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
            vision_config=dict(depth=1, in_chans=3, hidden_act="gelu_pytorch_tanh", intermediate_size=32,
                               out_hidden_size=32, hidden_size=32, num_heads=4, patch_size=8, spatial_merge_size=1,
                               temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0]),
            tie_word_embeddings=False, **ids)
        return Qwen3VLForConditionalGeneration(cfg).float().eval()
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
    if family == "qwen3_vl":          # the class names a real checkpoint's processor_config.json holds
        path = Path(folder) / "processor_config.json"
        saved = json.loads(path.read_text())
        saved["processor_class"] = "Qwen3VLProcessor"
        saved["video_processor"]["video_processor_type"] = "Qwen3VLVideoProcessor"
        path.write_text(json.dumps(saved, indent=2))
    return folder


def write_pictures(folder, sizes: dict, seed: int = 0) -> dict:
    """{name: path} of random RGB PNGs of the given (height, width)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (h, w) in sizes.items():
        out[name] = folder / name
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out[name])
    return out
