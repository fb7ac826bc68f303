"""load_4bit on mixture-of-experts checkpoints: experts quantized while the checkpoint is read.

    .venv/bin/python -m pytest -q tests/qlora/quant/test_experts_loading.py      (~30 s)
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlora
from qlora.arch.experts import expert_weight_names, is_experts_module
from tests.qlora.quant.test_experts import tiny_moe

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_loaded_experts_are_the_codes_quantize_model_makes(family, tmp_path):
    model = tiny_moe(family)
    model.save_pretrained(tmp_path)             # transformers writes the family's own checkpoint layout
    loaded = qlora.load_4bit(str(tmp_path), compute_dtype=torch.float32)
    qlora.quantize_model(model, compute_dtype=torch.float32)
    mine = {n: m for n, m in loaded.named_modules() if is_experts_module(m)}
    theirs = dict((n, m) for n, m in model.named_modules() if is_experts_module(m))
    assert mine.keys() == theirs.keys() and mine
    for n, m in mine.items():
        for w in expert_weight_names(m):
            a, b = m.get_parameter(w), theirs[n].get_parameter(w)
            assert a.dtype == torch.uint8 and torch.equal(a.data, b.data), (n, w)
            assert torch.equal(a.quant_state.absmax, b.quant_state.absmax)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


PEAK_SCRIPT = """
import ctypes, sys, threading, time, torch
import transformers, bitsandbytes, qlora, qlora.quant          # imports before the baseline
# glibc keeps freed blocks (and raises its mmap threshold) so RSS would stay at its high-water mark after
# frees; a fixed 1 MiB threshold returns freed layers to the system (what `qlora export` sets too)
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
def anon():      # private memory; the safetensors file pages mapped while reading are page cache, not counted
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))
base, peak, done = anon(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon() - base)
        time.sleep(0.002)
t = threading.Thread(target=sample)
t.start()
model = qlora.load_4bit(sys.argv[1], compute_dtype=torch.bfloat16)
done.append(1)
t.join()
print(peak[0], qlora.quant.quantized_bytes(model))
"""


def test_loading_never_holds_the_float_experts_of_the_whole_model(tmp_path):
    """24 layers x 16 experts, ~610 MB in bf16 (experts 96 %): the load's peak growth of private memory
    stays under 0.5x the checkpoint (the 4-bit model is 0.26x; the whole model's experts in bf16 would be
    0.96x), measured in a fresh process."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=1024, hidden_size=512, intermediate_size=1024,
                               moe_intermediate_size=512, num_experts=16, num_experts_per_tok=2, num_hidden_layers=24,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                               decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    size = sum(p.stat().st_size for p in Path(tmp_path).glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                           "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    assert out.returncode == 0, out.stderr[-2000:]
    growth, four_bit = map(int, out.stdout.split()[-2:])
    assert four_bit < 0.3 * size
    assert growth < 0.5 * size, (growth / 2**20, size / 2**20)     # measured here: 0.43x (streamed), 1.1x (not)
