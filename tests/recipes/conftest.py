"""Fixtures of the causal-LM recipe tests (sft, dpo): a tiny random Llama over SmolLM2-135M-Instruct's vocabulary
(its tokenizer: the `smol_tok_dir` fixture of tests/conftest.py)."""
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture
def tiny_chat_model(tmp_path, smol_tok_dir) -> Path:
    """A random 2-layer Llama over SmolLM2's vocabulary (49,152), with its tokenizer, saved as fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    folder = tmp_path / "tiny-chat"
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    for p in smol_tok_dir.iterdir():
        shutil.copy(p, folder / p.name)
    return folder
