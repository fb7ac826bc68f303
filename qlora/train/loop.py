"""The training loop: accelerate underneath, so one code path serves CPU, one GPU, DDP and FSDP2.

    result = train(model, train_set, collate, loss_fn, TrainConfig(epochs=1, lr=2e-4), eval_fn=evaluate)
    # accelerate launch --multi_gpu --num_processes 2 my_script.py   (DDP, no code change)
    # torchrun --nproc_per_node 2 my_script.py with TrainConfig(fsdp=True): sharded (qlora.fsdp)

- AdamW, or bitsandbytes' 8-bit / paged 8-bit AdamW (`optimizer=`); linear warm-up then cosine decay.
- tqdm bar with loss, learning rate and samples/s; `metrics.jsonl` (one JSON object per log line;
  `loss` is the mean over the `loss_steps` optimizer steps since the previous line, each step the
  mean of its micro-batches) and `curves.png` (train loss, eval points, learning rate) in `out_dir`.
  A loss may carry `loss.metrics = {name: scalar tensor}` (a MoE's `aux_loss`, DPO's `rewards/margins`, ...):
  each is averaged like the loss and written under its name.
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

import contextlib
import json
import math
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from memprofile.tracker import mark_phase
from qlora.errors import QLoRAError
from qlora.fsdp.shard import clip_grad_norm_, gathered, local_bytes, shard_model
from qlora.levers.offload import offload_saved_tensors
from qlora.lora.files import save_adapter
from qlora.optim import make_optimizer
from qlora.train.budget import apply_memory_budget, check_prediction
from qlora.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from qlora.train.config import TrainConfig, TrainingDiverged, TrainResult
from qlora.train.metrics import FirstStepPeak, MetricsLog, plot_curves, read_metrics


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


def train(model, train_set, collate: Callable, loss_fn: Callable, config: TrainConfig,
          eval_fn: Optional[Callable] = None, on_first_step: Optional[Callable[[TrainResult], None]] = None,
          plan_as: Optional[dict] = None, prepare_step: Optional[Callable] = None) -> TrainResult:
    """Train the parameters of `model` that require grad.

    `collate(list_of_examples) -> batch`; `loss_fn(model, batch) -> scalar loss`;
    `eval_fn(model) -> {metric: value}` (called in eval mode under no_grad); `on_first_step(result)` once, on
    the main process, when the first optimizer step's peak memory and time are in `result`. `plan_as`: how
    train.memory_budget plans a batch whose tensors do not say (qlora.train.budget.fit_to_budget).
    `prepare_step(model, batches)`: called with the unwrapped model and all grad_accum micro-batches of a step
    (collated, on the device) before the first one's forward, inside the step's memory account (online RL samples
    the whole step there, as TRL's generation batch)."""
    accelerator = Accelerator(mixed_precision="bf16" if config.bf16 else "no",
                              gradient_accumulation_steps=config.grad_accum,
                              cpu=not torch.cuda.is_available())
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    config, predicted_peak = apply_memory_budget(model, train_set, collate, config, accelerator.print, plan_as)
    accelerator.gradient_accumulation_steps = config.grad_accum
    total = _total_steps(len(train_set), config, accelerator.process_index, accelerator.num_processes)
    if not any(p.requires_grad for p in model.parameters()):
        raise QLoRAError("the model has no trainable parameters: add LoRA (qlora.add_lora) or unfreeze a head")
    sharded = config.fsdp and accelerator.num_processes > 1
    if sharded:   # FSDP2 instead of DDP: shard first, the optimizer then holds (and shards) the DTensors
        shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config.optimizer, params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, int(total * config.warmup_ratio)))
    plain = model
    if sharded:
        optimizer = accelerator.prepare(optimizer)
    elif accelerator.num_processes > 1:
        # DDP: the loss runs inside the wrapper's forward, whatever parts of the model it calls (the chunked
        # head calls the decoder and reads the head's weight; DPO runs two passes): DDP prepares its gradient
        # all-reduce in forward, which calling those parts of a wrapped model directly would skip
        step, optimizer = accelerator.prepare(LossInForward(model, loss_fn), optimizer)
        model, loss_fn = step, lambda wrapped, batch: wrapped(batch)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        plain = accelerator.unwrap_model(model)
    out = Path(config.out_dir)
    position = _start(out, config, plain, optimizer, scheduler, accelerator)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(model=model, plain=plain, optimizer=optimizer, scheduler=scheduler, params=params, config=config,
               accelerator=accelerator, sharded=sharded, out=out, total=total, predicted_peak=predicted_peak,
               loss_fn=loss_fn, eval_fn=eval_fn, on_first_step=on_first_step, prepare_step=prepare_step,
               result=TrainResult(steps=position["step"]),
               log=MetricsLog(out / "metrics.jsonl", accelerator.is_main_process))
    step = run.epochs(train_set, collate, position)
    return run.finish(step)


def _total_steps(n: int, config: TrainConfig, rank: int, world: int) -> int:
    """Optimizer steps of the run (every epoch, or max_steps)."""
    n_batches = len(epoch_batches(n, config.batch_size, config.seed, 0, rank, world))
    if n_batches < config.grad_accum:
        raise QLoRAError(f"{n} training examples in micro-batches of batch_size={config.batch_size} "
                         f"over {world} process(es) with grad_accum={config.grad_accum} give no optimizer step: "
                         f"use at least {config.batch_size * world * config.grad_accum} examples or a smaller "
                         "batch_size / grad_accum / process count")
    total = config.epochs * max(1, n_batches // config.grad_accum)
    return min(total, config.max_steps) if config.max_steps else total


def check_earlier_run(out: Path, config: TrainConfig) -> list[Path]:
    """An earlier run's checkpoints in `out` (replaced only with overwrite=true, continued with resume=true); a
    fresh run into an out_dir holding an earlier run's checkpoints or final adapter is refused without overwrite.
    Callers that write into out_dir before train() (a recipe's samples) call it first."""
    earlier = sorted((Path(out) / "checkpoints").glob("step-*"))
    if config.resume:
        return earlier
    if earlier and not config.overwrite:   # an earlier run's work: never deleted unasked
        raise QLoRAError(f"{out} holds {len(earlier)} checkpoint(s) of an earlier run (newest {earlier[-1].name}); "
                         "continue it with resume=true, replace it with overwrite=true, or choose another out_dir")
    if (Path(out) / "adapter").is_dir() and not config.overwrite:   # the final adapter of an earlier run
        raise QLoRAError(f"{Path(out) / 'adapter'} holds the adapter of an earlier run; replace it with overwrite=true "
                         "or choose another out_dir")
    return earlier


def _start(out: Path, config: TrainConfig, plain, optimizer, scheduler, accelerator) -> dict:
    """The position to start from: the newest checkpoint with resume=true, else the start, after making
    sure an earlier run's work in out_dir is continued or replaced only when asked."""
    if config.resume and (ckpt := latest_checkpoint(out)) is not None:
        position = load_checkpoint(ckpt, plain, optimizer.optimizer, scheduler)
        accelerator.print(f"resumed from {ckpt} (step {position['step']})")
        if accelerator.is_main_process and (out / "metrics.jsonl").exists():
            # rows the interrupted run wrote after this checkpoint are written again below
            rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("step", 0) <= position["step"]]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return position
    if not config.resume:
        earlier = check_earlier_run(out, config)
        if accelerator.is_main_process:
            if (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()    # a fresh run starts a fresh log
            for old in earlier:                 # overwrite=true: an earlier run's checkpoints would
                shutil.rmtree(old, ignore_errors=True)   # outrank the new ones (keep_last, resume, NaN)
    return {"step": 0, "epoch": 0, "batch": 0}


class _Run:
    """One training run's state between optimizer steps (the loop of `train`, in named steps)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)
        self.step_times, self.t_last, self.seen_samples = [], time.perf_counter(), 0
        # the logged loss is the mean over every micro-batch since the last log line, not the last one's:
        # micro-batch losses are summed on the device (no sync), one .item() per optimizer step
        self.step_loss_sum, self.step_micro, self.interval, self.reported = 0.0, 0, [], {}

    def epochs(self, train_set, collate, position: dict) -> int:
        config, acc = self.config, self.accelerator
        rank, world = acc.process_index, acc.num_processes
        self.bar = tqdm(total=self.total, initial=position["step"], desc="train",
                        disable=not (config.progress and acc.is_main_process))
        step, tracker = position["step"], None
        self.model.train()
        for epoch in range(position["epoch"], config.epochs):
            batches = epoch_batches(len(train_set), config.batch_size, config.seed, epoch, rank, world)
            start = position["batch"] if epoch == position["epoch"] else 0
            for b in range(start, len(batches) - len(batches) % config.grad_accum):
                if step >= self.total:
                    break
                slot = (b - start) % config.grad_accum    # start is a step's first micro-batch
                if self.prepare_step is None:
                    batch = _to(collate([train_set[i] for i in batches[b]]), acc.device)
                else:                                     # the step's micro-batches at once, for prepare_step
                    if slot == 0:
                        ahead = [_to(collate([train_set[i] for i in batches[k]]), acc.device)
                                 for k in range(b, b + config.grad_accum)]
                    batch = ahead[slot]
                if tracker is None and step == 0 and self.result.first_step_peak_bytes is None:
                    # the first optimizer step, over all of its micro-batches (grad_accum)
                    tracker = FirstStepPeak(acc.device, None if self.sharded else self.plain, batch)
                try:
                    if self.prepare_step is not None and slot == 0:
                        mark_phase("prepare step")
                        self.prepare_step(self.plain, ahead)
                    self.micro_step(batch, step, epoch)
                except BaseException:
                    if tracker is not None:        # no account of a step that did not finish: hooks off
                        tracker.abort()
                    raise
                self.seen_samples += len(batches[b]) * world
                if not acc.sync_gradients:
                    continue
                step += 1
                self.after_step(step, epoch, tracker, {"step": step, "epoch": epoch, "batch": b + 1})
                tracker = None
            else:
                if self.eval_fn and not (config.eval_every and step % config.eval_every == 0):
                    self.evaluate(step)
                position = {"step": step, "epoch": epoch + 1, "batch": 0}
                continue
            break
        self.bar.close()
        return step

    def micro_step(self, batch, step: int, epoch: int) -> None:
        """Forward, loss, backward of one micro-batch; the optimizer steps when accumulation is complete."""
        config, acc = self.config, self.accelerator
        with acc.accumulate(self.model), acc.autocast(), _offload(config, acc.device, self.model):
            mark_phase("forward")                   # the first step's memory account names the phases
            loss = self.loss_fn(self.model, batch)
            if not torch.isfinite(loss.detach()).all():
                last = latest_checkpoint(self.out)
                self.bar.close()
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {step + 1} (epoch {epoch}); training stopped. "
                    f"Last good checkpoint: {last or 'none (set save_every)'}. Lower lr, enable "
                    "max_grad_norm, or check the data.")
            self.step_loss_sum = self.step_loss_sum + loss.detach().float()
            for name, value in getattr(loss, "metrics", {}).items():   # what the loss reports beside itself
                self.reported.setdefault(name, []).append(value.detach().float())
            self.step_micro += 1
            mark_phase("backward")
            acc.backward(loss)
            if acc.sync_gradients and config.max_grad_norm:
                if self.sharded:
                    clip_grad_norm_(self.params, config.max_grad_norm)
                else:
                    acc.clip_grad_norm_(self.params, config.max_grad_norm)
            mark_phase("optimizer step")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def after_step(self, step: int, epoch: int, tracker, position: dict) -> None:
        """After an optimizer step: scheduler, first-step peak, loss, progress, metrics, checkpoint, eval."""
        config, acc, result = self.config, self.accelerator, self.result
        self.scheduler.step()
        now = time.perf_counter()
        self.step_times.append(now - self.t_last)
        if tracker is not None:
            result.first_step_peak_bytes, result.peak_method = tracker.stop()
            result.first_step_at_peak, result.first_step_peak_phase = tracker.at_peak, tracker.peak_phase
            result.first_step_temporary_parts = tracker.temporary_parts
            result.first_step_seconds = self.step_times[-1]
            self.log.write({"step": step, "first_step_peak_bytes": result.first_step_peak_bytes,
                            "first_step_seconds": round(self.step_times[-1], 4), "peak_method": result.peak_method,
                            **({"first_step_at_peak": tracker.at_peak, "first_step_peak_phase": tracker.peak_phase,
                                "first_step_temporary_parts": tracker.temporary_parts} if tracker.at_peak else {})})
            if self.predicted_peak is not None:
                if (msg := check_prediction(result.first_step_peak_bytes, self.predicted_peak,
                                            others=tracker.others)) is not None:
                    warnings.warn(msg, stacklevel=3)
            if self.on_first_step is not None and acc.is_main_process:
                self.on_first_step(result)
        loss_value = acc.reduce(self.step_loss_sum / self.step_micro, "mean").item()   # this step's mean
        self.step_loss_sum, self.step_micro = 0.0, 0
        result.losses.append((step, loss_value))
        self.interval.append(loss_value)
        lr = self.scheduler.get_last_lr()[0]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                             samples_s=f"{self.seen_samples / (now - self.t_last):.1f}")
        if step % config.log_every == 0 or step == self.total:
            row = {"step": step, "epoch": epoch, "loss": sum(self.interval) / len(self.interval),
                   "loss_steps": len(self.interval), "lr": lr,
                   "samples_per_s": self.seen_samples / max(now - self.t_last, 1e-9)}
            row.update({name: acc.reduce(torch.stack(values).mean(), "mean").item() for name, values in self.reported.items()})
            self.log.write(row)
            self.interval, self.reported = [], {}
        self.seen_samples, self.t_last = 0, time.perf_counter()
        if config.save_every and step % config.save_every == 0 and (self.sharded or acc.is_main_process):
            save_checkpoint(self.out, self.plain, self.optimizer.optimizer, self.scheduler, position, config.keep_last,
                            write=acc.is_main_process)
        if self.eval_fn and config.eval_every and step % config.eval_every == 0:
            self.evaluate(step)

    def evaluate(self, step: int) -> None:
        self.result.evals.append((step, _evaluate(self.model, self.plain, self.eval_fn, self.accelerator, self.log, step)))
        self.t_last = time.perf_counter()

    def finish(self, step: int) -> TrainResult:
        """The last evaluation, timings, this process's bytes, the final adapter and the curves."""
        acc, result = self.accelerator, self.result
        if self.eval_fn and (not result.evals or result.evals[-1][0] != step):
            result.evals.append((step, _evaluate(self.model, self.plain, self.eval_fn, acc, self.log, step)))
        result.steps = step
        timed = self.step_times[1:] or self.step_times
        result.mean_step_seconds = sum(timed) / len(timed) if timed else None
        result.local_bytes = local_bytes(self.plain, self.optimizer.optimizer)
        if getattr(self.plain, "qlora_config", None) is not None:
            save_final_adapter(self.plain, self.out / "adapter", write=acc.is_main_process)
        if acc.is_main_process:
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        acc.wait_for_everyone()
        return result


class LossInForward(torch.nn.Module):
    """A module whose forward is `loss_fn(model, batch)`: what DDP wraps, so that the loss is its forward."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def save_final_adapter(model, folder: Path, write: bool = True) -> None:
    """The trained adapter in PEFT format (qlora.save_adapter), whole tensors, written by one process.
    Every rank calls it when the model is sharded (the tensors are gathered first)."""
    with gathered(model):
        if write:
            save_adapter(model, folder)


def _offload(config: TrainConfig, device, model):
    """qlora.levers.offload: saved tensors of 1 MiB or more (with checkpointing: the block inputs) to pinned
    host memory, copied on a side stream and prefetched in backward; the model's weights stay."""
    if config.offload_activations and torch.device(device).type == "cuda":
        return offload_saved_tensors(model)
    return contextlib.nullcontext()


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def _evaluate(model, plain, eval_fn, accelerator, log, step) -> dict:
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        metrics = eval_fn(plain)
    model.train()
    log.write({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
    return metrics
