"""Merged export of mixture-of-experts adapters: from the live model and from files, in the checkpoint's layout.

    .venv/bin/python -m pytest -q tests/qlora/export/test_experts.py      (~20 s)

Independent reference: stock transformers loads the exported folder (no qlora, no bitsandbytes in that
model) and its logits equal our live 4-bit model's (adapter attached, unmerged).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qlora
from tests.qlora.quant.test_experts import FAMILIES, MORE_FAMILIES, tiny_moe

pytestmark = pytest.mark.usefixtures("single_thread")
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))


def keys(folder: Path) -> set[str]:
    out = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            out |= set(s.keys())
    return out


def trained(family: str, base: Path):
    """(our 4-bit model loaded from `base` with a random LoRA on every linear layer and expert matrix)."""
    tiny_moe(family).save_pretrained(base)
    model = qlora.load_4bit(str(base), compute_dtype=torch.float32)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


def stock_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(IDS).logits


@pytest.mark.parametrize("family", [f for f in list(FAMILIES) + list(MORE_FAMILIES) if f != "olmoe"])
def test_export_merged_loads_in_stock_transformers(family, tmp_path):
    model = trained(family, tmp_path / "base")
    result = qlora.export_merged(model, tmp_path / "out", dtype="float32", progress=False)
    assert result.verification["passed"]
    assert keys(tmp_path / "out") == keys(tmp_path / "base")          # the family's own checkpoint layout
    with torch.no_grad():
        ours = model(IDS).logits
    torch.testing.assert_close(stock_logits(tmp_path / "out"), ours, rtol=0, atol=2e-5)


def test_qlora_export_from_files(tmp_path):
    model = trained("olmoe", tmp_path / "base")
    qlora.save_adapter(model, tmp_path / "adapter")
    cli = [sys.executable, "-m", "qlora.cli", "export", "--base", str(tmp_path / "base"), "--adapter",
           str(tmp_path / "adapter"), "--out", str(tmp_path / "out"), "--dtype", "float32"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PASS" in done.stdout
    assert keys(tmp_path / "out") == keys(tmp_path / "base")
    with torch.no_grad():
        ours = model(IDS).logits
    torch.testing.assert_close(stock_logits(tmp_path / "out"), ours, rtol=0, atol=2e-5)
    again = subprocess.run(cli, capture_output=True, text=True, timeout=600)     # never overwrites unasked
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    requant = subprocess.run(cli[:-3] + [str(tmp_path / "out4"), "--requantize", "nf4"], capture_output=True,
                             text=True, timeout=600)
    assert requant.returncode == 2 and "--requantize does not write 4-bit experts" in requant.stderr
    assert "Traceback" not in requant.stderr and not (tmp_path / "out4").exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_exporting_a_float_experts_model_twice_gives_the_same_files_and_leaves_it_unchanged(family, tmp_path):
    """mode=lora: the experts are float parameters. The export reads them, merges the update into a new tensor and
    never writes into the live model (it once added ΔW in place: a second export wrote W + 2ΔW and the
    verification failed)."""
    from safetensors.torch import load_file
    torch.manual_seed(0)
    model = tiny_moe(family).float()
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        before = model(IDS).logits
    first = qlora.export_merged(model, tmp_path / "one", dtype="float32", progress=False)
    second = qlora.export_merged(model, tmp_path / "two", dtype="float32", progress=False)
    assert first.verification["passed"] and second.verification["passed"]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)     # the live model is untouched
    one, two = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
                for d in (tmp_path / "one", tmp_path / "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    torch.testing.assert_close(stock_logits(tmp_path / "one"), before, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_an_export_too_large_to_load_again_is_verified_layer_by_layer(family, tmp_path, monkeypatch):
    """When the merged model would not fit beside the live one, the verification reads each merged tensor back
    from the folder and compares it with what training saw + s·B·A (one layer in memory), skips the end-to-end
    logits and says so; a tensor changed in the folder fails it."""
    from safetensors.torch import load_file, save_file

    import qlora.export.verify as ev
    model = trained(family, tmp_path / "base")
    monkeypatch.setattr(ev, "available_memory", lambda: 1 << 10)          # 1 KiB free: the model does not fit
    result = qlora.export_merged(model, tmp_path / "out", dtype="float32", progress=False)
    v = result.verification
    assert v["mode"] == "per-layer" and v["passed"] and v["layers_checked"] == len(result.layers) > 0
    assert v["worst_relative_error"] < 1e-6 and "does not fit in the memory available (1.00 KiB)" in v["skipped"]
    assert "verified layer by layer" in qlora.export.summary(result)
    with torch.no_grad():
        torch.testing.assert_close(stock_logits(tmp_path / "out"), model(IDS).logits, rtol=0, atol=2e-5)
    shard = next((tmp_path / "out").glob("*.safetensors"))
    tensors = load_file(shard)
    owner, _, leaf = v["worst_tensor"].rpartition(".")          # a model tensor: per-expert keys in the file
    for key in [k for k in tensors if k.startswith(owner + ".") and leaf in k]:
        tensors[key] = tensors[key] * 1.001                                 # one merged matrix off by 0.1 %
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(AssertionError):
        assert ev.verify_layers(tmp_path / "out", result, lambda n: _expected(model, n), reason="test")["passed"]


def _expected(model, name):
    """The model tensor the export must hold for one adapted layer (export_merged's own rule)."""
    from qlora.export.from_model import merged_tensors
    return merged_tensors(model, name, torch.float32)


def test_the_layer_by_layer_check_fails_an_adapter_the_export_did_not_merge(tmp_path, monkeypatch):
    """An adapter on a tied head is not written (the tied weight is written once, as the embedding): the check
    by layers names it and fails, as the full check does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import qlora.export.verify as ev
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    qlora.add_lora(model, qlora.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    monkeypatch.setattr(ev, "available_memory", lambda: 1)
    v = qlora.export_merged(model, tmp_path / "out", dtype="float32", progress=False).verification
    assert v["mode"] == "per-layer" and not v["passed"] and v["not_merged"] == ["lm_head"]
