"""Checkpoints of a training run: trainable weights (+ the adapter in PEFT format), optimizer, scheduler,
RNG states and position, in out_dir/checkpoints/step-N, written to a temp folder and renamed. Safetensors
and JSON only. Under FSDP the tensors are gathered (the files of an unsharded run: resume across world sizes).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from qlora.errors import QLoRAError
from qlora.fsdp.shard import full, gathered, shard_full_, shard_optimizer_state
from qlora.lora.files import save_adapter
from qlora.util.staging import clean_stale, publish, staging_folder


def rng_state() -> tuple[dict, dict]:
    tensors = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_rng_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    py = random.getstate()
    return tensors, {"python_rng": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict, info: dict) -> None:
    torch.set_rng_state(tensors["torch_rng"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(tensors) if k.startswith("cuda_rng_")])
    v, state, gauss = info["python_rng"]
    random.setstate((v, tuple(state), gauss))


def _optimizer_to_files(optimizer) -> tuple[dict, dict]:
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
    with gathered(model):            # a no-op unless the model is sharded
        opt_files = _optimizer_to_files(optimizer)
        return _write_checkpoint(folder, model, opt_files, scheduler, position, keep_last) if write else None


def _write_checkpoint(folder: Path, model, opt_files: tuple, scheduler, position: dict, keep_last: int) -> Path:
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
    rng_tensors, rng_info = rng_state()
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
    set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state["position"]
