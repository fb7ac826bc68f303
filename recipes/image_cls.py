"""Image classification recipe: the seed's ViT/Food-101 experiment, offline, four ways, one table.

    qlora train recipes/configs/image_cls.yaml [key=value ...]
    qlora train image_cls mode=qlora train.epochs=1

No pretrained ViT ships offline, so by default (model=fmnist-vit) a small ViT is first pretrained
here on five Fashion-MNIST classes (0-4: T-shirt/top, Trouser, Pullover, Dress, Coat) and its
backbone cached in $QLORA_CACHE (default ~/.cache/qlora) as fmnist-vit-pretrained-<hash of the
pretrain settings>; a cached backbone is reused, so pretraining runs once. Then for each mode
(full, head, lora, qlora) a fresh copy of that backbone gets a new head and is fine-tuned on the
*other* five classes (5-9: Sandal, Shirt, Sneaker, Bag, Ankle boot, relabelled 0-4) and evaluated
on the same fixed test subset; trainable params, accuracy, first-step peak memory and step time go
to out_dir/table.md and table.json. LoRA sits on the attention projections, the MLP and the Conv2d
patch embedding; in qlora mode the Linear layers are NF4 and the Conv2d stays float (bitsandbytes
quantizes Linear layers only), with its LoRA on top as in the float mode.

With the Hub: model=google/vit-base-patch16-224 dataset=food101 is the seed's experiment
(load_dataset + AutoImageProcessor; the 1000-class ImageNet head is replaced by a new one).
"""
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

import qlora
from qlora.arch.loading import from_pretrained_quietly, users_files
from qlora.bundled import default_cache_dir, resolve_model
from qlora.data.rows import subset
from qlora.errors import QLoRAError
from qlora.train.loop import TrainConfig, train
from qlora_recipes.bundled_data import FASHION_MNIST_CLASSES, fashion_mnist
from qlora_recipes.four_modes import FourModesConfig, run_modes

PRETRAINED_NAME = "fmnist-vit"         # model=fmnist-vit: pretrain here (or reuse the cached backbone)
CACHE_PREFIX = "fmnist-vit-pretrained"
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530   # Fashion-MNIST training-set pixel statistics (of x / 255)


@dataclass
class PretrainConfig:
    """The from-scratch ViT and its pretraining run (only used with model=fmnist-vit)."""
    classes: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """Fashion-MNIST classes the backbone is pretrained on (the fine-tuning classes must differ)."""
    train_size: Optional[int] = 15000
    """Pretraining images (a seeded subset of the 30,000 of those classes; None: all)."""
    test_size: Optional[int] = 1000
    """Held-out images of the pretraining classes, for the pretraining accuracy."""
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    patch_size: int = 7
    """28x28 images: 7 -> 16 patches (fast), 4 -> 49 patches (~3x slower, a bit more accurate)."""
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    seed: int = 0

    def __post_init__(self):
        if not self.classes or any(c not in range(10) for c in self.classes) or len(set(self.classes)) != len(
                self.classes):
            raise QLoRAError(f"classes={self.classes!r}: give distinct Fashion-MNIST labels in 0..9")
        if 28 % self.patch_size:
            raise QLoRAError(f"patch_size={self.patch_size!r}: must divide 28 (1, 2, 4, 7, 14, 28)")
        if self.hidden_size % self.num_heads:
            raise QLoRAError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")


@dataclass
class ImageClsConfig(FourModesConfig):
    model: str = PRETRAINED_NAME
    """fmnist-vit (pretrained here on pretrain.classes, cached), a model folder, or a Hub id."""
    dataset: str = "fashion_mnist"
    """fashion_mnist (Debian's dataset-fashion-mnist, no download) or a Hub image data set (food101)."""
    classes: list = field(default_factory=lambda: [5, 6, 7, 8, 9])
    """Fashion-MNIST classes fine-tuned on, relabelled 0..n-1 (ignored for Hub data sets)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """How the fmnist-vit backbone is built and pretrained."""

    def __post_init__(self):
        super().__post_init__()
        if self.dataset == "fashion_mnist":
            if not self.classes or any(c not in range(10) for c in self.classes) or len(set(self.classes)) != len(
                    self.classes):
                raise QLoRAError(f"classes={self.classes!r}: give distinct Fashion-MNIST labels in 0..9")
            if self.model == PRETRAINED_NAME and set(self.classes) & set(self.pretrain.classes):
                raise QLoRAError(f"classes={self.classes} overlap pretrain.classes={self.pretrain.classes}: the "
                                 "point is to transfer to classes the backbone has not seen")


# ------------------------------------------------------------------------------------------ data

def fashion_mnist_subset(split: str, classes: list, size: Optional[int], seed: int = 0):
    """[(image float [1, 28, 28] normalised, label in 0..len(classes)-1)] of `classes`, a seeded subset."""
    images, labels = fashion_mnist(split)
    relabel = {c: i for i, c in enumerate(classes)}
    idx = [i for i, y in enumerate(labels.tolist()) if y in relabel]
    idx = subset(idx, size, seed)
    x = (images[idx].float().div_(255).sub_(FMNIST_MEAN).div_(FMNIST_STD)).unsqueeze(1)
    return [(x[k], relabel[int(labels[i])]) for k, i in enumerate(idx)]


class HubImages:
    """(PIL image, label) rows of a Hub data set split, without materialising the images."""

    def __init__(self, split, indices: list):
        self.split, self.indices = split, indices
        self.column = "image" if "image" in split.column_names else "img"

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        row = self.split[self.indices[i]]
        return row[self.column], row["label"]


def load_images(cfg: ImageClsConfig):
    """(train set, test set, label names); rows are (image, label)."""
    if cfg.dataset == "fashion_mnist":
        return (fashion_mnist_subset("train", cfg.classes, cfg.train_size),
                fashion_mnist_subset("test", cfg.classes, cfg.test_size),
                [FASHION_MNIST_CLASSES[c] for c in cfg.classes])
    from datasets import load_dataset  # lazy: datasets (~0.5 s) only for users with the Hub: e.g. food101
    ds = load_dataset(cfg.dataset)
    test_split = "test" if "test" in ds else "validation"
    names = ds["train"].features["label"].names
    pick = lambda split, size: HubImages(split, subset(list(range(len(split))), size))
    return pick(ds["train"], cfg.train_size), pick(ds[test_split], cfg.test_size), names


# ------------------------------------------------------------------------------------------ pretraining

def pretrained_backbone(p: PretrainConfig, run: TrainConfig, cache_dir=None) -> str:
    """Folder of the fmnist-vit backbone (a ViTModel) of settings `p`: cached in `cache_dir` (default
    $QLORA_CACHE), else pretrained now and cached (`run` gives the log folder, log_every and progress;
    it is not part of the key).

    Built in a private temp folder next to the target and renamed: a crash or a concurrent run
    never leaves a half-written folder that would be taken for a finished one."""
    settings = dataclasses.asdict(p)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{CACHE_PREFIX}-{key}"
    if (target / "config.json").is_file() and (target / "pretrain.json").is_file():
        info = json.loads((target / "pretrain.json").read_text())
        print(f"pretrained backbone: {target} (cached; pretraining accuracy {100 * info['accuracy']:.2f}% on "
              f"{info['test_images']} held-out images of classes {info['settings']['classes']})")
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    try:
        info = pretrain(p, run, tmp)
        info["settings"] = settings
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone else finished first (target exists and is not empty): use theirs.
            if not (target / "pretrain.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def pretrain(p: PretrainConfig, run: TrainConfig, folder: Path) -> dict:
    """Train a ViT from scratch on p.classes; save its backbone (no head) into `folder`."""
    train_set = fashion_mnist_subset("train", p.classes, p.train_size, seed=p.seed)
    test_set = fashion_mnist_subset("test", p.classes, p.test_size, seed=p.seed)
    names = [FASHION_MNIST_CLASSES[c] for c in p.classes]
    config = ViTConfig(image_size=28, patch_size=p.patch_size, num_channels=1, hidden_size=p.hidden_size,
                       intermediate_size=p.intermediate_size, num_hidden_layers=p.num_layers,
                       num_attention_heads=p.num_heads, num_labels=len(names), id2label=dict(enumerate(names)),
                       label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(p.seed)
    model = ViTForImageClassification(config)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"\n== pretraining a ViT ({n_params:,} params, {(28 // p.patch_size) ** 2} patches of "
          f"{p.patch_size}x{p.patch_size}, {p.num_layers} layers, hidden {p.hidden_size}) on {len(train_set):,} "
          f"images of {names}, {p.epochs} epochs")
    collate, evaluate = image_collate(None, config), accuracy_eval(test_set, image_collate(None, config))
    train_config = TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                               warmup_ratio=0.1, seed=p.seed, log_every=run.log_every,
                               progress=run.progress, out_dir=str(Path(run.out_dir) / "pretrain"))
    result = train(model, train_set, collate, lambda m, batch: m(**batch).loss, train_config, eval_fn=evaluate)
    accuracy = result.evals[-1][1]["accuracy"]
    print(f"pretraining accuracy: {100 * accuracy:.2f}% on {len(test_set)} held-out images -> {folder}")
    model.vit.save_pretrained(str(folder))      # the backbone only: each mode gets a new head
    return {"accuracy": accuracy, "test_images": len(test_set), "train_images": len(train_set),
            "steps": result.steps, "final_loss": result.losses[-1][1] if result.losses else None}


# ------------------------------------------------------------------------------------------ batches

def image_collate(processor, model_config):
    """examples [(image, label)] -> {pixel_values, labels}. Fashion-MNIST tensors are resized and
    repeated to the model's image size and channels when they differ (e.g. a Hub ViT); PIL images
    go through the model's image processor."""
    size, channels = model_config.image_size, model_config.num_channels

    def collate(examples):
        labels = torch.tensor([y for _, y in examples])
        if processor is not None:
            images = [img.convert("RGB") if channels == 3 else img for img, _ in examples]
            return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": labels}
        x = torch.stack([img for img, _ in examples])
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if x.shape[1] != channels:
            x = x.repeat(1, channels, 1, 1)
        return {"pixel_values": x, "labels": labels}
    return collate


def accuracy_eval(test_set, collate, batch_size: int = 256):
    def evaluate(model):
        correct = 0
        device = next(model.parameters()).device
        for i in range(0, len(test_set), batch_size):
            batch = collate([test_set[j] for j in range(i, min(i + batch_size, len(test_set)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
        return {"accuracy": correct / len(test_set)}
    return evaluate


def main(cfg: ImageClsConfig) -> list[dict]:
    if cfg.model == PRETRAINED_NAME and cfg.dataset != "fashion_mnist":
        raise QLoRAError(f"model={PRETRAINED_NAME} is a 28x28 grey-scale backbone for dataset=fashion_mnist; with "
                         f"dataset={cfg.dataset} give a Hub model (e.g. model=google/vit-base-patch16-224)")
    train_set, test_set, names = load_images(cfg)
    path = pretrained_backbone(cfg.pretrain, cfg.train) if cfg.model == PRETRAINED_NAME else resolve_model(cfg.model)
    processor = None
    with users_files("image processor and config", path):
        if cfg.dataset != "fashion_mnist":
            processor = AutoImageProcessor.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    collate = image_collate(processor, config)
    # A new head for the fine-tuning classes: missing from our backbone folder, and of another size in
    # a Hub checkpoint (ImageNet's 1000 classes), hence ignore_mismatched_sizes.
    labels = {"num_labels": len(names), "id2label": dict(enumerate(names)),
              "label2id": {n: i for i, n in enumerate(names)}, "ignore_mismatched_sizes": True}

    def loss_fn(model, batch):
        return model(**batch).loss

    load_float = lambda: from_pretrained_quietly(AutoModelForImageClassification, path, **labels)
    # Linear layers -> NF4; the Conv2d patch embedding, norms and the head stay in compute_dtype.
    load_4bit = lambda: qlora.load_4bit(path, AutoModelForImageClassification,
                                        compute_dtype=cfg.resolved_compute_dtype(), **labels)
    return run_modes(cfg, model_name=cfg.model, load_float=load_float, load_4bit=load_4bit,
                     train_set=train_set, collate=collate, loss_fn=loss_fn,
                     evaluate=accuracy_eval(test_set, collate))

