"""FSDP2 on a mixture of experts, launched by tests/qlora/fsdp/test_moe.py on 2 gloo processes:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/qlora/fsdp/fsdp_moe_script.py OUT

A tiny Qwen3-MoE in QLoRA (4-bit experts + an adapter on every expert matrix and linear layer); rank 0
holds the values, rank 1 the model on the meta device (qlora.fsdp.meta_4bit); train(fsdp=True) for STEPS
steps. Each rank writes OUT/rank{r}.json: its losses and its own bytes (qlora.fsdp.local_bytes). The builders
are imported by the test for its one-process reference (batch 2 x the per-rank batch).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import qlora
from qlora import LoraConfig
from tests.qlora.fsdp.fsdp_script import VOCAB, collate
from tests.qlora.fsdp.fsdp_script import data as base_data

STEPS, PER_RANK_BATCH = 6, 2


def moe_config():
    from transformers import AutoConfig
    return AutoConfig.for_model("qwen3_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                                decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)


def qlora_moe(meta: bool = False):
    from transformers import AutoModelForCausalLM

    from qlora.fsdp import meta_4bit
    from qlora.quant import quantize_model
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(moe_config(), dtype=torch.float32)
        meta_4bit(model, compute_dtype=torch.float32)
    else:
        model = quantize_model(AutoModelForCausalLM.from_config(moe_config(), dtype=torch.float32),
                               compute_dtype=torch.float32)
    model.eval()
    qlora.add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    qlora.prepare_for_training(model)
    return model


def data():
    return base_data(STEPS * PER_RANK_BATCH * 2)


def lm_loss(model, batch):
    return qlora.causal_lm_loss(model, batch["input_ids"], batch["input_ids"])


def train_config(out, batch_size):
    from qlora.train import TrainConfig
    return TrainConfig(epochs=1, batch_size=batch_size, lr=5e-3, warmup_ratio=0.1, log_every=1, seed=0,
                       out_dir=str(out), progress=False, fsdp=True)


def main(out: Path) -> None:
    from accelerate.state import PartialState

    from qlora.train import train
    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    rank = state.process_index
    model = qlora_moe(meta=rank != 0)
    result = train(model, data(), collate, lm_loss, train_config(out / "run", PER_RANK_BATCH))
    (out / f"rank{rank}.json").write_text(json.dumps({"losses": result.losses, "local_bytes": result.local_bytes}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
