"""The training loop (qlora.train.loop): exact resume, checkpoint files, NaN stop, two-process DDP on CPU.

Everything runs on a 2-layer Llama with hidden 32 (conftest `tiny_llama`) and LoRA with dropout, so
a resume that loses the RNG state, the optimizer moments, the scheduler or the data position gives
different losses. The DDP test launches torchrun with two gloo processes on a plain torch model
(no transformers import: the two processes share the machine's CPUs).
"""
from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import qlora
from qlora import LoraConfig, QLoRAError
from qlora.train.loop import (
    TrainConfig,
    TrainingDiverged,
    latest_checkpoint,
    load_checkpoint,
    make_optimizer,
    read_metrics,
    train,
    warmup_cosine,
)

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_EXAMPLES, SEQ, BATCH = 24, 8, 4          # 6 optimizer steps per epoch


class Interrupted(BaseException):
    """Stands in for Ctrl-C / a killed job: raised from inside the loss function."""


def _lora_llama(tiny_llama):
    model = tiny_llama()
    qlora.add_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear"))
    return model


def _data():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 96, (SEQ,), generator=g) for _ in range(N_EXAMPLES)]


def _collate(examples):
    return {"input_ids": torch.stack(examples)}


def _lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def _config(out, **kw):
    base = dict(epochs=2, batch_size=BATCH, lr=1e-2, warmup_ratio=0.2, save_every=2, keep_last=2, log_every=1,
                seed=0, out_dir=str(out), progress=False)
    return TrainConfig(**{**base, **kw})


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _loss_rows(out):
    return [(r["step"], r["loss"]) for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def _assert_no_pickles(checkpoints: Path):
    """Every checkpoint file is safetensors (readable by safe_open) or JSON (parses); nothing else."""
    files = [f for d in checkpoints.glob("step-*") for f in d.rglob("*") if f.is_file()]
    assert files
    for f in files:
        assert f.suffix in (".safetensors", ".json"), f
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:   # 8-byte header length, then the JSON header; a pickle/torch.save file starts otherwise
            assert f.read_bytes()[8:9] == b"{", f
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    sf.get_tensor(key)


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_llama, tmp_path):
    data = _data()
    run_a, run_b = tmp_path / "a", tmp_path / "b"

    # A: uninterrupted, 2 epochs x 6 steps, a checkpoint every 2 steps
    model_a = _lora_llama(tiny_llama)
    init = _trainable(model_a)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model_a.modules())   # RNG matters
    result_a = train(model_a, data, _collate, _lm_loss, _config(run_a))
    assert result_a.steps == 12 and [s for s, _ in result_a.losses] == list(range(1, 13))
    final_a = _trainable(model_a)
    assert any(not torch.equal(init[n], final_a[n]) for n in init)

    # B: the same run, killed while computing step 6's loss (checkpoints at steps 2 and 4 are on disk,
    # step 5 was done and logged but not checkpointed)
    calls = []

    def killed_at_6(model, batch):
        calls.append(1)
        if len(calls) == 6:
            raise Interrupted()
        return _lm_loss(model, batch)

    with pytest.raises(Interrupted):
        train(_lora_llama(tiny_llama), data, _collate, killed_at_6, _config(run_b))
    ckpts = run_b / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000002", "step-0000004"]
    assert _loss_rows(run_b) == result_a.losses[:5]
    # a crash in the middle of writing a later checkpoint leaves a half-written temp folder behind
    half = ckpts / ".step-0000006.tmp-99999"
    half.mkdir()
    (half / "state.json").write_text('{"position": {"step": 6')
    assert latest_checkpoint(run_b) == ckpts / "step-0000004"

    # B resumed: a fresh model (same seed) continues from step 4
    model_b = _lora_llama(tiny_llama)
    result_b = train(model_b, data, _collate, _lm_loss, _config(run_b, resume=True))
    assert result_b.steps == 12
    assert not half.exists()            # the dead process's half-written checkpoint was removed
    assert result_b.losses == [(s, loss) for s, loss in result_a.losses if s > 4]     # exact floats
    final_b = _trainable(model_b)
    assert final_b.keys() == final_a.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name

    # the log of the resumed run is the uninterrupted run's log (no step written twice)
    assert _loss_rows(run_a) == result_a.losses
    assert _loss_rows(run_b) == result_a.losses
    for run in (run_a, run_b):
        assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC

    # only keep_last checkpoints are kept; all files are safetensors or JSON; the last one holds the weights
    for run in (run_a, run_b):
        assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000010", "step-0000012"]
        _assert_no_pickles(run / "checkpoints")
        saved = load_file(str(run / "checkpoints" / "step-0000012" / "trainable.safetensors"))
        assert saved.keys() == final_a.keys()
        assert all(torch.equal(saved[n], final_a[n]) for n in saved)
        assert (run / "checkpoints" / "step-0000012" / "adapter" / "adapter_model.safetensors").is_file()
    state = json.loads((run_b / "checkpoints" / "step-0000012" / "state.json").read_text())
    assert state["position"] == {"step": 12, "epoch": 1, "batch": 6}


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tiny_llama, tmp_path):
    data = _data()
    out = tmp_path / "run"
    # an earlier run's checkpoint in the same out_dir: a fresh run must not name (or keep) it
    stale = out / "checkpoints" / "step-0000099"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text("{}")
    calls = []

    def nan_at_3(model, batch):
        calls.append(1)
        loss = _lm_loss(model, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    # a fresh run refuses to delete it, naming both ways on; overwrite=true replaces it
    with pytest.raises(QLoRAError, match="resume=true.*overwrite=true") as refused:
        train(_lora_llama(tiny_llama), data, _collate, nan_at_3, _config(out))
    assert "step-0000099" in str(refused.value) and stale.is_dir() and not calls
    with pytest.raises(TrainingDiverged) as info:
        train(_lora_llama(tiny_llama), data, _collate, nan_at_3, dataclasses.replace(_config(out), overwrite=True))
    assert isinstance(info.value, QLoRAError)
    good = out / "checkpoints" / "step-0000002"
    message = str(info.value)
    assert "step 3" in message and str(good) in message, message
    assert "nan" in message.lower()
    assert len(calls) == 3                                      # stopped at once
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000002"]

    # the last good checkpoint loads: weights, optimizer, scheduler, position
    model = _lora_llama(tiny_llama)
    params = [p for p in model.parameters() if p.requires_grad]
    config = _config(out)
    optimizer = make_optimizer(config.optimizer, params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(12, 2))
    position = load_checkpoint(good, model, optimizer, scheduler)
    assert position == {"step": 2, "epoch": 0, "batch": 2}
    assert scheduler.last_epoch == 2 and len(optimizer.state) == len(params)
    saved = load_file(str(good / "trainable.safetensors"))
    trained = _trainable(model)
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[n], trained[n]) and torch.isfinite(trained[n]).all() for n in saved)
    assert any(n.endswith("lora_B.weight") and trained[n].abs().sum() > 0 for n in trained)   # it did train
    # the PEFT-format adapter inside it loads too
    fresh = tiny_llama()
    qlora.load_adapter(fresh, good / "adapter")
    loaded = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    assert loaded.keys() == {n for n in trained if "lora_" in n}
    assert all(torch.equal(loaded[n].detach(), trained[n]) for n in loaded)


DDP_SCRIPT = textwrap.dedent('''
    import hashlib, json, sys
    import torch
    torch.set_num_threads(1)
    from torch import nn
    from safetensors.torch import save_file
    import qlora
    from qlora.train.loop import TrainConfig, train

    out = sys.argv[1]

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 16)
            self.proj = nn.Linear(16, 16)
            self.head = nn.Linear(16, 32)

        def forward(self, ids):
            return self.head(torch.relu(self.proj(self.emb(ids))))

    torch.manual_seed(0)
    model = Tiny()
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["emb", "proj"],
                                           modules_to_save=["head"]))
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 32, (9,), generator=g) for _ in range(16)]
    seen = []

    def collate(examples):
        return torch.stack(examples)

    def loss_fn(model, ids):
        seen.extend(hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in ids)
        logits = model(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))

    result = train(model, data, collate, loss_fn,
                   TrainConfig(epochs=1, batch_size=2, lr=1e-2, log_every=1, out_dir=out + "/run", progress=False))

    from accelerate.state import PartialState
    state = PartialState()
    rank = state.process_index
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              f"{out}/rank{rank}.safetensors")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "num_processes": state.num_processes,
                   "distributed_type": str(state.distributed_type), "backend": state.backend,
                   "steps": result.steps, "losses": result.losses, "seen": seen}, f)
''')


def test_two_cpu_processes_end_with_identical_adapters(tmp_path, torchrun):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    torchrun(script, tmp_path, timeout=120)

    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, f in enumerate(facts):
        assert f["rank"] == r
        assert f["num_processes"] == 2
        assert f["distributed_type"] == "DistributedType.MULTI_CPU"
        assert f["backend"] == "gloo"
        assert f["steps"] == 4                         # 16 examples / (2 processes x batch 2)
    # each process trained on its own half of the data ...
    assert len(facts[0]["seen"]) == len(facts[1]["seen"]) == 8
    assert not set(facts[0]["seen"]) & set(facts[1]["seen"])
    # ... the logged loss is the mean over both, and the synchronised gradients keep the weights equal
    assert facts[0]["losses"] == facts[1]["losses"]
    w0 = load_file(str(tmp_path / "rank0.safetensors"))
    w1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert w0.keys() == w1.keys() and any("lora_B" in k for k in w0)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert all(w0[k].abs().sum() > 0 for k in w0 if "lora_B" in k)       # trained (B starts at zero)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")             # written once, by rank 0
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("kw, needle", [
    ({"optimizer": "sgd"}, "adamw, adamw8bit, paged_adamw8bit"),
    ({"epochs": 0}, "epochs=0"),
    ({"epochs": True}, "epochs=True"),
    ({"batch_size": 2.0}, "batch_size=2.0"),
    ({"lr": 0}, "lr=0"),
    ({"lr": "3e-4"}, "lr='3e-4'"),
    ({"warmup_ratio": 1.0}, "warmup_ratio=1.0"),
    ({"eval_every": 0}, "eval_every=0"),            # was a ZeroDivisionError at the first step
    ({"save_every": 0}, "save_every=0"),            # was: silently no checkpoints
    ({"max_steps": -1}, "max_steps=-1"),
    ({"max_grad_norm": 0}, "max_grad_norm=0"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ({"resume": "yes"}, "resume='yes'"),
    ({"overwrite": 1}, "overwrite=1"),
])
def test_train_config_rejects_bad_values(kw, needle):
    with pytest.raises(QLoRAError) as info:
        TrainConfig(**kw)
    assert needle in str(info.value)


def test_logged_loss_is_the_mean_of_the_interval_and_the_profiler_is_quiet(tiny_llama, tmp_path, capfd):
    """grad_accum=2, log_every=4: each step's loss is the mean of its two micro-batches, and each
    metrics line the mean of the steps since the previous one (not the last micro-batch's loss).
    The first step's CPU peak runs torch's profiler: no 'USDT ... profiler_start' lines."""
    micro = []

    def recorded(model, batch):
        loss = _lm_loss(model, batch)
        micro.append(loss.item())
        return loss
    out = tmp_path / "run"
    result = train(_lora_llama(tiny_llama), _data(), _collate, recorded,
                   _config(out, grad_accum=2, log_every=4, save_every=None))
    assert result.steps == 6 and len(micro) == 12
    steps = [loss for _, loss in result.losses]
    for i, loss in enumerate(steps):
        assert loss == pytest.approx((micro[2 * i] + micro[2 * i + 1]) / 2, rel=1e-6)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["loss_steps"]) for r in rows] == [(4, 4), (6, 2)]
    assert rows[0]["loss"] == pytest.approx(sum(steps[:4]) / 4, rel=1e-6)
    assert rows[1]["loss"] == pytest.approx(sum(steps[4:]) / 2, rel=1e-6)
    assert rows[0]["loss"] != pytest.approx(steps[3], rel=1e-6)       # not the last step's alone
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    printed = capfd.readouterr()
    assert "USDT" not in printed.out + printed.err and "profiler_start" not in printed.out + printed.err


def test_a_fresh_run_keeps_an_earlier_runs_adapter(tiny_llama, tmp_path):
    """An out_dir holding an earlier run's final adapter (no checkpoints): refused, the adapter untouched;
    overwrite=true replaces it with this run's."""
    out = tmp_path / "run"
    earlier = out / "adapter"
    earlier.mkdir(parents=True)
    (earlier / "adapter_model.safetensors").write_bytes(b"earlier run")
    with pytest.raises(QLoRAError, match="adapter of an earlier run.*overwrite=true"):
        train(_lora_llama(tiny_llama), _data(), _collate, _lm_loss, _config(out, max_steps=1))
    assert (earlier / "adapter_model.safetensors").read_bytes() == b"earlier run"
    train(_lora_llama(tiny_llama), _data(), _collate, _lm_loss, _config(out, max_steps=1, overwrite=True))
    assert (earlier / "adapter_model.safetensors").read_bytes() != b"earlier run"
    assert (earlier / "adapter_config.json").is_file()


def test_the_first_steps_peak_is_logged_with_what_is_live_at_it(tiny_llama, tmp_path):
    """train() logs the first step's peak with its composition by category (memprofile.composition): they add up
    to the logged peak exactly, the phase and block are named, and on_first_step gets them once."""
    from memprofile.composition import AT_PEAK
    seen = []
    out = tmp_path / "run"
    result = train(_lora_llama(tiny_llama), _data(), _collate, _lm_loss, _config(out, save_every=None),
                   on_first_step=seen.append)
    assert len(seen) == 1 and seen[0] is result
    row = next(r for r in read_metrics(out / "metrics.jsonl") if "first_step_peak_bytes" in r)
    at = row["first_step_at_peak"]
    assert set(at) == set(AT_PEAK) and at == result.first_step_at_peak
    assert sum(at.values()) == row["first_step_peak_bytes"] == result.first_step_peak_bytes
    assert at["weights_trainable"] > 0 and at["weights_frozen"] > 0 and at["inputs"] > 0
    assert row["first_step_peak_phase"].split(":")[0].split(" ")[0] in ("forward", "backward", "optimizer")
    assert sum(row["first_step_temporary_parts"].values()) == at["temporary"]


@pytest.mark.parametrize("grad_accum, nan", [(2, False), (1, True)])
def test_the_first_steps_account_leaves_no_hook_behind(tiny_llama, tmp_path, grad_accum, nan):
    """The first step's memory account (a dispatch mode, saved-tensor and module hooks) spans every micro-batch
    of that step and is removed after it, also when the step raises."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    model = _lora_llama(tiny_llama)

    def loss(m, batch):
        value = _lm_loss(m, batch)
        return value * float("nan") if nan else value
    try:
        result = train(model, _data(), _collate, loss, _config(tmp_path / "run", grad_accum=grad_accum, save_every=None))
        assert sum(result.first_step_at_peak.values()) == result.first_step_peak_bytes
    except TrainingDiverged:
        assert nan
    assert _get_current_dispatch_mode_stack() == []
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
