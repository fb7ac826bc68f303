"""qlora.quant: NF4/FP4 weights bit-exact against bitsandbytes, storage cost, real models, bad input.

Fast tests use tiny models built from configs and the real MiniLM (22.7M params, ~3 s to load);
the SmolLM2 "Paris" check is marked slow (`pytest -m slow`).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

from qlora.errors import QLoRAError  # noqa: E402
from qlora.quant import (  # noqa: E402
    bits_per_weight,
    dequantize_weight,
    is_linear4bit,
    load_4bit,
    make_linear4bit,
    make_params4bit,
    quant_settings,
    quantize_model,
    quantized_bytes,
    quantized_numel,
)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def reference_dequant(w: torch.Tensor, quant_type="nf4", blocksize=64, double_quant=True) -> torch.Tensor:
    """What bitsandbytes itself gives for input w (its dtype matters)."""
    return F.dequantize_4bit(*F.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize,
                                              compress_statistics=double_quant))


def linear4bit_layers(model):
    return {n: m for n, m in model.named_modules() if is_linear4bit(m)}


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 192), nn.GELU(), nn.Linear(192, 64), nn.GELU(), nn.Linear(64, 10))


# ------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_random_weights_match_bitsandbytes_bit_for_bit(quant_type, compute_dtype):
    fp = tiny_mlp()
    q = quantize_model(copy.deepcopy(fp), quant_type=quant_type, compute_dtype=compute_dtype)
    layers = linear4bit_layers(q)
    assert sorted(layers) == ["0", "2", "4"]  # nn.Sequential has no head names: all quantized
    settings = quant_settings(q)
    assert settings == {"quant_type": quant_type, "blocksize": 64, "double_quant": True,
                        "compute_dtype": str(compute_dtype).removeprefix("torch."),
                        "quantized_from_dtype": str(compute_dtype).removeprefix("torch.")}
    for name, layer in layers.items():
        w = fp.get_submodule(name).weight.detach()
        got = dequantize_weight(layer)
        want = reference_dequant(w.to(compute_dtype), quant_type)
        assert got.dtype == compute_dtype and got.shape == w.shape
        assert torch.equal(got, want), name
        assert layer.weight.quant_state.quant_type == quant_type


def test_quantized_from_dtype_matters_and_reproduces_exactly():
    """bf16 vs fp32 inputs give different codes; the recorded dtype rebuilds the exact codes."""
    fp = tiny_mlp(seed=1)
    w = fp[0].weight.detach()  # fp32 [192, 128]
    codes32, _ = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    codes16, _ = F.quantize_4bit(w.bfloat16(), quant_type="nf4", blocksize=64, compress_statistics=True)
    n_diff = (codes32 != codes16).sum().item()
    print(f"\npacked bytes differing between fp32 and bf16 input: {n_diff} of {codes32.numel()}")
    assert n_diff > 0  # so the dtype must be recorded

    for compute_dtype in (torch.bfloat16, torch.float32):
        q = quantize_model(copy.deepcopy(fp), compute_dtype=compute_dtype)
        s = quant_settings(q)
        source = DTYPES[s["quantized_from_dtype"]]
        for name, layer in linear4bit_layers(q).items():
            w = fp.get_submodule(name).weight.detach()
            codes, state = F.quantize_4bit(w.to(source), quant_type=s["quant_type"], blocksize=s["blocksize"],
                                           compress_statistics=s["double_quant"])
            assert torch.equal(layer.weight.data, codes), name
            assert torch.equal(layer.weight.quant_state.absmax, state.absmax)
            assert torch.equal(dequantize_weight(layer), F.dequantize_4bit(codes, state))


def test_load_4bit_tiny_llama_exact_heads_kept_and_blocksize(tmp_path, tiny_llama):
    fp = tiny_llama(hidden_size=64, intermediate_size=128)
    fp.save_pretrained(tmp_path)  # fp32 checkpoint
    for blocksize in (64, 128):
        q = load_4bit(str(tmp_path), blocksize=blocksize)
        s = quant_settings(q)
        # transformers quantizes from the loading dtype, which load_4bit sets to compute_dtype
        assert s == {"quant_type": "nf4", "blocksize": blocksize, "double_quant": True,
                     "compute_dtype": "bfloat16", "quantized_from_dtype": "bfloat16"}
        assert type(q.lm_head) is nn.Linear and q.lm_head.weight.dtype == torch.bfloat16
        assert q.model.embed_tokens.weight.dtype == torch.bfloat16
        layers = linear4bit_layers(q)
        assert len(layers) == 2 * 7  # q,k,v,o + gate,up,down per layer
        for name, layer in layers.items():
            assert layer.compute_dtype == torch.bfloat16
            w = fp.get_submodule(name).weight.detach()
            assert torch.equal(dequantize_weight(layer), reference_dequant(w.bfloat16(), blocksize=blocksize)), name


def test_load_4bit_skip_modules_fp4_and_seq_cls_head(tmp_path, tiny_llama):
    fp = tiny_llama(seq_cls=True, hidden_size=64, intermediate_size=128)
    fp.save_pretrained(tmp_path)
    from transformers import AutoModelForSequenceClassification
    q = load_4bit(str(tmp_path), AutoModelForSequenceClassification, quant_type="fp4",
                  compute_dtype=torch.float32, skip_modules=["mlp.down_proj"])
    assert type(q.score) is nn.Linear  # the classification head stays in compute dtype
    assert all(type(layer.mlp.down_proj) is nn.Linear for layer in q.model.layers)
    assert is_linear4bit(q.model.layers[0].mlp.up_proj)
    s = quant_settings(q)
    assert (s["quant_type"], s["compute_dtype"], s["quantized_from_dtype"]) == ("fp4", "float32", "float32")
    w = fp.model.layers[1].self_attn.v_proj.weight.detach()
    assert torch.equal(dequantize_weight(q.model.layers[1].self_attn.v_proj), reference_dequant(w, "fp4"))


def test_quantize_model_keeps_head_tied_output_embeddings_and_bias_dtype(tiny_llama):
    m = tiny_llama(hidden_size=64, intermediate_size=128, tie_word_embeddings=True, mlp_bias=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    quantize_model(m)  # bf16 compute by default
    assert type(m.lm_head) is nn.Linear and m.lm_head.weight is m.model.embed_tokens.weight
    assert m.lm_head.weight.dtype == torch.float32  # untouched: quantize_model only replaces Linears
    up = m.model.layers[0].mlp.up_proj
    assert is_linear4bit(up) and up.bias.dtype == torch.bfloat16 and up.compute_dtype == torch.bfloat16
    assert not up.weight.requires_grad

    class WithOutputEmb(nn.Module):  # a non-transformers model naming its head differently
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(64, 64)
            self.out = nn.Linear(64, 10)

        def get_output_embeddings(self):
            return self.out

    w = quantize_model(WithOutputEmb())
    assert is_linear4bit(w.body) and type(w.out) is nn.Linear


# ------------------------------------------------------------------------------------------
# storage
# ------------------------------------------------------------------------------------------
def test_storage_at_most_4_13_bits_per_weight_with_double_quant():
    torch.manual_seed(0)
    n_out, n_in = 2048, 2048
    layer = nn.Sequential(nn.Linear(n_in, n_out, bias=False))
    quantize_model(layer, compute_dtype=torch.float32)
    n = n_out * n_in
    qs = layer[0].weight.quant_state
    # the pieces: packed codes 4 bits, absmax 8 bits per 64 weights, fp32 scale per 256 blocks
    assert layer[0].weight.data.numel() * layer[0].weight.data.element_size() == n // 2
    assert qs.absmax.dtype == torch.uint8 and qs.absmax.numel() == n // 64
    assert qs.state2.absmax.dtype == torch.float32 and qs.state2.absmax.numel() == n // 64 // 256
    bits = bits_per_weight(layer)
    limit = 4 + 8 / 64 + 32 / (64 * 256)
    print(f"\n4-bit NF4, blocksize 64, double quant: {bits:.5f} bits/weight "
          f"({quantized_bytes(layer)} bytes for {quantized_numel(layer)} weights; limit {limit:.5f})")
    assert limit <= bits <= 4.13

    plain = nn.Sequential(nn.Linear(n_in, n_out, bias=False))
    quantize_model(plain, double_quant=False, compute_dtype=torch.float32)
    bits_plain = bits_per_weight(plain)
    print(f"without double quant: {bits_plain:.5f} bits/weight")
    assert 4.5 <= bits_plain < 4.51


def test_quantized_bytes_counts_each_tensor_once():
    m = quantize_model(tiny_mlp())
    once = quantized_bytes(m)
    assert once == sum(quantized_bytes(layer) for layer in linear4bit_layers(m).values())
    # a module listed twice (shared) is still counted once
    shared = nn.ModuleList([m[0], m[0]])
    assert quantized_bytes(shared) == quantized_bytes(m[0])


# ------------------------------------------------------------------------------------------
# forward / backward through the 4-bit base
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_quantized_forward_close_and_packed_weights_survive_backward(tiny_llama, token_ids, compute_dtype):
    fp = tiny_llama(hidden_size=64, intermediate_size=128)
    other = tiny_llama(hidden_size=64, intermediate_size=128, seed=123)
    q = quantize_model(copy.deepcopy(fp), compute_dtype=compute_dtype)
    with torch.no_grad():
        ref, got, unrelated = fp(token_ids).logits, q(token_ids).logits.float(), other(token_ids).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    rel_other = ((unrelated - ref).norm() / ref.norm()).item()
    print(f"\nrelative logit error NF4 ({compute_dtype}): {rel:.4f} (an unrelated model: {rel_other:.2f})")
    assert rel < 0.2 and rel < rel_other / 5

    before = {n: (l.weight.data.clone(), l.weight.quant_state.absmax.clone())
              for n, l in linear4bit_layers(q).items()}
    bytes_before = quantized_bytes(q)
    q.train()
    embeds = q.model.embed_tokens(token_ids).detach().requires_grad_(True)  # [2, 7, 64]
    q(inputs_embeds=embeds).logits.float().pow(2).mean().backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all() and embeds.grad.abs().sum() > 0
    for n, layer in linear4bit_layers(q).items():
        assert layer.weight.grad is None
        assert torch.equal(layer.weight.data, before[n][0]) and torch.equal(layer.weight.quant_state.absmax, before[n][1])
    assert quantized_bytes(q) == bytes_before


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_cpu_forward_with_bf16_and_fp32_inputs(compute_dtype, input_dtype):
    torch.manual_seed(0)
    fp = nn.Linear(128, 64)
    layer = make_linear4bit(fp, compute_dtype=compute_dtype)
    x = torch.randn(3, 5, 128).to(input_dtype)
    y = layer(x)
    assert y.dtype == input_dtype and y.shape == (3, 5, 64)
    assert layer.compute_dtype == compute_dtype  # explicit: the input dtype does not override it
    assert layer.bias.dtype == compute_dtype
    w = dequantize_weight(layer).to(compute_dtype)
    want = nn.functional.linear(x.to(compute_dtype), w, layer.bias).to(input_dtype)
    tol = 1e-5 if compute_dtype == input_dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y, want, atol=tol, rtol=tol)


def test_layers_never_repacked_for_avx512_cpu_kernel_and_dequantize_handles_repacked():
    """bitsandbytes repacks a Linear4bit in place on its first eval/no-grad CPU forward when the
    CPU has AVX512-BF16, rounding the absmax to bf16; qlora's layers opt out to stay exact."""
    torch.manual_seed(0)
    layer = make_linear4bit(nn.Linear(128, 64), compute_dtype=torch.float32)
    assert layer.support_avx512bf16_for_cpu is False
    exact = dequantize_weight(layer)
    repacked = copy.deepcopy(layer)  # what the repack does (pure torch, runs on any CPU)
    repacked.weight.data, repacked.weight.quant_state = F._convert_weight_packed_for_cpu(
        repacked.weight.data, repacked.weight.quant_state)
    approx = dequantize_weight(repacked)
    assert approx.shape == exact.shape and not torch.equal(approx, exact)
    torch.testing.assert_close(approx, exact, atol=0.02 * exact.abs().max().item(), rtol=0.02)
    assert quant_settings(repacked)["double_quant"] is True  # reported as it was quantized


def test_make_params4bit_quantizes_on_cpu():
    w = torch.randn(64, 128)
    p = make_params4bit(w, quant_type="nf4", double_quant=False, blocksize=128)
    assert isinstance(p, bnb.nn.Params4bit) and p.bnb_quantized and p.dtype == torch.uint8
    assert p.shape == (64 * 128 // 2, 1) and p.quant_state.absmax.numel() == 64 and not p.requires_grad
    assert torch.equal(F.dequantize_4bit(p.data, p.quant_state), reference_dequant(w, blocksize=128, double_quant=False))


# ------------------------------------------------------------------------------------------
# real model: MiniLM
# ------------------------------------------------------------------------------------------
SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Quantization stores each weight in four bits.",
    "Paris is the capital of France.",
    "I loved this movie, the acting was wonderful.",
]


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    from qlora.bundled import minilm_path
    path = minilm_path()
    fp = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    q = load_4bit(path, AutoModel).eval()
    return path, AutoTokenizer.from_pretrained(path), fp, q


def test_minilm_nf4_weights_match_bitsandbytes(minilm):
    _, _, fp, q = minilm
    layers = linear4bit_layers(q)
    assert len(layers) == 6 * 6 + 1  # q,k,v,attn-out,intermediate,output per layer + pooler
    # every Linear of the first and last block and the pooler (all 37 would take ~4 s more:
    # bitsandbytes' CPU quantizer runs at ~6M weights/s)
    checked = [n for n in layers if n.startswith(("encoder.layer.0.", "encoder.layer.5.", "pooler"))]
    assert len(checked) == 13
    for name in checked:
        w = fp.get_submodule(name).weight.detach()  # real fp32 weights
        assert torch.equal(dequantize_weight(layers[name]), reference_dequant(w.bfloat16())), name
    # and through make_linear4bit (quantize_model's path) from fp32, FP4 this time
    query = fp.encoder.layer[3].attention.self.query
    layer = make_linear4bit(query, quant_type="fp4", compute_dtype=torch.float32)
    assert torch.equal(dequantize_weight(layer), reference_dequant(query.weight.detach(), "fp4"))
    assert q.embeddings.word_embeddings.weight.dtype == torch.bfloat16


def test_minilm_nf4_sentence_embeddings_close_to_full_precision(minilm):
    _, tok, fp, q = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [5, T, 1]

    def embed(model):
        with torch.no_grad():
            h = model(**batch).last_hidden_state.float()  # [5, T, 384]
        return (h * mask).sum(1) / mask.sum(1)              # mean over real tokens -> [5, 384]

    cos = nn.functional.cosine_similarity(embed(fp), embed(q), dim=-1)
    print("\nMiniLM NF4 vs fp32 cosine:", [round(c, 4) for c in cos.tolist()])
    assert (cos >= 0.95).all()
    print(f"MiniLM 4-bit storage: {bits_per_weight(q):.3f} bits/weight over {quantized_numel(q)} weights")


@pytest.mark.slow
def test_smollm2_nf4_answers_paris():
    from transformers import AutoTokenizer

    from qlora.bundled import resolve_model
    path = resolve_model("smollm2")
    model = load_4bit(path, device_map="cpu").eval()
    s = quant_settings(model)
    assert s["quant_type"] == "nf4" and len(linear4bit_layers(model)) == 30 * 7
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print("\nSmolLM2-135M NF4:", repr(answer))
    assert "Paris" in answer


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, given, accepted", [
    ({"quant_type": "int4"}, "int4", "nf4"),
    ({"quant_type": None}, "None", "fp4"),
    ({"blocksize": 100}, "100", "4096"),
    ({"blocksize": 16}, "16", "32, 64, 128"),
    ({"blocksize": 8192}, "8192", "64"),
    ({"compute_dtype": torch.int8}, "torch.int8", "torch.bfloat16"),
    ({"compute_dtype": "int4"}, "int4", "float32"),
    ({"double_quant": "yes"}, "yes", "True"),
    ({"skip_modules": 3}, "3", "list of module names"),
    ({"skip_modules": ["no_such_layer"]}, "no_such_layer", "named like"),
])
def test_bad_settings_raise_clear_errors(kwargs, given, accepted):
    with pytest.raises(QLoRAError) as e:
        quantize_model(tiny_mlp(), **kwargs)
    assert given in str(e.value) and accepted in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bad_settings_rejected_by_load_4bit_before_loading(tmp_path):
    with pytest.raises(QLoRAError, match="quant_type='int4'.*'nf4'"):
        load_4bit(str(tmp_path), quant_type="int4")
    with pytest.raises(QLoRAError, match="blocksize=100.*64"):
        load_4bit(str(tmp_path), blocksize=100)


def test_nothing_to_quantize():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(QLoRAError, match="nothing to quantize in Sequential.*nn.Linear"):
        quantize_model(conv)

    class OnlyHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.lm_head = nn.Linear(8, 10)

    with pytest.raises(QLoRAError, match=r"nothing to quantize.*kept: \['lm_head'\]"):
        quantize_model(OnlyHead())
    with pytest.raises(QLoRAError, match="nothing to quantize"):
        quantize_model(tiny_mlp(), skip_modules=["0", "2", "4"])
    with pytest.raises(QLoRAError, match="needs a torch.nn.Module"):
        quantize_model("not a model")


def test_already_quantized_is_idempotent_or_rejected():
    m = quantize_model(tiny_mlp())
    assert quantize_model(m) is m
    with pytest.raises(QLoRAError, match="already 4-bit.*quant_type"):
        quantize_model(m, quant_type="fp4")


def test_load_4bit_bad_folders(tmp_path, tiny_llama):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QLoRAError, match="no config.json") as e:
        load_4bit(str(empty))
    assert str(empty) in str(e.value)

    no_weights = tmp_path / "no_weights"
    tiny_llama().config.save_pretrained(no_weights)
    with pytest.raises(QLoRAError, match="no weights; accepted: model.safetensors"):
        load_4bit(str(no_weights))

    with pytest.raises(QLoRAError, match="does not exist"):
        load_4bit(str(tmp_path / "missing"))
    with pytest.raises(QLoRAError, match="quantization_config"):
        load_4bit(str(empty), quantization_config=object())


def test_quant_settings_none_without_4bit_layers_and_dequantize_rejects_plain_linear():
    assert quant_settings(tiny_mlp()) is None
    with pytest.raises(QLoRAError, match="needs a bitsandbytes Linear4bit; got Linear"):
        dequantize_weight(nn.Linear(4, 4))


def test_load_4bit_quantizes_linear_subclasses_transformers_skips(tmp_path):
    """Falcon's layers are FalconLinear (an nn.Linear subclass): transformers' 4-bit loader converts exact
    nn.Linear only, load_4bit quantizes the rest; the codes equal quantize_model's on the same weights."""
    from transformers import FalconConfig, FalconForCausalLM
    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       new_decoder_architecture=True, num_kv_heads=2)
    FalconForCausalLM(cfg).save_pretrained(tmp_path)
    loaded = load_4bit(str(tmp_path), compute_dtype=torch.float32)
    ref = quantize_model(FalconForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), compute_dtype=torch.float32)
    got = {n: m.weight.data for n, m in loaded.named_modules() if is_linear4bit(m)}
    want = {n: m.weight.data for n, m in ref.named_modules() if is_linear4bit(m)}
    assert sorted(got) == sorted(want) and len(got) == 8       # qkv, dense, h_to_4h, 4h_to_h x 2 blocks
    assert all(torch.equal(got[n], want[n]) for n in got)


def test_load_4bit_reads_a_bitsandbytes_4bit_checkpoint_as_it_is(tmp_path, tiny_llama):
    """A "-bnb-4bit" download (transformers' save of a 4-bit model): load_4bit keeps its codes (= quantize_model of
    the float source), warns nothing, and names the settings to use when asked for others."""
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    fp = tiny_llama(hidden_size=64, intermediate_size=128)
    fp.save_pretrained(tmp_path / "float")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
    AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config,
                                         dtype=torch.float32).save_pretrained(tmp_path / "bnb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = load_4bit(str(tmp_path / "bnb"), compute_dtype=torch.float32)
    ref = quantize_model(copy.deepcopy(fp), compute_dtype=torch.float32)
    for name, layer in linear4bit_layers(q).items():
        assert torch.equal(dequantize_weight(layer), dequantize_weight(ref.get_submodule(name))), name
    with pytest.raises(QLoRAError, match="is already 4-bit with quant_type=nf4, blocksize=64, double_quant=True"):
        load_4bit(str(tmp_path / "bnb"), compute_dtype=torch.float32, quant_type="fp4")
