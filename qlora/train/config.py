"""TrainConfig: how the loop trains (validated when built); TrainResult: what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from qlora.errors import QLoRAError
from qlora.optim import OPTIMIZERS
from qlora.util.checks import check_bools, check_ints, check_numbers
from qlora.util.sizes import parse_size


class TrainingDiverged(QLoRAError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainConfig:
    epochs: int = 1
    """Passes over the training set."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (None: run all epochs)."""
    batch_size: int = 16
    """Examples per micro-batch per process. Activation memory grows linearly with it."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: a larger effective batch at the memory cost of one."""
    lr: float = 2e-4
    """Peak learning rate after warm-up."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_ratio: float = 0.06
    """Fraction of the steps spent ramping the learning rate linearly from 0."""
    optimizer: str = "adamw"
    """adamw (2 fp32-or-param-dtype moments per trainable weight), adamw8bit (1 byte each), paged_adamw8bit."""
    max_grad_norm: Optional[float] = 1.0
    """Gradient clipping (None: off)."""
    bf16: bool = False
    """bf16 autocast for the forward pass (mixed precision)."""
    eval_every: Optional[int] = None
    """Evaluate every N optimizer steps, in addition to the end of each epoch."""
    save_every: Optional[int] = None
    """Checkpoint every N optimizer steps (None: no checkpoints)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    log_every: int = 10
    """Write a metrics line every N optimizer steps."""
    seed: int = 0
    """Seeds model init, dropout and the data order."""
    out_dir: str = "runs/train"
    """Where metrics.jsonl, curves.png and checkpoints/ go."""
    resume: bool = False
    """Continue from the newest checkpoint in out_dir/checkpoints."""
    overwrite: bool = False
    """A fresh run into an out_dir that holds an earlier run's checkpoints or final adapter replaces them
    (else it refuses)."""
    progress: bool = True
    """Show the tqdm bar."""
    offload_activations: bool = False
    """CUDA only: keep what autograd saves for backward (with checkpointing: the block inputs) in pinned
    CPU memory, copied on a side stream overlapping compute (qlora.levers.offload): less GPU memory, some time."""
    fsdp: bool = False
    """Shard the model (4-bit base included), gradients and optimizer state over the processes with
    FSDP2 (qlora.fsdp; launch with torchrun / accelerate launch). The model is sharded in place: after
    train() its parameters are DTensor shards (read the saved adapter, or use qlora.fsdp.gathered).
    With one process it does nothing."""
    memory_budget: Optional[str] = None
    """e.g. "24GiB": batch_size and grad_accum are re-chosen by qlora.plan so batch_size * grad_accum
    examples per step fit; the first step's peak is compared with the prediction (warning > 10 % apart)."""

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise QLoRAError(f"optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        check_ints(self, ("epochs", "batch_size", "grad_accum", "keep_last", "log_every"))
        check_numbers(self, ("lr",), above=0)
        check_numbers(self, ("warmup_ratio",), at_least=0, below=1)
        check_ints(self, ("max_steps", "eval_every", "save_every"), null="off")
        check_numbers(self, ("max_grad_norm",), above=0, null="no clipping")
        check_numbers(self, ("weight_decay",), at_least=0)
        check_ints(self, ("seed",), minimum=None)
        if self.memory_budget is not None:
            parse_size(self.memory_budget)          # a bad size fails here, not after the model is built
        check_bools(self, ("bf16", "resume", "overwrite", "progress", "offload_activations", "fsdp"))
        if self.fsdp and self.optimizer != "adamw":
            raise QLoRAError(f"fsdp=True with optimizer={self.optimizer!r}: the sharded path supports "
                             "optimizer='adamw' only (its moments are sharded with the parameters)")


@dataclass
class TrainResult:
    steps: int
    losses: list = field(default_factory=list)        # (step, loss) per optimizer step
    evals: list = field(default_factory=list)         # (step, {metric: value})
    first_step_peak_bytes: Optional[int] = None
    first_step_at_peak: dict = field(default_factory=dict)   # bytes by category live at that peak (sum = the peak)
    first_step_peak_phase: str = ""                            # when: "backward of block 3 (model.layers.3): mm"
    first_step_temporary_parts: dict = field(default_factory=dict)   # at_peak["temporary"] by what made it
    first_step_seconds: Optional[float] = None
    mean_step_seconds: Optional[float] = None
    peak_method: str = ""
    local_bytes: dict = field(default_factory=dict)   # this process's own tensors at the end (qlora.fsdp.local_bytes)
