"""Training: the loop on accelerate (one code path for CPU, one GPU, DDP and FSDP2) and the Trainer bridge.

    config.py       TrainConfig, TrainResult          loop.py     train(model, data, collate, loss_fn, config)
    checkpoints.py  save / resume, safetensors only   metrics.py  metrics.jsonl, curves.png, first-step peak
    budget.py       train.memory_budget via the planner
    hf.py           for_trainer: transformers' Trainer / TRL's trainers on a qlora model
"""
from qlora.optim import OPTIMIZERS
from qlora.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from qlora.train.config import TrainConfig, TrainingDiverged, TrainResult
from qlora.train.loop import epoch_batches, save_final_adapter, train, warmup_cosine
from qlora.train.metrics import plot_curves, read_metrics

__all__ = ["OPTIMIZERS", "TrainConfig", "TrainResult", "TrainingDiverged", "epoch_batches", "latest_checkpoint",
           "load_checkpoint", "plot_curves", "read_metrics", "save_checkpoint",
           "save_final_adapter", "train", "warmup_cosine"]
