"""Tests of `qlora export --requantize nf4|fp4` (qlora/requantize.py): the merged model written in
bitsandbytes' 4-bit format, loadable by stock transformers, with the added error measured.

    .venv/bin/python -m pytest tests/qlora/export/test_requantize.py -s

Same tiny random Llama and QLoRA adapter as test_export.py. Each check compares against something
computed here: the merged weight W' = dequant(quant(W)) + s·B·A from the base and adapter files,
its 4-bit round trip straight through bitsandbytes.functional, the unmerged reference model of
test_export.py, and the plain export loaded by transformers with a BitsAndBytesConfig.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from qlora.errors import QLoRAError
from tests.qlora.export.test_merge import (
    ENV,
    QLORA_BIN,
    adapter_tensors,
    base_tensors,
    compare,
    nf4_roundtrip,
    reference_logits,
    save_llama_base,
    snapshot,
    train_qlora_adapter,
)


def roundtrip(w: torch.Tensor, quant_type: str) -> torch.Tensor:
    """dequant(quant(w)) at blocksize 64 with double quantization, in w's dtype, straight with bitsandbytes."""
    import bitsandbytes.functional as F
    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    return F.dequantize_4bit(q, state)


def merged_weights(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """module path -> W' = dequant(quant(W)) + s·B·A in fp32, for every adapted layer (all 4-bit here)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    w, ad = base_tensors(base), adapter_tensors(adapter)
    out = {}
    for path in json.loads((adapter / "qlora_adapter.json").read_text())["quantized_modules"]:
        a, b = ad[path + ".lora_A.weight"].float(), ad[path + ".lora_B.weight"].float()
        out[path] = nf4_roundtrip(w[path + ".weight"]).float() + s * (b @ a)
    return out


def run_cli(args: list[str]) -> tuple[int, str]:
    from qlora import cli
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(args)
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def rq(tmp_path_factory):
    """Base, adapter, `qlora export --requantize nf4` (bf16, through the CLI, verified) and the plain
    bf16 export of the same adapter."""
    from qlora.export.from_files import export_adapter
    root = tmp_path_factory.mktemp("requantize")
    base = save_llama_base(root / "base")
    model = train_qlora_adapter(base, root / "adapter")
    code, printed = run_cli(["export", "--base", str(base), "--adapter", str(root / "adapter"),
                             "--out", str(root / "nf4"), "--requantize", "nf4"])
    print(printed)
    export_adapter(base, root / "adapter", root / "plain", dtype="bfloat16", verify=False, progress=False)
    return SimpleNamespace(root=root, base=base, adapter=root / "adapter", model=model, out=root / "nf4",
                           plain=root / "plain", code=code, printed=printed,
                           report=json.loads((root / "nf4/export_report.json").read_text()),
                           merged=merged_weights(base, root / "adapter"))


def load_stock(folder: Path):
    """The folder loaded by transformers' AutoModelForCausalLM (bitsandbytes does the 4-bit layers)."""
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set(), info
    return model.eval()


def four_bit_weights(model) -> dict[str, torch.Tensor]:
    """Dequantized weight of every bitsandbytes Linear4bit (read before any forward: bitsandbytes may
    repack CPU weights on the first one)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    return {name: F.dequantize_4bit(m.weight.data, m.weight.quant_state)
            for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_cli_requantize_prints_error_and_exits_0(rq):
    assert rq.code == 0, rq.printed
    assert "requantized 14 layers to nf4 (blocksize 64, double quant True)" in rq.printed
    assert "added error / LoRA update" in rq.printed
    assert "no pass/fail limit for requantized output" in rq.printed and "PASS" not in rq.printed
    assert not any(p.name.startswith(".") for p in rq.root.iterdir())        # no staging folder left


def test_requantized_folder_loads_with_stock_transformers(rq):
    """Every 4-bit-in-training layer is a Linear4bit whose dequantized weight equals dequant(quant(W'))
    computed here from the merged fp32 W' (cast to bf16, the export dtype); the rest is plain bf16."""
    config = json.loads((rq.out / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["load_in_4bit"], q["bnb_4bit_quant_type"], q["bnb_4bit_use_double_quant"],
            q["bnb_4bit_compute_dtype"]) == ("bitsandbytes", True, "nf4", True, "bfloat16")
    assert config["dtype"] == "bfloat16"
    model = load_stock(rq.out)
    got = four_bit_weights(model)
    assert set(got) == set(rq.merged)
    for path, w in rq.merged.items():
        layer = model.get_submodule(path)
        assert (layer.weight.quant_state.blocksize, layer.weight.quant_state.nested) == (64, True)
        expected = roundtrip(w.to(torch.bfloat16), "nf4")
        assert got[path].dtype == torch.bfloat16 and torch.equal(got[path], expected), path
        assert not torch.equal(got[path], w.to(torch.bfloat16))            # really 4-bit, not W'
    base, state = base_tensors(rq.base), model.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], base[key]), key
    # the files: packed uint8 codes plus bitsandbytes' quant-state entries, nothing in float for those layers
    files = load_file(str(rq.out / "model.safetensors"))
    one = "model.layers.0.mlp.up_proj.weight"
    assert files[one].dtype == torch.uint8 and files[one].shape == (128 * 64 // 2, 1)
    assert {k.removeprefix(one) for k in files if k.startswith(one)} == {
        "", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"}


def test_requantized_equals_plain_export_loaded_in_4bit(rq):
    """Re-quantizing is what loading the plain bf16 export in 4-bit does: same weights, same logits."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    other = AutoModelForCausalLM.from_pretrained(rq.plain, quantization_config=bnb_config, device_map="cpu").eval()
    ours = load_stock(rq.out)
    a, b = four_bit_weights(ours), four_bit_weights(other)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, other(input_ids=ids).logits)


def test_reported_added_error_matches_independent_computation(rq):
    rep = rq.report["requantize"]
    assert (rep["quant_type"], rep["blocksize"], rep["double_quant"], rep["quantized_from_dtype"]) == \
        ("nf4", 64, True, "bfloat16")
    layers = {l["name"]: l for l in rep["layers"]}
    assert set(layers) == set(rq.merged)
    updates = {l["name"]: l["update_norm"] for l in rq.report["layers"]}
    for path, w in rq.merged.items():
        err = (w - roundtrip(w.to(torch.bfloat16), "nf4").float()).norm().item()
        got = layers[path]
        assert math.isclose(got["weight_norm"], w.norm().item(), rel_tol=1e-5), path
        assert math.isclose(got["relative_error"], err / w.norm().item(), rel_tol=1e-4), path
        assert math.isclose(got["ratio_to_update"], err / updates[path], rel_tol=1e-4), path
        assert 0.02 < got["relative_error"] < 0.2      # NF4's rounding: a few % of the weight


def test_requantized_logits_vs_reference_at_reported_level(rq):
    """The stock-loaded requantized model against test_export's unmerged reference, on the inputs the
    export's own verification used (seeded random ids: the folder has no tokenizer): the same figures."""
    from transformers import LlamaForCausalLM
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = load_stock(rq.out)(input_ids=ids).logits.float()
    ref, without = reference_logits(rq.base, rq.adapter, ids, torch.bfloat16, LlamaForCausalLM)
    rel, agree = compare(got, ref)
    v = rq.report["verification"]
    print(f"\n  nf4 requantized vs unmerged reference: relative {rel:.3g}, top-1 {agree:.1f}% "
          f"(reported {v['vs_reference']['relative_error']:.3g}, {v['vs_reference']['top1_agreement_pct']:.1f}%); "
          f"the adapter alone moves the logits by {compare(without, ref)[0]:.3g}")
    assert v["passed"] is None and v["thresholds"] is None and "no pass/fail limit" in v["note"]
    assert math.isclose(v["vs_reference"]["relative_error"], rel, rel_tol=1e-3)
    assert math.isclose(v["vs_reference"]["top1_agreement_pct"], agree, abs_tol=1e-6)
    assert rel < 0.5 * compare(without, ref)[0]          # much closer to the trained model than the base


def test_export_merged_fp4_float32(rq):
    """From the in-memory model: fp4, fp32 output; weights = fp4 round trip of W' (the live model's
    dequantized base + its own s·B·A), done here."""
    import bitsandbytes.functional as F

    from qlora.export.from_model import export_merged
    from qlora.lora.inject import lora_layers
    out = rq.root / "merged-fp4"
    result = export_merged(rq.model, out, dtype="float32", requantize="fp4", verify=False, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
    got = four_bit_weights(load_stock(out))
    layers = lora_layers(rq.model)
    assert set(got) == set(layers) and len(result.requantizer.layers) == 14
    for path, layer in layers.items():
        base = layer.base_layer.weight
        w = F.dequantize_4bit(base.data, base.quant_state).float() + layer.delta_weight().float()
        assert got[path].dtype == torch.float32 and torch.equal(got[path], roundtrip(w, "fp4")), path


def test_invalid_requantize_value_cli_exit_2(rq, tmp_path):
    before = snapshot(rq.base, rq.adapter)
    proc = subprocess.run([str(QLORA_BIN), "export", "--base", str(rq.base), "--adapter", str(rq.adapter),
                           "--out", str(tmp_path / "out"), "--requantize", "int8"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("qlora export: error: --requantize 'int8'"), proc.stderr
    assert "nf4" in lines[0] and "fp4" in lines[0] and "none" in lines[0]
    assert list(tmp_path.iterdir()) == [] and snapshot(rq.base, rq.adapter) == before


def test_requantize_refused_without_4bit_layers(rq, tmp_path):
    """An adapter whose config lists no 4-bit modules (a plain LoRA run): nothing to re-quantize."""
    from qlora.export.from_files import export_adapter
    adapter = tmp_path / "adapter"
    shutil.copytree(rq.adapter, adapter)
    facts = json.loads((adapter / "qlora_adapter.json").read_text())
    facts.pop("quantized_modules")
    (adapter / "qlora_adapter.json").write_text(json.dumps(facts))
    with pytest.raises(QLoRAError, match="4-bit in training.*without --requantize"):
        export_adapter(rq.base, adapter, tmp_path / "out", requantize="nf4", progress=False)
    with pytest.raises(QLoRAError, match="accepted: none"):
        export_adapter(rq.base, rq.adapter, tmp_path / "out", requantize="q4", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
