"""Shared tiny-model fixtures: transformers models built from configs with random (seeded) weights.

No download, no Hub: every model is created from a config, in fp32, in eval mode. Each fixture
returns a *factory* so a test can build several identical copies (same seed -> same weights):

    def test_x(tiny_llama):
        a, b = tiny_llama(), tiny_llama()          # equal weights, independent objects
        seq_cls = tiny_llama(seq_cls=True)         # LlamaForSequenceClassification (head: `score`)
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

SEED = 0
VOCAB = 96


def _build(cls, config, seed: int):
    torch.manual_seed(seed)
    model = cls(config)
    return model.float().eval()


@pytest.fixture
def single_thread():
    """One intra-op thread for the test (restored after): tiny matmuls are many times faster without
    thread hand-offs, especially on a busy machine. Opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_llama():
    """Factory: a 2-layer Llama (hidden 32, 4 heads / 2 KV heads, untied lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    def make(seq_cls: bool = False, seed: int = SEED, **overrides):
        cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   tie_word_embeddings=False, pad_token_id=0, num_labels=3)
        cfg.update(overrides)
        cls = LlamaForSequenceClassification if seq_cls else LlamaForCausalLM
        return _build(cls, LlamaConfig(**cfg), seed)
    return make


@pytest.fixture
def tiny_gpt2():
    """Factory: a 2-layer GPT2LMHeadModel (hidden 32, 4 heads; transformers' Conv1D layers, weight
    [in, out]; lm_head tied to the token embedding)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def make(seed: int = SEED, **overrides):
        cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                   bos_token_id=0, eos_token_id=0)
        cfg.update(overrides)
        return _build(GPT2LMHeadModel, GPT2Config(**cfg), seed)
    return make


@pytest.fixture
def tiny_bert_cls():
    """Factory: a 2-layer BertForSequenceClassification (hidden 32, 4 heads, 3 labels)."""
    from transformers import BertConfig, BertForSequenceClassification

    def make(seed: int = SEED, **overrides):
        cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64, num_labels=3)
        cfg.update(overrides)
        return _build(BertForSequenceClassification, BertConfig(**cfg), seed)
    return make


@pytest.fixture
def tiny_vit():
    """Factory: a 1-layer ViTForImageClassification (image 32, patch 8, hidden 32, 5 labels)."""
    from transformers import ViTConfig, ViTForImageClassification

    def make(seed: int = SEED, **overrides):
        cfg = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=1, num_attention_heads=4, num_labels=5)
        cfg.update(overrides)
        return _build(ViTForImageClassification, ViTConfig(**cfg), seed)
    return make


@pytest.fixture
def token_ids():
    """Seeded token ids [2, 7] in 1..VOCAB-1 (no padding token)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, VOCAB, (2, 7), generator=g)


@pytest.fixture
def pixel_values():
    """Seeded images [2, 3, 32, 32] for `tiny_vit`."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 32, 32, generator=g)


# `import qlora_recipes` works in a source checkout without installing (recipes/ is that package)
from qlora.cli import recipes_package  # noqa: E402

recipes_package()


@pytest.fixture(scope="session")
def torchrun():
    """run(script, *args, timeout=s): `script` under `torchrun --standalone --nproc_per_node 2` (gloo on CPU,
    one thread per rank, no inherited launcher variables, this checkout on PYTHONPATH); a timeout or a
    non-zero exit fails the test with the ranks' output."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    def run(script, *args, timeout: int):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
            env.pop(key, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), *map(str, args)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"torchrun with 2 gloo processes did not finish in {timeout} s:\n{e.stdout}\n{e.stderr}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc
    return run


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
