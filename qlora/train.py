"""The training loop: accelerate underneath, so one code path serves CPU, one GPU, DDP and FSDP2.

    result = train(model, train_set, collate, loss_fn, TrainConfig(epochs=1, lr=2e-4), eval_fn=evaluate)
    # accelerate launch --multi_gpu --num_processes 2 my_script.py   (DDP, no code change)
    # torchrun --nproc_per_node 2 my_script.py with TrainConfig(fsdp=True): sharded (qlora.fsdp)

- AdamW, or bitsandbytes' 8-bit / paged 8-bit AdamW (`optimizer=`); linear warm-up then cosine decay.
- tqdm bar with loss, learning rate and samples/s; `metrics.jsonl` (one JSON object per log line;
  `loss` is the mean over the `loss_steps` optimizer steps since the previous line, each step the
  mean of its micro-batches) and `curves.png` (train loss, eval points, learning rate) in `out_dir`.
- Checkpoints every `save_every` steps: trainable weights (+ the adapter in PEFT format), optimizer,
  scheduler, RNG states and position, written to a temp folder and renamed; the last `keep_last`
  are kept. `resume=True` continues from the newest and reproduces the uninterrupted run's losses
  exactly on CPU (the data order is a function of (seed, epoch), not of any RNG state).
- A NaN/inf loss stops training with a clear message; the last good checkpoint is kept.
- The final adapter (models with LoRA adapters) goes to `out_dir/adapter` in PEFT format, written
  once (by rank 0); `qlora export` takes it as it is. Under FSDP, checkpoints and the adapter hold
  the gathered whole tensors, the same files as an unsharded run (resume works across world sizes).
- The first step's peak memory and time are logged (memprofile's allocator account on CPU,
  `torch.cuda.max_memory_allocated` on CUDA).
No pickles: every checkpoint file is safetensors or JSON.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from qlora.config import check_ints
from qlora.errors import QLoRAError
from qlora.staging import clean_stale, publish, staging_folder

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


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
    CPU memory, copied on a side stream overlapping compute (qlora.offload): less GPU memory, some time."""
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
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise QLoRAError(f"lr={self.lr!r}: must be > 0")
        if isinstance(self.warmup_ratio, bool) or not isinstance(self.warmup_ratio, (int, float)) \
                or not 0 <= self.warmup_ratio < 1:
            raise QLoRAError(f"warmup_ratio={self.warmup_ratio!r}: must be in [0, 1)")
        check_ints(self, ("max_steps", "eval_every", "save_every"), null="off")
        if self.max_grad_norm is not None and (isinstance(self.max_grad_norm, bool) or
                                               not isinstance(self.max_grad_norm, (int, float)) or
                                               not self.max_grad_norm > 0):
            raise QLoRAError(f"max_grad_norm={self.max_grad_norm!r}: must be null (no clipping) or a number > 0")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not self.weight_decay >= 0:
            raise QLoRAError(f"weight_decay={self.weight_decay!r}: must be a number >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise QLoRAError(f"seed={self.seed!r}: must be an integer")
        if self.memory_budget is not None:
            from qlora.sizes import parse_size
            parse_size(self.memory_budget)          # a bad size fails here, not after the model is built
        for name in ("bf16", "resume", "overwrite", "progress", "offload_activations", "fsdp"):
            if not isinstance(getattr(self, name), bool):
                raise QLoRAError(f"{name}={getattr(self, name)!r}: must be true or false")
        if self.fsdp and self.optimizer != "adamw":
            raise QLoRAError(f"fsdp=True with optimizer={self.optimizer!r}: the sharded path supports "
                             "optimizer='adamw' only (its moments are sharded with the parameters)")


@dataclass
class TrainResult:
    steps: int
    losses: list = field(default_factory=list)        # (step, loss) per optimizer step
    evals: list = field(default_factory=list)         # (step, {metric: value})
    first_step_peak_bytes: Optional[int] = None
    first_step_seconds: Optional[float] = None
    mean_step_seconds: Optional[float] = None
    peak_method: str = ""
    local_bytes: dict = field(default_factory=dict)   # this process's own tensors at the end (qlora.fsdp.local_bytes)


def make_optimizer(params, config: TrainConfig):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    import bitsandbytes as bnb
    cls = bnb.optim.AdamW8bit if config.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches (lists of example indices) for one epoch: a permutation fixed
    by (seed, epoch), cut into batches, dealt round-robin to the processes."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    usable = len(batches) - len(batches) % world   # every process gets the same count (DDP)
    return batches[rank:usable:world]


# ---------------------------------------------------------------- checkpoints

def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_rng_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    py = random.getstate()
    return tensors, {"python_rng": [py[0], list(py[1]), py[2]]}


def _set_rng_state(tensors: dict, info: dict) -> None:
    torch.set_rng_state(tensors["torch_rng"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(tensors) if k.startswith("cuda_rng_")])
    v, state, gauss = info["python_rng"]
    random.setstate((v, tuple(state), gauss))


def _optimizer_to_files(optimizer) -> tuple[dict, dict]:
    from qlora.fsdp import full
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):   # sharded (FSDP) moments are gathered: a collective, on every rank
                tensors[f"{pid}.{k}"] = full(v).detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict, info: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in info["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(folder: Path, model, optimizer, scheduler, position: dict, keep_last: int,
                    write: bool = True) -> Optional[Path]:
    """out_dir/checkpoints/step-000123: trainable.safetensors, adapter/, optimizer.*, rng.*, state.json.

    A sharded (FSDP) model is gathered first: every rank calls this, only the one with `write`
    writes, and the files are those of an unsharded run (whole tensors)."""
    from qlora.fsdp import gathered
    with gathered(model):            # a no-op unless the model is sharded
        opt_files = _optimizer_to_files(optimizer)
        return _write_checkpoint(folder, model, opt_files, scheduler, position, keep_last) if write else None


def _write_checkpoint(folder: Path, model, opt_files: tuple, scheduler, position: dict, keep_last: int) -> Path:
    from qlora.adapters_io import save_adapter
    root = folder / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{position['step']:07d}"
    clean_stale(root / "step-*")       # .step-N.tmp-PID of killed runs: removed, and named with their size
    tmp = staging_folder(final)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    if getattr(model, "qlora_config", None) is not None:
        save_adapter(model, tmp / "adapter")
    opt_tensors, opt_info = opt_files
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_info = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = {"position": position, "optimizer": opt_info, "rng": rng_info, "scheduler": scheduler.state_dict()}
    (tmp / "state.json").write_text(json.dumps(state))
    publish(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = sorted((folder / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Every rank reads the whole files; a sharded (FSDP) parameter or moment keeps its own part."""
    from qlora.fsdp import shard_full_, shard_optimizer_state
    state = json.loads((path / "state.json").read_text())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(path / "trainable.safetensors")).items():
            if name not in params:
                raise QLoRAError(f"checkpoint {path} holds {name!r}, which this model lacks: resume with the "
                                 "same model and mode, or start a new out_dir")
            shard_full_(params[name], value)
    opt_state = _optimizer_from_files(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    optimizer.load_state_dict(shard_optimizer_state(opt_state, optimizer))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state["position"]


# ---------------------------------------------------------------- the loop

def train(model, train_set, collate: Callable, loss_fn: Callable, config: TrainConfig,
          eval_fn: Optional[Callable] = None) -> TrainResult:
    """Train the parameters of `model` that require grad.

    `collate(list_of_examples) -> batch`; `loss_fn(model, batch) -> scalar loss`;
    `eval_fn(model) -> {metric: value}` (called in eval mode under no_grad)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(config.out_dir)
    accelerator = Accelerator(mixed_precision="bf16" if config.bf16 else "no",
                              gradient_accumulation_steps=config.grad_accum,
                              cpu=not torch.cuda.is_available())
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    predicted_peak = None
    if config.memory_budget:   # qlora.plan: the micro-batch that fits, the same examples per step
        from qlora.sizes import parse_size
        from qlora.plan import fit_to_budget
        config, predicted_peak, blocks = fit_to_budget(model, train_set, collate, config,
                                                       parse_size(config.memory_budget))
        accelerator.gradient_accumulation_steps = config.grad_accum
        ckpt = ""
        if blocks is not None:   # fewer blocks recomputed: faster steps in the same budget
            from qlora.checkpointing import enable_checkpointing
            from qlora.plan import num_layers
            enable_checkpointing(model, blocks=blocks)
            ckpt = f" checkpointing the first {blocks} of {num_layers(model.config)} blocks"
        accelerator.print(f"memory_budget {config.memory_budget}: batch_size={config.batch_size} "
                          f"grad_accum={config.grad_accum}{ckpt} (predicted peak {predicted_peak / 2**30:.2f} GiB)")
    n_batches = len(epoch_batches(len(train_set), config.batch_size, config.seed, 0, rank, world))
    if n_batches < config.grad_accum:
        raise QLoRAError(f"{len(train_set)} training examples in micro-batches of batch_size={config.batch_size} "
                         f"over {world} process(es) with grad_accum={config.grad_accum} give no optimizer step: "
                         f"use at least {config.batch_size * world * config.grad_accum} examples or a smaller "
                         "batch_size / grad_accum / process count")
    steps_per_epoch = max(1, n_batches // config.grad_accum)
    total = config.epochs * steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)
    if not any(p.requires_grad for p in model.parameters()):
        raise QLoRAError("the model has no trainable parameters: add LoRA (qlora.add_lora) or unfreeze a head")
    sharded = config.fsdp and world > 1
    if sharded:   # FSDP2 instead of DDP: shard first, the optimizer then holds (and shards) the DTensors
        from qlora.fsdp import shard_model
        shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, int(total * config.warmup_ratio)))
    if sharded:
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    plain = accelerator.unwrap_model(model)

    position = {"step": 0, "epoch": 0, "batch": 0}
    if config.resume and (ckpt := latest_checkpoint(out)) is not None:
        position = load_checkpoint(ckpt, plain, optimizer.optimizer, scheduler)
        accelerator.print(f"resumed from {ckpt} (step {position['step']})")
        if accelerator.is_main_process and (out / "metrics.jsonl").exists():
            # rows the interrupted run wrote after this checkpoint are written again below
            rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("step", 0) <= position["step"]]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif not config.resume:
        earlier = sorted((out / "checkpoints").glob("step-*"))
        if earlier and not config.overwrite:   # an earlier run's work: never deleted unasked
            raise QLoRAError(f"{out} holds {len(earlier)} checkpoint(s) of an earlier run (newest {earlier[-1].name}); "
                             "continue it with resume=true, replace it with overwrite=true, or choose another out_dir")
        if (out / "adapter").is_dir() and not config.overwrite:   # the final adapter of an earlier run
            raise QLoRAError(f"{out / 'adapter'} holds the adapter of an earlier run; replace it with overwrite=true "
                             "or choose another out_dir")
        if accelerator.is_main_process:
            if (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()    # a fresh run starts a fresh log
            for old in earlier:                 # overwrite=true: an earlier run's checkpoints would
                shutil.rmtree(old, ignore_errors=True)   # outrank the new ones (keep_last, resume, NaN)
    out.mkdir(parents=True, exist_ok=True)
    result = TrainResult(steps=position["step"])
    log = _MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)
    bar = tqdm(total=total, initial=position["step"], desc="train", disable=not (config.progress and
                                                                                 accelerator.is_main_process))
    step_times, t_last, seen_samples = [], time.perf_counter(), 0
    # the logged loss is the mean over every micro-batch since the last log line, not the last one's:
    # micro-batch losses are summed on the device (no sync), one .item() per optimizer step
    step_loss_sum, step_micro, interval = 0.0, 0, []
    step = position["step"]
    model.train()
    for epoch in range(position["epoch"], config.epochs):
        batches = epoch_batches(len(train_set), config.batch_size, config.seed, epoch, rank, world)
        start = position["batch"] if epoch == position["epoch"] else 0
        for b in range(start, len(batches) - len(batches) % config.grad_accum):
            if step >= total:
                break
            batch = _to(collate([train_set[i] for i in batches[b]]), accelerator.device)
            first = step == 0 and result.first_step_peak_bytes is None
            tracker = _FirstStepPeak(accelerator.device) if first else None
            with accelerator.accumulate(model), accelerator.autocast(), _offload(config, accelerator.device, model):
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss.detach()).all():
                    last = latest_checkpoint(out)
                    bar.close()
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at step {step + 1} (epoch {epoch}); training stopped. "
                        f"Last good checkpoint: {last or 'none (set save_every)'}. Lower lr, enable "
                        "max_grad_norm, or check the data.")
                step_loss_sum = step_loss_sum + loss.detach().float()
                step_micro += 1
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    if sharded:
                        from qlora.fsdp import clip_grad_norm_
                        clip_grad_norm_(params, config.max_grad_norm)
                    else:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seen_samples += len(batches[b]) * world
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            now = time.perf_counter()
            step_times.append(now - t_last)
            if tracker is not None:
                result.first_step_peak_bytes, result.peak_method = tracker.stop()
                result.first_step_seconds = step_times[-1]
                log.write({"step": step, "first_step_peak_bytes": result.first_step_peak_bytes,
                           "first_step_seconds": round(step_times[-1], 4), "peak_method": result.peak_method})
                if predicted_peak is not None:
                    from qlora.plan import check_prediction
                    if (msg := check_prediction(result.first_step_peak_bytes, predicted_peak)) is not None:
                        warnings.warn(msg, stacklevel=2)
            loss_value = accelerator.reduce(step_loss_sum / step_micro, "mean").item()   # this step's mean
            step_loss_sum, step_micro = 0.0, 0
            result.losses.append((step, loss_value))
            interval.append(loss_value)
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", samples_s=f"{seen_samples / (now - t_last):.1f}")
            if step % config.log_every == 0 or step == total:
                log.write({"step": step, "epoch": epoch, "loss": sum(interval) / len(interval),
                           "loss_steps": len(interval), "lr": lr,
                           "samples_per_s": seen_samples / max(now - t_last, 1e-9)})
                interval = []
            seen_samples, t_last = 0, time.perf_counter()
            position = {"step": step, "epoch": epoch, "batch": b + 1}
            if config.save_every and step % config.save_every == 0 and (sharded or accelerator.is_main_process):
                save_checkpoint(out, plain, optimizer.optimizer, scheduler, position, config.keep_last,
                                write=accelerator.is_main_process)
            if eval_fn and config.eval_every and step % config.eval_every == 0:
                result.evals.append((step, _evaluate(model, eval_fn, accelerator, log, step)))
                t_last = time.perf_counter()
        else:
            position = {"step": step, "epoch": epoch + 1, "batch": 0}
            if eval_fn and not (config.eval_every and step % config.eval_every == 0):
                result.evals.append((step, _evaluate(model, eval_fn, accelerator, log, step)))
                t_last = time.perf_counter()
            continue
        break
    bar.close()
    if eval_fn and (not result.evals or result.evals[-1][0] != step):
        result.evals.append((step, _evaluate(model, eval_fn, accelerator, log, step)))
    result.steps = step
    timed = step_times[1:] or step_times
    result.mean_step_seconds = sum(timed) / len(timed) if timed else None
    from qlora.fsdp import local_bytes
    result.local_bytes = local_bytes(plain, optimizer.optimizer)
    if getattr(plain, "qlora_config", None) is not None:
        save_final_adapter(plain, out / "adapter", write=accelerator.is_main_process)
    if accelerator.is_main_process:
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    accelerator.wait_for_everyone()
    return result


def save_final_adapter(model, folder: Path, write: bool = True) -> None:
    """The trained adapter in PEFT format (qlora.save_adapter), whole tensors, written by one process.
    Every rank calls it when the model is sharded (the tensors are gathered first)."""
    from qlora.adapters_io import save_adapter
    from qlora.fsdp import gathered
    with gathered(model):
        if write:
            save_adapter(model, folder)


def _offload(config: TrainConfig, device, model):
    """qlora.offload: saved tensors of 1 MiB or more (with checkpointing: the block inputs) to pinned
    host memory, copied on a side stream and prefetched in backward; the model's weights stay."""
    import contextlib
    if config.offload_activations and torch.device(device).type == "cuda":
        from qlora.offload import offload_saved_tensors
        return offload_saved_tensors(model)
    return contextlib.nullcontext()


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def _evaluate(model, eval_fn, accelerator, log, step) -> dict:
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        metrics = eval_fn(accelerator.unwrap_model(model))
    model.train()
    log.write({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
    return metrics


class _FirstStepPeak:
    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda.max_memory_allocated"
        else:
            from memprofile.peak import CpuPeakTracker
            self.baseline = _live_bytes_estimate()
            self.tracker = CpuPeakTracker()
            self.tracker.start()
            self.method = "cpu-profiler-allocator-events (+ bytes of parameters and buffers before the step)"

    def stop(self) -> tuple[int, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), self.method
        self.tracker.stop()
        return self.baseline + self.tracker.max_increase(), self.method


def _live_bytes_estimate() -> int:
    """Bytes of all live CPU tensor storages (each once): the baseline under the step's peak."""
    import gc

    from torch._subclasses.fake_tensor import FakeTensor
    seen, total = set(), 0
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads obj.__class__, which on torch.distributed's deprecated
        # `reduce_op` object raises a FutureWarning
        if not issubclass(type(obj), torch.Tensor) or issubclass(type(obj), FakeTensor):
            continue       # fake tensors (a memory plan's, still in memory) have no real storage
        try:   # tensor subclasses and storage-less tensors (left by other code) raise on these
            if obj.is_meta or obj.device.type != "cpu":
                continue
            st = obj.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
        if ptr not in seen:
            seen.add(ptr)
            total += nbytes
    return total


class _MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """From metrics.jsonl: left, the train loss (mean per logging interval) with eval losses as points
    and the learning rate on a second axis; right, each other eval metric by step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    evals = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool):
                evals.setdefault(k, []).append((r["step"], v))
    others = {k: pts for k, pts in evals.items() if "loss" not in k}
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(11 if others else 6.5, 3.8), squeeze=False)
    ax = axes[0][0]
    if loss:
        every = max(1, round(sum(r.get("loss_steps", 1) for r in rows if "loss" in r) / len(loss)))
        ax.plot(*zip(*loss), color="C0", lw=1.6, marker="." if len(loss) < 40 else None,
                label=f"train loss (mean of {every} step{'s' if every > 1 else ''})")
    for i, (k, pts) in enumerate((k, p) for k, p in evals.items() if "loss" in k):
        ax.plot(*zip(*pts), "o--", color=f"C{i + 1}", ms=6, label=k.replace("_", " "))
    ax.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax_lr = ax.twinx()
        ax_lr.plot(*zip(*lr), color="0.55", lw=1, ls=":", label="learning rate")
        ax_lr.set_ylabel("learning rate", color="0.4")
        ax_lr.tick_params(axis="y", colors="0.4")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax_lr.set_ylim(bottom=0)
        h, l = ax_lr.get_legend_handles_labels()
        handles, labels = handles + h, labels + l
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper right")
    if others:
        ax = axes[0][1]
        for i, (k, pts) in enumerate(others.items()):
            ax.plot(*zip(*pts), "o-", color=f"C{i + 3}", label=k.replace("_", " "))
            step, value = pts[-1]
            ax.annotate(f"{value:.4g}", (step, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel="optimizer step", title="evaluation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
