"""`LoraConfig`: what adapters to attach and how, validated when it is built.

Field names follow PEFT's `LoraConfig`, so `adapter_config.json` maps one to one:

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    cfg = LoraConfig(r=16, target_modules="all-linear", use_rslora=True)
    cfg = LoraConfig(target_modules="all-linear", vision=True)    # an image-text model's towers adapted too
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from qlora.errors import QLoRAError
from qlora.util.checks import check_bools, check_numbers, must_be_int, must_be_number
from qlora.util.dtypes import parse_dtype

Targets = Union[str, list, tuple, None]

@dataclass
class LoraConfig:
    """Low-rank adapters `W x + s·B A x` on a frozen base (Hu et al. 2021, arXiv:2106.09685)."""

    r: int = 8
    """Rank of the update: A is `r × in`, B is `out × r`; trainable params per Linear = r·(in+out)."""
    lora_alpha: float = 8
    """Scale numerator: s = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input only (training mode only), in [0, 1)."""
    use_rslora: bool = False
    """Rank-stabilised scaling s = alpha / sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732)."""
    target_modules: Targets = None
    """Module-path suffixes (list), a regex (str, full match on the path), or "all-linear"."""
    exclude_modules: Targets = None
    """Same forms as `target_modules`; matches are never adapted."""
    target_parameters: Optional[list] = None
    """PEFT's field: experts matrices by path suffix (`gate_up_proj`, `mlp.experts.down_proj`); each matches only
    a fused 3-D experts matrix, never a module of the same name (a dense MLP's down_proj)."""
    vision: bool = False
    """Image-text models (qlora.arch.multimodal): also adapt the vision / audio towers and projector. Without it
    `all-linear`, and a name matching modules on both sides (`q_proj`), adapt the language model only; a name
    matching only tower modules (`visual.blocks.0.attn.qkv`) adapts them. Not a PEFT field: the adapter file
    lists the adapted modules by path."""
    modules_to_save: Optional[list] = None
    """Modules trained in full (e.g. a new classifier head); the original is kept beside the copy."""
    init_lora_weights: Union[bool, str] = True
    """True: A Kaiming-uniform, B zero. "gaussian": A ~ N(0, 1/r), B zero. Embedding: A zero, B ~ N(0, 1)
    either way (A is per token). False: both random."""
    dtype: Optional[Union[str, torch.dtype]] = None
    """Adapter dtype; None = the base layer's float dtype (bf16 for a 4-bit base)."""
    task_type: Optional[str] = None
    """PEFT task type (CAUSAL_LM, SEQ_CLS, ...), written to adapter_config.json when known."""
    rank_pattern: dict = field(default_factory=dict)
    """Per-module ranks, PEFT's rule: {pattern: r}; a module path matching `(.*\\.)?pattern$` gets that r (PEFT's
    own 2r convention for fused experts: {".*\\.gate_up_proj": 2r} with alpha_pattern 2·alpha)."""
    alpha_pattern: dict = field(default_factory=dict)
    """Per-module alphas, the same rule: {pattern: lora_alpha}."""
    qlora: dict = field(default_factory=dict)
    """Set by qlora: quantization settings of the base the adapter was trained on (for export)."""

    def __post_init__(self):
        if (need := must_be_int(self.r)) is not None:
            raise QLoRAError(f"r={self.r!r}: the LoRA rank must be {need} (typical: 8, 16, 64)")
        check_numbers(self, ("lora_alpha",), above=0, hint="typical: r or 2·r")
        check_numbers(self, ("lora_dropout",), at_least=0, below=1)
        check_bools(self, ("vision",))
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise QLoRAError(f"init_lora_weights={self.init_lora_weights!r}: use True, False or 'gaussian'")
        empty = lambda v: v is None or v == [] or v == ""  # noqa: E731
        if empty(self.target_modules) and empty(self.target_parameters):
            raise QLoRAError("target_modules is empty: give module-name suffixes (e.g. ['q_proj', 'v_proj']), "
                             "a regex, or 'all-linear'")
        if empty(self.target_modules):
            self.target_modules = []
        for name in ("target_modules", "exclude_modules", "modules_to_save", "target_parameters"):
            value = getattr(self, name)
            if isinstance(value, tuple) or isinstance(value, set):
                setattr(self, name, list(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise QLoRAError(f"{name}={value!r}: give a list of module names or a regex string")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.dtype = parse_dtype(self.dtype)
        for name, rule in (("rank_pattern", lambda v: must_be_int(v)), ("alpha_pattern", lambda v: must_be_number(v, above=0))):
            patterns = getattr(self, name) or {}
            if not isinstance(patterns, dict):
                raise QLoRAError(f"{name}={patterns!r}: give a mapping {{module-path pattern: value}}")
            for key, value in patterns.items():
                if (need := rule(value)) is not None:
                    raise QLoRAError(f"{name}[{key!r}]={value!r}: must be {need}")
                try:
                    re.compile(key)
                except (re.error, TypeError) as e:
                    raise QLoRAError(f"{name} key {key!r} is not a regular expression ({e}); give a module-path "
                                     "pattern such as 'q_proj' or '.*\\.gate_up_proj'") from None
            setattr(self, name, dict(patterns))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def r_for(self, path: str) -> int:
        """The rank of the adapter on module (or experts matrix) `path`: rank_pattern's, else r."""
        return _pattern_value(self.rank_pattern, path, self.r)

    def alpha_for(self, path: str) -> float:
        return _pattern_value(self.alpha_pattern, path, self.lora_alpha)

    def scaling_for(self, path: str) -> float:
        r = self.r_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)


def _pattern_value(patterns: dict, path: str, default):
    r"""PEFT's rule (peft.utils.other.get_pattern_key): the first pattern with `(.*\.)?pattern$` matching path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
