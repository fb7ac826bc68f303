"""FSDP2 shards 4-bit experts: 2 gloo ranks (rank 1 starting from the meta device) train a tiny Qwen3-MoE in
QLoRA to the loss curve and adapter of one process with twice the batch, each rank holding half the packed
expert bytes. (qlora.fsdp.experts_to_shardable; the script: fsdp_moe_script.py.)"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]
SCRIPT = Path(__file__).with_name("fsdp_moe_script.py")


def test_two_ranks_train_a_moe_like_one_process(tmp_path, torchrun):
    torchrun(SCRIPT, tmp_path, timeout=300)
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    spec = importlib.util.spec_from_file_location("fsdp_moe_script", SCRIPT)
    s = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(s)
    from qlora.fsdp import local_bytes
    from qlora.train import train
    model = s.qlora_moe()
    whole = local_bytes(model)
    cfg = s.train_config(tmp_path / "ref", 2 * s.PER_RANK_BATCH)
    ref = train(model, s.data(), s.collate, s.lm_loss, cfg.__class__(**{**cfg.__dict__, "fsdp": False}))
    for rank in facts:
        assert [step for step, _ in rank["losses"]] == [step for step, _ in ref.losses]
        assert max(abs(a - b) for (_, a), (_, b) in zip(rank["losses"], ref.losses)) < 1e-5
        # the packed codes and absmax of every 4-bit matrix (experts included), split over the ranks
        assert abs(rank["local_bytes"]["packed_4bit"] - whole["packed_4bit"] / 2) <= 64
    got = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and any("experts" in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)
