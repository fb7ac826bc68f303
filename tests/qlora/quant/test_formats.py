"""load_4bit on FP8 and MXFP4 checkpoints (qlora.quant.formats): the same NF4 codes as transformers' own
dequantization followed by bitsandbytes' quantize_4bit, streamed, and bad input in one line.

    .venv/bin/python -m pytest -q tests/qlora/quant/test_formats.py

The checkpoints are written here from tiny random models: FP8 e4m3 with one float32 scale per
[128, 128] block (`weight_scale_inv`, DeepSeek-V3 / Qwen3-FP8) or per tensor, and gpt-oss's MXFP4 experts
(`*_blocks` [E, out, in/32, 16]: two e2m1 codes a byte, low nibble first; `*_scales` [E, out, in/32]: a
power-of-two exponent + 127).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora
from qlora.arch.experts import expert_weight_names, is_experts_module
from qlora.arch.quantized import is_4bit
from qlora.errors import QLoRAError
from tests.qlora.quant.test_experts_loading import PEAK_SCRIPT

pytestmark = pytest.mark.usefixtures("single_thread")

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def to_fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (e4m3 [out, in], float32 scales [out/bo, in/bi], or [] for one per tensor)."""
    w = w.float()
    if block is None:
        scale = w.abs().max().clamp(min=1e-12) / 448
        return (w / scale).to(torch.float8_e4m3fn), scale
    (rows, cols), (bo, bi) = w.shape, block
    tiles = w.reshape(rows // bo, bo, cols // bi, bi)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448                        # [out/bo, in/bi]
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(rows, cols)
    return q, scale


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., n] float -> (uint8 [..., n/32, 16], uint8 exponents + 127 [..., n/32]), nearest e2m1 code."""
    groups = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    exp = torch.floor(torch.log2(groups.abs().amax(-1).clamp(min=2.0 ** -100))) - 2         # 6 = 1.5 * 2^2
    codes = ((groups / torch.exp2(exp)[..., None])[..., None] - E2M1).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def _is_fp8_target(key: str, t: torch.Tensor) -> bool:
    """The weights an FP8 release stores in e4m3: 2-D Linear weights but the embeddings, head and routers."""
    return (t.dim() == 2 and key.endswith(".weight") and "embed" not in key and "lm_head" not in key
            and not key.endswith("mlp.gate.weight") and "router" not in key)


def write_fp8(model, folder: Path, block=(128, 128)) -> Path:
    """The model saved by transformers (bf16), then its Linear weights rewritten as FP8 + weight_scale_inv."""
    model.to(torch.bfloat16).save_pretrained(folder)
    for file in folder.glob("*.safetensors"):
        tensors = {}
        for key, t in load_file(file).items():
            if _is_fp8_target(key, t):
                q, scale = to_fp8(t, block)
                tensors[key], tensors[key + "_scale_inv"] = q, scale
            else:
                tensors[key] = t
        save_file(tensors, file, metadata={"format": "pt"})
    _set_quantization_config(folder, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": list(block) if block else None})
    return folder


def write_mxfp4(model, folder: Path) -> Path:
    """gpt-oss saved by transformers, its experts rewritten as MXFP4 (quantized along the input dim)."""
    model.to(torch.bfloat16).save_pretrained(folder)
    for file in folder.glob("*.safetensors"):
        tensors = {}
        for key, t in load_file(file).items():
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = to_mxfp4(t.transpose(1, 2))           # [E, in, out] -> stored [E, out, in]
                tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
            else:
                tensors[key] = t
        save_file(tensors, file, metadata={"format": "pt"})
    _set_quantization_config(folder, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    return folder


def _set_quantization_config(folder: Path, q: dict) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = q
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def tiny_qwen3(width: int = 128, layers: int = 2, moe: bool = False):
    """A random Qwen3 (or Qwen3-MoE) whose Linear widths are multiples of 128 (FP8's block)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=width, decoder_sparse_step=1,
                 mlp_only_layers=[]) if moe else {}
    cfg = AutoConfig.for_model("qwen3_moe" if moe else "qwen3", vocab_size=256, hidden_size=width,
                               intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=4, head_dim=width // 4, max_position_embeddings=64,
                               tie_word_embeddings=False, **extra)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def transformers_dequantized(folder: Path, fmt: str):
    """Stock transformers' load of the folder with its own dequantization, in bf16 (the reference)."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config
    config = FineGrainedFP8Config(dequantize=True) if fmt == "fp8" else Mxfp4Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16).eval()


def assert_dequantized_near(reference, original, rel: float) -> None:
    """transformers' dequantization of the written checkpoint is near the model it was written from (the writer
    and transformers agree on the format; a transposed or misread layout would be ~1.4 off)."""
    theirs = dict(reference.named_parameters())
    for name, w in original.named_parameters():
        if w.dim() >= 2 and "embed" not in name:
            err = (theirs[name].float() - w.float()).norm() / w.float().norm()
            assert err < rel, (name, err.item())


def assert_codes_of_reference(loaded, reference) -> int:
    """Every 4-bit matrix of `loaded` holds bitsandbytes' quantize_4bit codes and absmax of the reference's float
    weight (cast to bf16); every float tensor equals the reference's. Returns the number of 4-bit matrices."""
    import bitsandbytes.functional as F
    ref = dict(reference.named_modules())
    checked = 0
    for name, module in loaded.named_modules():
        if is_4bit(module):
            pairs = [(module.weight, ref[name].weight)]
        elif is_experts_module(module):
            pairs = [(module.get_parameter(w), ref[name].get_parameter(w)) for w in expert_weight_names(module)]
        else:
            continue
        for mine, theirs in pairs:
            codes, state = F.quantize_4bit(theirs.detach().to(torch.bfloat16).reshape(-1), blocksize=64,
                                           quant_type="nf4", compress_statistics=True)
            assert torch.equal(mine.data.reshape(-1), codes.reshape(-1)), name
            assert torch.equal(mine.quant_state.absmax, state.absmax), name
            assert torch.equal(mine.quant_state.state2.absmax, state.state2.absmax), name
            checked += 1
    plain = {k: v for k, v in reference.state_dict().items()}
    for key, value in loaded.state_dict().items():
        if key in plain and value.is_floating_point() and value.shape == plain[key].shape:
            assert torch.equal(value, plain[key].to(value.dtype)), key
    return checked


def assert_same_logits(loaded, reference) -> None:
    """The loaded model's logits = the reference model with each weight replaced by its NF4 round trip."""
    import bitsandbytes.functional as F
    with torch.no_grad():
        for name, module in reference.named_modules():
            lm = loaded.get_submodule(name)
            weights = ([("weight", module.weight)] if is_4bit(lm) else
                       [(w, module.get_parameter(w)) for w in expert_weight_names(lm)] if is_experts_module(lm)
                       else [])
            for wname, w in weights:
                codes, state = F.quantize_4bit(w.to(torch.bfloat16).reshape(-1), blocksize=64, quant_type="nf4",
                                               compress_statistics=True)
                w.copy_(F.dequantize_4bit(codes, state).reshape(w.shape))
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("block, moe, matrices", [((128, 128), False, 2 * 7), (None, False, 2 * 7),
                                                   ((128, 128), True, 2 * (4 + 2))],
                         ids=["blocks", "per_tensor", "moe_blocks"])
def test_fp8_loads_to_the_codes_of_transformers_dequantization(block, moe, matrices, tmp_path, monkeypatch):
    folder = write_fp8(tiny_qwen3(moe=moe), tmp_path, block)
    reference = transformers_dequantized(folder, "fp8")
    assert_dequantized_near(reference, tiny_qwen3(moe=moe).to(torch.bfloat16), rel=0.06)
    # streamed: every Linear and experts module was made 4-bit while loading, none left for after
    monkeypatch.setattr("qlora.quant.load.quantize_model", lambda *a, **k: pytest.fail("quantized after loading"))
    loaded = qlora.load_4bit(str(folder))
    assert "quantization_config" not in loaded.config.to_dict() and loaded.qlora_checkpoint_format == "fp8"
    assert assert_codes_of_reference(loaded, reference) == matrices
    assert_same_logits(loaded, reference)


def tiny_gpt_oss():
    """A random gpt-oss whose expert input widths are multiples of 32 (MXFP4's group); routers and biases
    non-trivial."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_oss", vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2, sliding_window=8, max_position_embeddings=131072,  # YaRN's
                               layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name or name.endswith("_bias"):
                p.normal_(0, 0.5)
    return model


def test_mxfp4_loads_to_the_codes_of_transformers_dequantization(tmp_path):
    folder = write_mxfp4(tiny_gpt_oss(), tmp_path)
    reference = transformers_dequantized(folder, "mxfp4")
    assert_dequantized_near(reference, tiny_gpt_oss().to(torch.bfloat16), rel=0.2)
    loaded = qlora.load_4bit(str(folder))
    assert "quantization_config" not in loaded.config.to_dict() and loaded.qlora_checkpoint_format == "mxfp4"
    assert assert_codes_of_reference(loaded, reference) == 2 * (4 + 2)
    assert_same_logits(loaded, reference)


def test_fp8_loading_is_streamed(tmp_path):
    """8 layers x 16 experts of [512, 512], FP8 with [128, 128] blocks (~103 MiB; 204 MiB in bf16): the load's
    peak growth of private memory, measured in a fresh process, stays well under a bf16 copy of the model.
    Measured: 105 MiB = the 4-bit model (52 MiB) + ~2 layers of experts in transformers' per-expert merge
    (FP8 list, bf16 list, merged matrix); 230 MiB without the streamed quantization. The per-expert tensors
    here are 256-512 KiB, so the glibc threshold for returning freed blocks is set to 64 KiB (at PEAK_SCRIPT's
    1 MiB, heap fragmentation adds ~5 MiB a layer: 137 MiB)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=1024, hidden_size=512, intermediate_size=1024,
                               moe_intermediate_size=512, num_experts=16, num_experts_per_tok=2, num_hidden_layers=8,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                               decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
    torch.manual_seed(0)
    write_fp8(AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16), tmp_path)
    size = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    bf16 = 2 * sum(t.numel() for t in load_file(tmp_path / "model.safetensors").values())
    script = PEAK_SCRIPT.replace("mallopt(-3, 1 << 20)", "mallopt(-3, 1 << 16)")
    assert script != PEAK_SCRIPT
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                           "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    assert out.returncode == 0, out.stderr[-2000:]
    growth, four_bit = map(int, out.stdout.split()[-2:])
    print(f"FP8 checkpoint {size / 2**20:.0f} MiB (bf16 {bf16 / 2**20:.0f} MiB, 4-bit model "
          f"{four_bit / 2**20:.0f} MiB): load peak {growth / 2**20:.0f} MiB private")
    assert four_bit < 0.3 * bf16
    assert growth < 0.65 * bf16, (growth / 2**20, bf16 / 2**20)


def test_an_fp8_scale_grid_that_does_not_divide_its_weight_is_one_line(tmp_path):
    folder = write_fp8(tiny_qwen3(layers=1), tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(3, 1)     # 128 rows in 3 blocks
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QLoRAError, match=r"o_proj.weight \[128, 128\] is not a whole number of blocks of its "
                                         r"scale grid \[3, 1\] \(weight_block_size \[128, 128\]\)"):
        qlora.load_4bit(str(folder))


@pytest.mark.parametrize("q, said", [({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
                                     ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes 8-bit")])
def test_another_quantization_is_one_line(q, said, tmp_path):
    tiny_qwen3(layers=1).save_pretrained(tmp_path)
    _set_quantization_config(tmp_path, q)
    with pytest.raises(QLoRAError, match=f"is quantized with {said}; load_4bit reads float, FP8"):
        qlora.load_4bit(str(tmp_path))


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_export_from_a_dequantized_base_is_float_and_loads_in_stock_transformers(fmt, tmp_path, capsys):
    """export_merged from a model loaded from FP8 / MXFP4: float (said in one line), no quantization_config, the
    adapter merged onto the dequantized 4-bit weights it was trained on; stock transformers' logits = the live
    model's. The export from files refuses such a base in one line naming the fix."""
    from transformers import AutoModelForCausalLM

    from qlora.cli import main
    base = write_fp8(tiny_qwen3(), tmp_path / "base") if fmt == "fp8" else write_mxfp4(tiny_gpt_oss(), tmp_path / "base")
    model = qlora.load_4bit(str(base), compute_dtype=torch.float32)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    capsys.readouterr()
    result = qlora.export_merged(model, tmp_path / "out", dtype="float32", progress=False)
    assert result.verification["passed"]
    assert f"note: the base was an {fmt.upper()} checkpoint; the export is float32: " in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    q_proj = model.model.layers[0].self_attn.q_proj            # exported = dequantize(NF4 codes) + s·B·A
    merged = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    import bitsandbytes.functional as F
    seen = F.dequantize_4bit(q_proj.base_layer.weight.data, q_proj.base_layer.weight.quant_state).float()
    torch.testing.assert_close(merged, seen + q_proj.delta_weight(), rtol=0, atol=1e-6)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, rtol=0, atol=2e-5)
    qlora.export_merged(model, tmp_path / "bf16", progress=False, verify=False)
    assert "the export is bfloat16: " in capsys.readouterr().out
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"

    qlora.save_adapter(model, tmp_path / "adapter")
    code = main(["export", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "o")])
    said = capsys.readouterr()
    assert code == 2 and not (tmp_path / "o").exists()
    assert (f"the base is an {fmt.upper()} checkpoint, and the export from files reads float checkpoints only; export "
            "from the live model instead (bf16)") in said.err + said.out
    assert "Traceback" not in said.err


def test_fp8_weights_with_partial_blocks_load_by_the_formats_definition(tmp_path):
    """DeepSeek-V3's kv_a_proj_with_mqa has 576 rows: 5 row blocks of 128, the last partial. transformers' own
    dequantization takes the block from the grid (576 / 5 raises; 192 / 2 = 96 scales the wrong rows); the
    reference here is the format's definition, W[i, j] = q[i, j] * scale[i // 128, j // 128]."""
    import bitsandbytes.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=4, head_dim=48, tie_word_embeddings=False)
    folder = tmp_path / "m"          # q/k/v_proj [192, 128], o_proj [128, 192]: partial row and column blocks
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    for k, t in list(tensors.items()):
        if _is_fp8_target(k, t):
            rows, cols = t.shape
            padded = torch.zeros(-(-rows // 128) * 128, -(-cols // 128) * 128)
            padded[:rows, :cols] = t.float()
            q, scale = to_fp8(padded, (128, 128))
            tensors[k], tensors[k + "_scale_inv"] = q[:rows, :cols].contiguous(), scale
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _set_quantization_config(folder, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [128, 128]})
    loaded = qlora.load_4bit(str(folder), compute_dtype=torch.float32)
    for proj in ("k_proj", "o_proj"):
        key = f"model.layers.0.self_attn.{proj}.weight"
        q, scale = tensors[key], tensors[key + "_scale_inv"]
        rows, cols = q.shape
        want = q.float() * scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        codes, state = F.quantize_4bit(want.reshape(-1), blocksize=64, quant_type="nf4", compress_statistics=True)
        layer = loaded.get_submodule(key.removesuffix(".weight"))
        assert torch.equal(layer.weight.data.reshape(-1), codes.reshape(-1)), proj
        assert torch.equal(layer.weight.quant_state.state2.absmax, state.state2.absmax), proj
