"""Images in a planned step: what the processor makes of one image and where its tokens go in a row.

    pixels = image_inputs(config, 448)             # one blank 448x448 image through the model type's processor
    n = image_tokens(model, pixels)                 # the image tokens the model expects for it (its own count)
    batch = with_images(model, batch, pixels, n, images=1)    # a text batch with 1 image per row
    batch = add_images(model, batch, images=1)      # the same for a real model's step, in one call

One rule for every family: the image processor class transformers maps to the config's type
(IMAGE_PROCESSOR_MAPPING_NAMES, its PIL backend: no torchvision needed; a variant without one of its own, the
family's: `qwen3_vl_moe` -> `qwen3_vl`), built with its defaults, where the vision
config names the same setting (patch_size, temporal_patch_size, ...) with the config's value, and, for a tower of
a fixed resolution (a vision config with an `image_size`), every size setting at that resolution (`size`,
`crop_size`, the tiles' `max_image_size`). It runs on a blank image of
the given size: the real `pixel_values`, `image_grid_thw`, `image_sizes`, ... shapes. The number of image tokens
is the model's: the rows of its `get_image_features` output (what its placeholder check counts).
"""
from __future__ import annotations

import inspect

import torch

from memprofile.fake import constant, outside_trace
from qlora.arch.multimodal import text_config_of
from qlora.errors import QLoRAError

SIDES = ("height", "width", "shortest_edge", "longest_edge")
TYPE_IDS = ("token_type_ids", "mm_token_type_ids")   # transformers' names for the processor's image-token mask


def default_image_size(config) -> int:
    """The vision config's image_size, or 448 where it has none (a tower of any resolution)."""
    return int(getattr(getattr(config, "vision_config", None), "image_size", None) or 448)


def image_inputs(config, size: int) -> dict:
    """The processor's tensors for one blank `size` x `size` image (real CPU tensors). QLoRAError (one line) for a
    text model or a processor that cannot be built or run here."""
    from PIL import Image  # lazy: only a plan with images needs PIL
    from transformers.models.auto.image_processing_auto import (  # lazy: slow import
        IMAGE_PROCESSOR_MAPPING_NAMES,
        get_image_processor_class_from_name,
    )

    if text_config_of(config) is None:
        raise QLoRAError(f"{config.model_type} is a text model: it takes no images (leave --images at 0)")
    try:
        backends = IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type) or IMAGE_PROCESSOR_MAPPING_NAMES.get(
            sibling(config.model_type, IMAGE_PROCESSOR_MAPPING_NAMES)) or {}
        name = backends.get("pil") or next(iter(backends.values()), None)
        if name is None:
            raise ValueError("transformers maps no image processor to this model type")
        cls = get_image_processor_class_from_name(name)
        defaults, vision = cls(), getattr(config, "vision_config", None)
        kwargs = {k: getattr(vision, k) for k, v in vars(defaults).items()
                  if vision is not None and k in vars(vision) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        side = getattr(vision, "image_size", None)
        for key, given in vars(defaults).items() if side else ():      # size, crop_size, max_image_size (tiles)
            named = [k for k in SIDES if (given.get(k) if isinstance(given, dict) else getattr(given, k, None))]
            if named and not isinstance(given, (int, float, str)):
                kwargs[key] = {k: side for k in named}
        out = cls(**kwargs)(Image.new("RGB", (size, size)), return_tensors="pt")
    except Exception as e:  # noqa: BLE001 - a missing backend (torchvision), a family's own rule: one line
        said = " ".join(str(e).split())
        said = type(e).__name__ + (f": {said[:157]}..." if len(said) > 160 else f": {said}" if said else "")
        raise QLoRAError(f"{config.model_type}: its image processor cannot be built here ({said})") from None
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def sibling(model_type: str, mapped) -> str | None:
    """The longest model type in `mapped` that `model_type` extends (`qwen3_vl_moe` -> `qwen3_vl`): a family's
    variant (its MoE) shares its processor, which transformers maps only for the family."""
    parents = [k for k in mapped if model_type.startswith(k + "_")]
    return max(parents, key=len, default=None)


def forward_inputs(model, pixels: dict, copies: int = 1, known: bool = True) -> dict:
    """The processor's tensors the model's forward takes, repeated `copies` times along the images: float ones as
    ones of their shape (not zeros: Idefics3 and SmolVLM drop all-zero images as padding), integer ones (grids,
    sizes, masks) with their values. Inside a trace the integer ones are constants of it (memprofile.fake.constant:
    shapes that follow from grids are traced as they run), and so are the float ones when `known` (towers that pick
    images or patches by their values: Idefics3's padding check; otherwise fakes, which cost the planner nothing)."""
    names = inspect.signature(model.forward).parameters
    taken = {k: v for k, v in pixels.items() if k in names}
    ones = lambda v: torch.ones((v.shape[0] * copies, *v.shape[1:]), dtype=v.dtype)  # noqa: E731
    fake = {k for k, v in taken.items() if v.is_floating_point() and not known}     # made under the trace: no bytes
    with outside_trace():
        real = {k: ones(v) if v.is_floating_point() else v.repeat(copies, *([1] * (v.dim() - 1)))
                for k, v in taken.items() if k not in fake}
    return {**{k: constant(v) for k, v in real.items()}, **{k: ones(taken[k]) for k in fake}}


def known_numel(pixels: dict, copies: int) -> int:
    """Elements of the largest processor tensor of `copies` images: what ops on them make, kept as constants."""
    return max((v.numel() * copies for v in pixels.values()), default=0)


def image_tokens(model, pixels: dict, known: bool = True) -> int:
    """Image tokens the model expects for one image: the rows of its image features (real or fake tensors; `known`:
    see forward_inputs)."""
    with torch.no_grad():
        out = model.get_image_features(**forward_inputs(model, pixels, known=known))
    feats = getattr(out, "pooler_output", out)
    feats = feats if isinstance(feats, (list, tuple)) else [feats]
    return sum(f.numel() // f.shape[-1] for f in feats)


def with_images(model, batch: dict, pixels: dict, tokens: int, images: int) -> dict:
    """A new batch: `images` images per row, their `tokens` image tokens each after the first token of every row
    (labels -100 there; the image token id nowhere else), the processor's tensors repeated for each image of each
    row (forward_inputs), the image-token mask under the model's name for it."""
    ids = batch["input_ids"]
    rows, seq = ids.shape
    n = images * tokens
    if n + 1 > seq:
        raise QLoRAError(f"{images} image(s) of {tokens} tokens need a sequence of more than {n} tokens (--seq {seq})")
    token = text_config_of(model.config) and model.config.image_token_id
    place = torch.zeros(seq, dtype=torch.bool)
    place[1:n + 1] = True
    out = dict(batch, input_ids=torch.where(place, token, torch.where(ids == token, 0, ids)))
    if "labels" in batch:
        out["labels"] = torch.where(place, -100, out["input_ids"])
    out.update(forward_inputs(model, pixels, rows * images))
    mask = place.long().expand(rows, seq).clone()
    out.update({k: mask for k in TYPE_IDS if k in inspect.signature(model.forward).parameters})
    return out


def add_images(model, batch: dict, images: int, size=None) -> dict:
    """with_images for a real step (qlora profile, the tests): the processor's tensors and the model's count."""
    pixels = image_inputs(model.config, size or default_image_size(model.config))
    return with_images(model, batch, pixels, image_tokens(model, pixels), images)
