"""RunSettings: what the training run will use, as the planner models it (every default is `qlora train`'s)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from qlora.errors import QLoRAError
from qlora.levers.modes import MODES
from qlora.lora.config import LoraConfig
from qlora.optim import OPTIMIZERS
from qlora.util.checks import check_bools, check_ints
from qlora.util.dtypes import dtype_name, resolve_dtype

TASKS = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
         "image-cls": "AutoModelForImageClassification", "dpo": "AutoModelForCausalLM", "grpo": "AutoModelForCausalLM"}
"""dpo: preference tuning (qlora.objectives.preference.preference_step): a batch of B pairs is 2B rows of seq tokens,
every token but the first a response token (the most the chunked log-probs can hold), a reference pass without
gradients (adapters off) before the policy's forward and backward.
grpo: online RL (qlora.plan.grpo): a batch of B prompts of `prompt_length` tokens, `num_generations` completions
of `seq` tokens each sampled with the KV cache, then the training step on those B x num_generations rows."""
LOSSES = ("chunked", "model")


@dataclass(frozen=True)
class RunSettings:
    """What the training run will use; every default is `qlora train`'s."""

    mode: str = "qlora"
    """full | head | lora | qlora (NF4 4-bit base, double quantization, blocksize 64)."""
    checkpointing: bool = True
    """Non-reentrant activation checkpointing of every block (qlora.prepare_for_training)."""
    loss: str = "chunked"
    """chunked: qlora.objectives.losses' chunked head + cross-entropy; model: the model's own loss (full logits)."""
    loss_chunk_size: int = 256
    """Tokens per chunk of the chunked loss."""
    optimizer: str = "adamw"
    """adamw | adamw8bit | paged_adamw8bit."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 16
    """LoRA alpha (no effect on memory)."""
    lora_dropout: float = 0.05
    """LoRA dropout: > 0 makes each adapted layer save a dropped copy of its input."""
    target_modules: Union[str, tuple] = "all-linear"
    """LoRA targets: all-linear or module-name suffixes."""
    compute_dtype: str = "auto"
    """auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 | float32: weights, adapters, compute."""
    device: str = "cuda"
    """Device the run will use: resolves compute_dtype auto."""
    task: str = "causal-lm"
    """causal-lm | seq-cls | image-cls | dpo (a batch of B preference pairs: 2B rows) | grpo (B prompts, B x
    num_generations rows; seq is the completion length)."""
    checkpoint_blocks: Optional[int] = None
    """With checkpointing: checkpoint only the first k blocks (None: every block; 0: none). A block
    left out keeps its activations and skips its recompute (qlora.prepare_for_training(checkpoint_blocks=k))."""
    offload_activations: bool = False
    """What autograd saves of 1 MiB or more (with checkpointing: the block inputs) kept in pinned host
    memory (qlora.levers.offload; train.offload_activations, which qlora train applies on CUDA only). Host
    bytes are predicted apart (StepMemory.host), not in the device peak."""
    mlp_tile: int = 0
    """The MLP (every module named "mlp") in sequence tiles of this many tokens (qlora.levers.tiled_mlp); 0: off."""
    mlp_tile_min_tokens: int = 4096
    """With mlp_tile: tile only inputs of more than this many tokens (shorter ones run as they are)."""
    images: int = 0
    """Images per sequence of an image-text model (qlora.plan.images): their tokens are part of the seq."""
    image_size: Optional[int] = None
    """Side of each image in pixels (None: the vision config's image_size, or 448)."""
    num_generations: int = 8
    """grpo: completions sampled per prompt (TRL's default): the step's rows are batch x num_generations."""
    prompt_length: int = 512
    """grpo: tokens of each prompt (TRL's max_prompt_length default); seq is the completion length."""
    beta: float = 0.0
    """grpo: > 0 adds the reference pass (adapters off, no grad) over every row, as the KL term needs."""
    num_iterations: int = 1
    """grpo: > 1 adds the sampling policy's log-probs (no grad) over every row."""

    def __post_init__(self):
        choices = {"mode": MODES, "loss": LOSSES, "optimizer": OPTIMIZERS, "task": tuple(TASKS),
                   "device": ("cuda", "cpu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise QLoRAError(f"{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        check_ints(self, ("lora_r", "loss_chunk_size", "num_generations", "prompt_length", "num_iterations"))
        if not isinstance(self.beta, (int, float)) or self.beta < 0:
            raise QLoRAError(f"beta={self.beta!r}: use a number >= 0")
        check_bools(self, ("checkpointing", "offload_activations"))
        check_ints(self, ("mlp_tile", "mlp_tile_min_tokens", "images"), minimum=0)
        check_ints(self, ("image_size",), null="the vision config's")
        check_ints(self, ("checkpoint_blocks",), minimum=0, null="every block")
        if self.checkpoint_blocks is not None and not self.checkpointing:
            raise QLoRAError(f"checkpoint_blocks={self.checkpoint_blocks} needs checkpointing=true (or leave it null)")
        resolve_dtype(self.compute_dtype, self.device)     # a bad name fails here
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        self.lora()  # validates rank, alpha, dropout, targets

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.compute_dtype, self.device)

    @property
    def configuration(self) -> str:
        return self.mode + ("-ckpt" if self.checkpointing else "")

    def lora(self) -> LoraConfig:
        """The adapters' config (a classifier's new head trains in full: qlora.levers.modes.build_for_mode)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, dtype=self.dtype)

    def with_configuration(self, configuration: str) -> "RunSettings":
        base, _, ckpt = configuration.partition("-")
        if base not in MODES or ckpt not in ("", "ckpt"):
            raise QLoRAError(f"configuration {configuration!r}: use full, head, lora or qlora, optionally with -ckpt")
        return replace(self, mode=base, checkpointing=ckpt == "ckpt",
                       checkpoint_blocks=self.checkpoint_blocks if ckpt == "ckpt" else None)

    def describe(self) -> str:
        loss = f"chunked loss ({self.loss_chunk_size} tokens)" if self.loss == "chunked" else "the model's own loss"
        if self.task == "dpo":
            loss = (f"preference pairs (2 rows each), chunked log-probs ({self.loss_chunk_size} tokens), "
                    "a reference pass without gradients")
        elif self.task == "grpo":
            loss = (f"GRPO: {self.num_generations} completions per prompt of {self.prompt_length} tokens sampled with "
                    f"the KV cache, then chunked log-probs ({self.loss_chunk_size} tokens)"
                    + (", a reference pass without gradients" if self.beta else "")
                    + (", the sampling policy's log-probs" if self.num_iterations > 1 else ""))
        elif self.task != "causal-lm":
            loss = "the model's own loss"
        lora = (f"LoRA r={self.lora_r} alpha={self.lora_alpha:g} dropout={self.lora_dropout:g} on "
                f"{self.target_modules if isinstance(self.target_modules, str) else ','.join(self.target_modules)}; "
                if self.mode in ("lora", "qlora") else "")
        quant = "NF4 4-bit base (double quant, blocksize 64); " if self.mode == "qlora" else ""
        ckpt = "off"
        if self.checkpointing:
            ckpt = "on (non-reentrant" + ("" if self.checkpoint_blocks is None else
                                          f", the first {self.checkpoint_blocks} blocks only") + ")"
        images = f"; {self.images} image(s) per sequence" if self.images else ""
        tile = (f"; MLP in {self.mlp_tile}-token tiles above {self.mlp_tile_min_tokens} tokens" if self.mlp_tile else "")
        return (f"{self.configuration}: {quant}{lora}{dtype_name(self.dtype)} compute; "
                f"checkpointing {ckpt}; {loss}; {self.optimizer}; "
                f"{'activation offload to host memory' if self.offload_activations else 'no activation offload'}{tile}{images}")
