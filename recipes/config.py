"""The one config base of every recipe: the model, the mode, the adapters, the loop, where outputs go.

    @dataclass
    class MyConfig(RecipeConfig):        # a recipe adds its own keys; qlora train reads YAML + key=value into it
        dataset: str = "rotten_tomatoes"

`qlora train NAME key=value ...` fills it with qlora.util.configs.load_config; every field is checked here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from qlora.errors import QLoRAError
from qlora.lora.config import LoraConfig
from qlora.train.config import TrainConfig
from qlora.util.checks import check_ints
from qlora.util.dtypes import resolve_dtype


@dataclass
class RecipeConfig:
    model: str = "smollm2"
    """A model folder, a bundled name (minilm, smollm2) or a Hub id."""
    mode: str = "qlora"
    """Which weights train: full | head | lora | qlora (each recipe says which it allows)."""
    train_size: Optional[int] = None
    """None: every training example; an int: a fixed seeded subset (quick runs, tests)."""
    compute_dtype: str = "auto"
    """auto = bfloat16 on CUDA, float32 on CPU (bf16 matmuls are slow on most CPUs); the 4-bit compute dtype,
    the float base's dtype and the adapters' dtype."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(target_modules="all-linear"))
    """Adapter settings (modes lora and qlora)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop: epochs, max_steps, batch_size, lr, optimizer, eval_every, save_every, offload_activations..."""
    out_dir: str = "runs/recipe"
    """Where everything goes (train.out_dir follows it)."""

    modes = ("full", "head", "lora", "qlora")
    """The modes this recipe accepts (a class attribute, not a config key)."""

    def __post_init__(self):
        if self.mode not in self.modes:
            raise QLoRAError(f"mode={self.mode!r}; allowed: {', '.join(self.modes)}")
        resolve_dtype(self.compute_dtype)
        check_ints(self, ("train_size",), null="")
        self.train = dataclasses.replace(self.train, out_dir=self.out_dir)

    def resolved_compute_dtype(self) -> torch.dtype:
        return resolve_dtype(self.compute_dtype)
