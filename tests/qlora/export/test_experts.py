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
