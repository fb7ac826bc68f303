"""Images in chat rows: where each picture comes from, reading it, the processor's tokens, batching.

    processor = load_processor(path)                     # the model's processor; None without an image processor
    check_processor(row, processor, chat=True)          # a row with images: an image processor, chat messages
    messages, sources = row_images(row, messages)        # where each image part's picture comes from, in order
    ex = expand(processor, row, text, sources, ids, labels, prompt_tokens)   # the processor's ids, labels moved
    batch.update(collate_inputs(examples, width))        # the processor's tensors of a batch

An image part (`{"type": "image", ...}` in a message's content list) names its picture with `path`
(relative to the data file's folder), `url` (http(s) or data: URLs, read by transformers' load_image) or
`image` (a path, or a picture a Hub data set decoded). A part without one takes the next value of the
row's `images` column (TRL's layout: paths, URLs, pictures or a Hub data set's {"bytes", "path"} dicts);
a row whose messages hold no image part but whose `images` column is filled gets its pictures before
the text of its first user turn (as TRL does). Parts and pictures must pair up exactly.

The processor (its own call, whatever the family) turns the rendered chat into its token ids, each image
placeholder expanded into that image's tokens, plus its tensors. The labels, found on the template's
text (qlora.data.sft), move onto the processor's ids by aligning the two token sequences (difflib): the
tokens the processor added or changed, and its image / video / audio tokens, are never learned and are
the row's media tokens (`media_end`: one past the last of them; a cut before it would lose an image, so
such a row is dropped). An example keeps its pictures as their sources (`Pictures`: the row, the
rendered text, paths / URLs / the data set's own objects), never their pixels: the processor runs again
when a batch is collated, so memory does not grow with the data set's pictures. Its tensors then: those
of shape [1, tokens] and integer (mm_token_type_ids, token_type_ids, ...) follow the tokens (cut to the
example's tokens, padded with 0); all others (pixel_values, image_grid_thw, image_sizes,
pixel_attention_mask, ...) are concatenated over the batch's rows on their first axis, their other axes
zero-padded to the largest.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.image_utils import load_image

from qlora.data.rows import IGNORE, IMAGE_SOURCES, Row, field_value
from qlora.errors import QLoRAError

URL_SCHEMES = ("http://", "https://", "data:")


def load_processor(path):
    """The model's processor (transformers' AutoProcessor) when it has an image processor, else None. One that
    needs a package not installed (Qwen2/2.5/3-VL's and Qwen3.5's need torchvision in transformers 5) is a
    QLoRAError naming it."""
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):         # a text model's folder: no processor files
        return None
    except ImportError as e:     # a part needing a package not installed: Qwen-VL's video processor, torchvision
        said = " ".join(str(e).split()).split(". ")[0]
        raise QLoRAError(f"{path}: the model's processor cannot be loaded here: {said}; install it (for torchvision: "
                         "pip install torchvision, the build matching your torch)") from None
    return processor if getattr(processor, "image_processor", None) is not None else None


def mentions_images(row: Row) -> bool:
    """Whether the row has an image part in any column (messages a CSV cell holds as JSON text too) or a filled
    `images` column."""
    def has(value) -> bool:
        if isinstance(value, dict):
            return value.get("type") == "image" or any(has(v) for v in value.values())
        return isinstance(value, list) and any(has(v) for v in value)
    return bool(row.data.get("images")) or any(has(field_value(row, k, optional=True)) for k in row.data)


def check_processor(row: Row, processor, chat: bool) -> None:
    """A row with images needs an image processor and a chat (its image parts are in messages)."""
    if processor is None or not chat:
        raise QLoRAError(f"{row.where}: the row has images, but " + (
            "the model has no image processor; use an image-text model (its folder holds the processor files, e.g. "
            "preprocessor_config.json) or drop the image parts" if processor is None else
            "only chat rows (lists of messages) can hold image parts"))


def as_parts(messages: list[dict]) -> list[dict]:
    """The messages with every text content as one text part: image-text templates read content as parts."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]}
            for m in messages]


def row_images(row: Row, messages: list[dict]) -> tuple[list[dict], list]:
    """(messages, sources): where the picture of each of the row's image parts comes from, in order (new
    messages, with image parts added to the first user turn when only the `images` column names pictures)."""
    column = row.data.get("images")
    column = [] if column is None else list(column) if isinstance(column, (list, tuple)) else [column]
    parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
    if not parts and column:
        first = next((k for k, m in enumerate(messages) if m["role"] == "user"), 0)
        messages = [m if k != first else {**m, "content": [{"type": "image"}] * len(column) + (
            [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"])}
            for k, m in enumerate(messages)]
        parts = [{"type": "image"}] * len(column)
    own = [next((p[key] for key in IMAGE_SOURCES if key in p), None) for p in parts]
    if own.count(None) != len(column):
        raise QLoRAError(f"{row.where}: {len(parts)} image part(s), {own.count(None)} of them without a path / url / "
                         f"image of its own, but {len(column)} picture(s) in the images column; give one picture "
                         "per image part")
    given = iter(column)
    return messages, [source if source is not None else next(given) for source in own]


def read_image(row: Row, source) -> Image.Image:
    """One picture as RGB: a path (relative to the row's data file), a URL, bytes, a picture or a
    {"bytes", "path"} dict. A missing or unreadable one is a QLoRAError naming the row."""
    if isinstance(source, dict):                               # a Hub data set's undecoded Image feature
        source = source.get("bytes") or source.get("path")
    shown = f"{source!r:.80}" if isinstance(source, (str, Path)) else type(source).__name__
    try:
        if isinstance(source, Image.Image):
            picture = source
        elif isinstance(source, bytes):
            picture = Image.open(io.BytesIO(source))
        elif isinstance(source, str) and source.startswith(URL_SCHEMES):
            picture = load_image(source)
        elif isinstance(source, (str, Path)):
            path = Path(source).expanduser()
            path = path if path.is_absolute() else (row.folder or Path()) / path
            if not path.is_file():
                raise QLoRAError(f"{row.where}: image file {path} not found (relative paths start at the data "
                                 "file's folder); fix the path or drop the row")
            picture = Image.open(path)
        else:
            raise QLoRAError(f"{row.where}: an image must be a path, a URL or a picture; got {shown}")
        return picture.convert("RGB")                          # reads the whole file: a broken one fails here
    except QLoRAError:
        raise
    except Exception as e:  # noqa: BLE001 -- PIL, a URL, a decoder: whatever fails reading a user's picture
        said = " ".join(str(e).split())[:160] or type(e).__name__
        raise QLoRAError(f"{row.where}: cannot read the image {shown} ({said}); give a readable PNG / JPEG / ... "
                         "file") from None


def media_token_ids(processor) -> set[int]:
    """The processor's image / video / audio placeholder token ids."""
    ids = {getattr(processor, f"{kind}_token_id", None) for kind in ("image", "video", "audio")}
    return {i for i in ids | set(getattr(processor, "image_token_ids", None) or []) if isinstance(i, int)}


@dataclass(frozen=True)
class Pictures:
    """An example's pictures as their sources, with the processor and the text they go with."""
    processor: object
    row: Row
    text: str
    sources: tuple

    def __call__(self) -> dict:
        """The processor's output for the text and the pictures (read again)."""
        pictures = [read_image(self.row, source) for source in self.sources]
        try:
            return self.processor(text=self.text, images=pictures, add_special_tokens=False, return_tensors="pt")
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as e:
            said = " ".join(str(e).split())[:200] or type(e).__name__
            raise QLoRAError(f"{self.row.where}: the model's processor refused the row's {len(pictures)} image(s): "
                             f"{said}; give as many images as the model takes, one image part each") from None


def expand(processor, row: Row, text: str, sources: list, ids: list[int], labels: list[int],
           prompt_tokens: int) -> dict:
    """The row through the processor: {"input_ids", "labels", "pictures", "media_end", "prompt_ids"} (labels
    moved from `ids`, the template text's own tokens, onto the processor's; see the module docstring;
    prompt_ids: the processor's ids of the first `prompt_tokens` of `ids`, the sample's prompt). Every picture is
    read here once: a missing or unreadable one is refused before training, not in a batch."""
    pictures = Pictures(processor, row, text, tuple(sources))
    new = pictures()["input_ids"][0].tolist()
    media = media_token_ids(processor)
    new_labels, is_media, prompt_end = [IGNORE] * len(new), [t in media for t in new], 0
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, ids, new, autojunk=False).get_opcodes():
        if tag == "equal":
            new_labels[j1:j2] = labels[i1:i2]
            prompt_end = j1 + (prompt_tokens - i1) if i1 < prompt_tokens <= i2 else prompt_end
        else:                                       # added or changed by the processor: never learned
            is_media[j1:j2] = [True] * (j2 - j1)
    return {"input_ids": new, "labels": [IGNORE if m else y for y, m in zip(new_labels, is_media)],
            "pictures": pictures, "media_end": max((j + 1 for j, m in enumerate(is_media) if m), default=0),
            "prompt_ids": new[:prompt_end or len(new)]}


def processor_tensors(pictures: Pictures, tokens: int) -> tuple[dict, dict]:
    """(per-token tensors cut to the example's first `tokens`, the other tensors) of the processor's output."""
    out, per_token, others = pictures(), {}, {}
    for key, value in out.items():
        if key in ("input_ids", "attention_mask") or not torch.is_tensor(value):
            continue
        if value.shape == out["input_ids"].shape and not value.is_floating_point():
            per_token[key] = value[0, :tokens]
        else:
            others[key] = value
    return per_token, others


def collate_inputs(examples: list[dict], width: int, left: bool = False) -> dict:
    """The processor's tensors of a batch of {"input_ids": the row's ids, "pictures": its Pictures or None} (the
    module docstring's rule): per-token ones [B, width], 0-padded (0 too for rows without pictures; on the left
    with `left`); the others concatenated on their first axis, other axes zero-padded."""
    made = [processor_tensors(e["pictures"], len(e["input_ids"])) if e.get("pictures") else ({}, {}) for e in examples]
    out = {}
    for key in sorted({k for per_token, _ in made for k in per_token}):
        values = [per_token.get(key) for per_token, _ in made]
        t = torch.zeros((len(examples), width), dtype=next(v for v in values if v is not None).dtype)
        for i, v in enumerate(values):
            if v is not None:
                t[i, slice(width - len(v), None) if left else slice(len(v))] = v
        out[key] = t
    for key in sorted({k for _, others in made for k in others}):
        parts = [others[key] for _, others in made if key in others]
        shape = [max(sizes) for sizes in zip(*(p.shape[1:] for p in parts))]
        out[key] = torch.cat([torch.nn.functional.pad(p, [x for d in range(p.ndim - 1, 0, -1)
                                                           for x in (0, shape[d - 1] - p.shape[d])])
                              for p in parts])
    return out
