"""Fixtures of the causal-LM recipe tests (sft, dpo): SmolLM2-135M-Instruct's real tokenizer and a tiny random
Llama over its vocabulary."""
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def smol_tok_dir(tmp_path_factory) -> Path:
    """A folder with SmolLM2-135M-Instruct's tokenizer files (tokenizer.json, chat template)."""
    from qlora.bundled import SMOLLM2_CACHE_NAME, _is_complete, default_cache_dir, smollm2_gguf_path
    cached = default_cache_dir() / SMOLLM2_CACHE_NAME
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    if _is_complete(cached):
        for p in cached.iterdir():
            if p.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy(p, folder / p.name)
        return folder
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer
    gguf = Path(smollm2_gguf_path())
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tok(smol_tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smol_tok_dir))


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
