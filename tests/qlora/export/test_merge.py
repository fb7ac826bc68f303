"""Tests of the dequantize-and-merge export (qlora/export.py, export_verify.py, shard_writer.py, `qlora export`).

    .venv/bin/python -m pytest tests/qlora/export/test_merge.py -s            # default suite (tiny models, < ~60 s)
    .venv/bin/python -m pytest tests/qlora/export/test_merge.py -s -m slow    # real SmolLM2-135M (converted once, ~20 s)

Everything is built from configs with random (seeded) weights, saved as bf16 folders in temp
dirs; no Hub. What is checked, each against something the test computes itself:

* one merged weight equals dequant(quant(W)) + s·B·A (bitsandbytes quantize_4bit/dequantize_4bit
  called here, fp32 arithmetic), bit for bit in an fp32 export and after the cast in a bf16 one;
* the exported folders load in a *separate* Python process with stock transformers, with neither
  bitsandbytes nor qlora imported there, and its logits match an unmerged reference built here
  (base in the export's dtype, adapted weights replaced by dequant(quant(W)), adapter as a separate
  path): fp32 relative error <= 1e-4 with 100% top-1 agreement, bf16 at bf16 level;
* a BERT classifier adapter (modules_to_save=["classifier"]) trained from a base saved as
  `BertModel` (keys without "bert.") exports as a BertForSequenceClassification with its head;
* export_merged (in-memory model) writes the same tensors as export_adapter (files);
* mismatched adapters and an existing --out are refused with nothing written; an export killed
  with SIGKILL half way leaves no --out and unchanged inputs, and the next export cleans up;
* the CLI's exit codes and output, export_report.json, sharded output.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora
from qlora.errors import QLoRAError

REPO = Path(__file__).resolve().parents[3]
PY = sys.executable
QLORA_BIN = Path(sys.executable).with_name("qlora")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
BERT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
            max_position_embeddings=64)
LORA_B_STD = 0.05     # random "trained" B: the update is of the order of the NF4 rounding error


# ------------------------------------------------------------------------------------------- helpers

def save_llama_base(folder: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).to(torch.bfloat16).save_pretrained(folder)
    return folder


def randomise_adapter(model, seed: int = 1, std: float = LORA_B_STD) -> None:
    """Pretend training happened: random B (A keeps its Kaiming init), random modules_to_save copies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif ".modules_to_save." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def train_qlora_adapter(base, adapter: Path, model_class=None, *, r=4, alpha=8, target="all-linear",
                        modules_to_save=None, std=LORA_B_STD, **load_kwargs):
    model = qlora.load_4bit(str(base), model_class, **load_kwargs)
    qlora.add_lora(model, qlora.LoraConfig(r=r, lora_alpha=alpha, target_modules=target,
                                           modules_to_save=modules_to_save))
    randomise_adapter(model, std=std)
    qlora.save_adapter(model, adapter)
    return model


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """dequant(quant(W)) with QLoRA's settings, computed here straight with bitsandbytes."""
    import bitsandbytes.functional as F
    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return F.dequantize_4bit(q, state)


def base_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


def snapshot(*folders: Path) -> dict:
    """path -> (size, mtime_ns, sha256) for every file under the folders."""
    out = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                st = f.stat()
                out[str(f)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
    return out


def sample_ids(n=3, seq=16, vocab=256, seed=5) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_logits(base: Path, adapter: Path, ids: torch.Tensor, dtype: torch.dtype, model_class, **kwargs):
    """(unmerged reference, same without the adapter): the base loaded in `dtype`, every adapted 4-bit
    weight replaced by dequant(quant(W_bf16)), the adapter attached as a separate path in `dtype`."""
    model = model_class.from_pretrained(str(base), dtype=dtype, **kwargs).eval()
    settings = json.loads((adapter / "qlora_adapter.json").read_text())
    assert settings["quantized_from_dtype"] == "bfloat16"
    params = dict(model.named_parameters())
    for path in settings["quantized_modules"]:
        p = params[path + ".weight"]
        p.copy_(nf4_roundtrip(p.to(torch.bfloat16)).to(dtype))   # the base is bf16: .to() is exact
    without = model(input_ids=ids).logits.float()
    qlora.load_adapter(model, adapter, dtype=dtype)
    return model(input_ids=ids).logits.float(), without


def compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative error ||got-ref||/||ref||, top-1 agreement in %)."""
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = 100.0 * (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, agree


# Run in a fresh interpreter: stock transformers only. Prints one JSON line; tensors go to a file.
STOCK_LOADER = textwrap.dedent(r'''
    import json, sys
    import torch, transformers
    from safetensors.torch import load_file, save_file
    jobs, out_file = json.loads(sys.argv[1]), sys.argv[2]
    tensors, meta = {}, {}
    for job in jobs:
        config = transformers.AutoConfig.from_pretrained(job["folder"])
        cls = getattr(transformers, config.architectures[0])          # the class the export names
        model = cls.from_pretrained(job["folder"], dtype="auto").eval()  # dtype from its config.json
        ids = load_file(job["inputs"])["input_ids"]
        with torch.no_grad():
            tensors[job["name"] + "/logits"] = model(input_ids=ids).logits.float().contiguous()
        state = model.state_dict()
        for key in job.get("weights", []):
            tensors[job["name"] + "/" + key] = state[key].float().contiguous()
        meta[job["name"]] = {"class": type(model).__name__, "dtype": str(next(model.parameters()).dtype),
                             "num_labels": model.config.num_labels}
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("bitsandbytes", "qlora", "peft"))
    assert not bad, f"the stock loader imported {bad[:5]}"
    meta["imported_banned"] = bad
    save_file(tensors, out_file)
    print(json.dumps(meta))
''')


class StockLoader:
    """STOCK_LOADER running in the background (started early: its imports take a while); .result() waits."""

    def __init__(self, jobs: list[dict], workdir: Path):
        self.out_file = workdir / "stock_outputs.safetensors"
        self.proc = subprocess.Popen([PY, "-c", STOCK_LOADER, json.dumps(jobs), str(self.out_file)], cwd=workdir,
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._result = None

    def result(self) -> tuple[dict, dict]:
        if self._result is None:
            stdout, stderr = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, stderr[-3000:]
            self._result = json.loads(stdout.strip().splitlines()[-1]), load_file(str(self.out_file))
        return self._result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny bf16 Llama base folder, a QLoRA all-linear adapter trained on it (random B) and the
    live QLoRA model it came from."""
    root = tmp_path_factory.mktemp("llama")
    base = save_llama_base(root / "base")
    model = train_qlora_adapter(base, root / "adapter")
    return SimpleNamespace(root=root, base=base, adapter=root / "adapter", model=model)


@pytest.fixture(scope="module")
def exports(llama):
    """fp32 and bf16 exports (verified against the reference, fp32 also against the live QLoRA model;
    timed) and an fp32 export in small shards."""
    from qlora.export.from_files import export_adapter
    out = SimpleNamespace(results={}, seconds={})
    for dtype in ("float32", "bfloat16"):
        t0 = time.perf_counter()
        out.results[dtype] = export_adapter(llama.base, llama.adapter, llama.root / f"out-{dtype}", dtype=dtype,
                                            verify_live=dtype == "float32", progress=False)
        out.seconds[dtype] = time.perf_counter() - t0
    out.fp32, out.bf16 = llama.root / "out-float32", llama.root / "out-bfloat16"
    out.sharded = llama.root / "out-sharded"
    export_adapter(llama.base, llama.adapter, out.sharded, dtype="float32", max_shard_size=100_000, verify=False,
                   progress=False)
    return out


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A BERT base saved as BertModel (keys without "bert."), a QLoRA adapter trained as
    BertForSequenceClassification with modules_to_save=["classifier"], and its fp32 export."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from qlora.export.from_files import export_adapter
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(BertConfig(**BERT)).to(torch.bfloat16).save_pretrained(root / "base")
    model = train_qlora_adapter(root / "base", root / "adapter", BertForSequenceClassification,
                                modules_to_save=["classifier"], num_labels=3)
    result = export_adapter(root / "base", root / "adapter", root / "out", dtype="float32", progress=False)
    return SimpleNamespace(root=root, base=root / "base", adapter=root / "adapter", out=root / "out",
                           model=model, result=result)


@pytest.fixture(scope="module")
def stock(llama, exports, bert):
    """Logits (and a few weights) of every exported folder, computed by stock transformers in a
    fresh process that never imports bitsandbytes or qlora: one process for all, started in the
    background by the first test that asks for it; `.result()` -> (meta, tensors)."""
    inputs = llama.root / "inputs.safetensors"
    save_file({"input_ids": sample_ids()}, str(inputs))
    jobs = [{"name": "fp32", "folder": str(exports.fp32), "inputs": str(inputs)},
            {"name": "bf16", "folder": str(exports.bf16), "inputs": str(inputs)},
            {"name": "sharded", "folder": str(exports.sharded), "inputs": str(inputs)},
            {"name": "bert", "folder": str(bert.out), "inputs": str(inputs),
             "weights": ["classifier.weight", "classifier.bias"]}]
    loader = StockLoader(jobs, llama.root)
    loader.ids = sample_ids()
    yield loader
    loader.close()


# ------------------------------------------------------------------------------------------- tests

def test_merged_weight_is_dequant_quant_plus_update(llama, exports, stock):
    """One layer checked by hand: W_merged = dequant(quant(W)) + s·B·A in fp32, then cast.
    (`stock` starts the stock-transformers process here, to run while the next tests do.)"""
    cfg = json.loads((llama.adapter / "adapter_config.json").read_text())
    q = json.loads((llama.adapter / "qlora_adapter.json").read_text())
    assert (q["quant_type"], q["blocksize"], q["double_quant"], q["quantized_from_dtype"]) == ("nf4", 64, True, "bfloat16")
    s = cfg["lora_alpha"] / cfg["r"]
    base, ad = base_tensors(llama.base), adapter_tensors(llama.adapter)
    out32, out16 = load_file(str(exports.fp32 / "model.safetensors")), load_file(str(exports.bf16 / "model.safetensors"))
    for path in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"):
        w = base[path + ".weight"]
        assert w.dtype == torch.bfloat16
        a, b = ad[path + ".lora_A.weight"].float(), ad[path + ".lora_B.weight"].float()
        seen = nf4_roundtrip(w).float()
        expected = seen + s * (b @ a)
        got = out32[path + ".weight"]
        assert got.dtype == torch.float32 and got.shape == w.shape
        if not torch.equal(got, expected):   # allowed: 1 ulp (an fp32 matmul summing in another order)
            ulp = torch.finfo(torch.float32).eps * expected.abs().clamp_min(torch.finfo(torch.float32).tiny)
            assert ((got - expected).abs() <= ulp).all(), f"{path}: more than 1 ulp off"
        assert torch.equal(out16[path + ".weight"], expected.to(torch.bfloat16)), path
        # it really is merged onto the dequantized weight, not onto W, and the update is not negligible
        assert not torch.equal(got, w.float() + s * (b @ a))
        assert (s * (b @ a)).norm() > 0.3 * (w.float() - seen).norm()
    # weights without an adapter are copied unchanged (just cast)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.0.input_layernorm.weight"):
        assert torch.equal(out32[key], base[key].float()), key
        assert torch.equal(out16[key], base[key]), key
    assert set(out32) == set(base) == set(out16)


def test_export_report_json(llama, exports):
    report = json.loads((exports.fp32 / "export_report.json").read_text())
    settings = json.loads((llama.adapter / "qlora_adapter.json").read_text())
    assert report["dtype"] == "float32" and report["merge_onto"] == "dequantized"
    assert sorted(l["name"] for l in report["layers"]) == sorted(settings["quantized_modules"])
    base, ad = base_tensors(llama.base), adapter_tensors(llama.adapter)
    for layer in report["layers"]:
        assert {"name", "update_norm", "quant_error_norm", "ratio"} <= set(layer)
        assert layer["update_norm"] > 0 and layer["quant_error_norm"] > 0
        assert math.isclose(layer["ratio"], layer["quant_error_norm"] / layer["update_norm"], rel_tol=1e-9)
    one = next(l for l in report["layers"] if l["name"] == "model.layers.0.mlp.up_proj")
    w = base["model.layers.0.mlp.up_proj.weight"]
    a, b = ad["model.layers.0.mlp.up_proj.lora_A.weight"].float(), ad["model.layers.0.mlp.up_proj.lora_B.weight"].float()
    assert math.isclose(one["update_norm"], (2.0 * (b @ a)).norm().item(), rel_tol=1e-5)
    assert math.isclose(one["quant_error_norm"], (w.float() - nf4_roundtrip(w).float()).norm().item(), rel_tol=1e-5)
    v = report["verification"]
    assert v["passed"] is True
    assert {"max_abs_error", "relative_error", "top1_agreement_pct"} <= set(v["vs_reference"])
    assert v["thresholds"] == {"relative_error": 1e-4, "top1_agreement_pct": 100.0}
    assert {"relative_error", "top1_agreement_pct"} <= set(v["vs_live_qlora"])


def test_export_merged_equals_export_adapter(llama, exports):
    """From the in-memory QLoRA model: the same tensors as from the files (all-linear adapter)."""
    from qlora.export.from_model import export_merged
    for dtype, from_files in (("float32", exports.fp32), ("bfloat16", exports.bf16)):
        out = llama.root / f"merged-{dtype}"
        result = export_merged(llama.model, out, dtype=dtype, verify=dtype == "float32", progress=False)
        assert len(result.layers) == 14
        # the unquantized W is not in memory: its NF4 error is reported as unknown, never as 0
        assert all(l.quant_error_norm is None and l.ratio is None for l in result.layers)
        from qlora.export import summary
        assert "NF4 error unknown" in summary(result) and "worst 0" not in summary(result)
        if dtype == "float32":       # its own check: against the live model's dequantized weights + adapters
            assert result.verification["passed"], result.verification
        got, want = load_file(str(out / "model.safetensors")), load_file(str(from_files / "model.safetensors"))
        assert set(got) == set(want)
        different = [k for k in want if not torch.equal(got[k], want[k])]
        assert different == [], different
        assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_export_merged_vs_adapter_partial_targets(llama):
    """With adapters on q_proj/v_proj only, the other Linear layers were 4-bit in training but carry
    no adapter. The model that trained used dequant(quant(W)) for them, so both exports write exactly
    that: the adapter config lists every 4-bit module, adapted or not."""
    from qlora.export import export_adapter, export_merged
    root = llama.root / "partial"
    model = train_qlora_adapter(llama.base, root / "adapter", target=["q_proj", "v_proj"])
    export_adapter(llama.base, root / "adapter", root / "files", dtype="float32", verify=False, progress=False)
    export_merged(model, root / "memory", dtype="float32", verify=False, progress=False)
    files, memory = load_file(str(root / "files/model.safetensors")), load_file(str(root / "memory/model.safetensors"))
    assert set(files) == set(memory)
    adapted = {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    four_bit_unadapted = {k for k in files if k.endswith("_proj.weight")} - adapted
    different = {k for k in files if not torch.equal(files[k], memory[k])}
    assert different == set(), different
    base = load_file(str(Path(llama.base) / "model.safetensors"))
    # and those layers really are the dequantized ones, not the original W
    assert all(not torch.equal(files[k], base[k].float()) for k in four_bit_unadapted)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_export_maps_one_input_shard_at_a_time(llama, exports, tmp_path, monkeypatch):
    """safetensors memory-maps what it reads and the pages stay in RSS while the file is open: with
    every input shard held open, RSS grew to the model's size. At each write at most the shard of
    the tensor being written may be mapped. (The sharded fp32 export serves as a multi-file base.)"""
    from qlora.export import writer as shard_writer
    from qlora.export.from_files import export_adapter
    shards = sorted(str(p) for p in exports.sharded.glob("*.safetensors"))
    assert len(shards) >= 3
    mapped_counts, streamed = [], []
    write, write_stream = shard_writer.ShardedWriter.write, shard_writer.ShardedWriter.write_stream

    def count():
        maps = Path("/proc/self/maps").read_text()
        mapped_counts.append(sum(s in maps for s in shards))

    def write_and_count(self, name, tensor):
        count()
        return write(self, name, tensor)

    def write_stream_and_count(self, name, pieces):
        count()
        streamed.append(name)
        return write_stream(self, name, pieces)

    monkeypatch.setattr(shard_writer.ShardedWriter, "write", write_and_count)
    monkeypatch.setattr(shard_writer.ShardedWriter, "write_stream", write_stream_and_count)
    export_adapter(exports.sharded, llama.adapter, tmp_path / "out", dtype="float32", verify=False, progress=False)
    assert len(mapped_counts) == len(load_file(str(exports.fp32 / "model.safetensors")))
    assert max(mapped_counts) <= 1, mapped_counts
    # tensors copied through unchanged (embeddings, norms, the head) are streamed in pieces
    assert "model.embed_tokens.weight" in streamed and "model.norm.weight" in streamed
    assert not any(".self_attn." in n and n.endswith("proj.weight") for n in streamed)   # merged ones are not


def test_checkpoint_key_ending_like_an_adapted_module(llama, exports, tmp_path):
    """A tensor named like an adapted weight plus a prefix without a dot ("audio_model.layers.0..."
    next to "model.layers.0...") must not be taken for it, by the merge or by the verification."""
    from qlora.export.from_files import export_adapter
    base = tmp_path / "base"
    shutil.copytree(llama.base, base)
    tensors = load_file(str(base / "model.safetensors"))
    decoy = "audio_model.layers.0.mlp.up_proj.weight"          # sorts before "model."
    tensors[decoy] = torch.zeros_like(tensors["model.layers.0.mlp.up_proj.weight"])
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    result = export_adapter(base, llama.adapter, tmp_path / "out", dtype="float32", verify_live=False, progress=False)
    assert result.verification["passed"], result.verification["vs_reference"]
    got, want = load_file(str(tmp_path / "out/model.safetensors")), load_file(str(exports.fp32 / "model.safetensors"))
    assert torch.equal(got[decoy], tensors[decoy].float())
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_refuses_adapter_from_another_model_size(llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.export.from_files import export_adapter
    other = LlamaForCausalLM(LlamaConfig(**{**LLAMA, "hidden_size": 32, "intermediate_size": 64}))
    qlora.add_lora(other, qlora.LoraConfig(r=4, target_modules="all-linear"))
    qlora.save_adapter(other, tmp_path / "adapter")
    before = snapshot(llama.base, tmp_path / "adapter")
    with pytest.raises(QLoRAError, match="shape.*another model size"):
        export_adapter(llama.base, tmp_path / "adapter", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]       # no out, no staging folder
    assert snapshot(llama.base, tmp_path / "adapter") == before


@pytest.mark.parametrize("rename", [("self_attn.q_proj", "self_attn.qq_proj"), ("model.layers.", "transformer.h.")])
def test_refuses_adapter_modules_missing_from_base(llama, tmp_path, rename):
    """Some (q_proj -> qq_proj) or all (another naming scheme) adapter modules don't exist in the base."""
    from qlora.export.from_files import export_adapter
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(llama.adapter / "adapter_config.json", adapter)
    tensors = load_file(str(llama.adapter / "adapter_model.safetensors"))
    save_file({k.replace(*rename): v for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(QLoRAError, match="no weight|another model"):
        export_adapter(llama.base, adapter, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_refuses_existing_out_untouched(llama, tmp_path):
    from qlora.export.from_files import export_adapter
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    with pytest.raises(QLoRAError, match="--force"):
        export_adapter(llama.base, llama.adapter, out, progress=False)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILLABLE_EXPORT = textwrap.dedent('''
    import sys, time
    import qlora.export.writer as sw
    write = sw.ShardedWriter.write
    def slow_write(self, name, tensor):      # a slow disk: 0.2 s per tensor
        time.sleep(0.2)
        write(self, name, tensor)
        self._fh.flush()
    sw.ShardedWriter.write = slow_write
    from qlora.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def test_killed_export_leaves_no_out_and_next_export_cleans_up(llama, tmp_path, capsys):
    from qlora import cli
    out = tmp_path / "out"
    before = snapshot(llama.base, llama.adapter)
    args = ["export", "--base", str(llama.base), "--adapter", str(llama.adapter), "--out", str(out),
            "--dtype", "float32"]
    proc = subprocess.Popen([PY, "-c", KILLABLE_EXPORT, *args, "--no-verify"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    staging = tmp_path / f".out.tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            shards = list(staging.glob("*.safetensors")) if staging.is_dir() else []
            if shards and shards[0].stat().st_size > 8:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the export ended before it could be killed: {proc.communicate()}"
        written = shards[0].stat().st_size
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()                  # reaps it: the pid is dead, not a zombie
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert staging.is_dir()                 # killed half way: its staging folder is left behind
    assert snapshot(llama.base, llama.adapter) == before
    print(f"\n  killed with {written} bytes of {shards[0].name} written")

    # the next export succeeds (CLI, in process) and removes the dead export's staging folder
    assert cli.main([*args, "--no-verify"]) == 0
    printed = capsys.readouterr()
    assert "exported 14 merged layers" in printed.out
    assert f"removed {staging}" in printed.err and f"left by process {proc.pid}" in printed.err   # and says so
    assert not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(load_file(str(out / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"],
                       load_file(str(llama.root / "out-float32/model.safetensors"))["model.layers.0.mlp.up_proj.weight"])


def test_cli_export_and_existing_out(llama, tmp_path, capsys):
    from qlora import cli
    out = tmp_path / "out"
    args = ["export", "--base", str(llama.base), "--adapter", str(llama.adapter), "--out", str(out),
            "--dtype", "float32"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "PASS" in printed and "vs unmerged reference" in printed and "vs live QLoRA" in printed
    assert (out / "config.json").is_file() and (out / "export_report.json").is_file()
    before = snapshot(out)
    # the installed entry point, in its own process: exit 2, one line naming --force, no traceback
    proc = subprocess.run([str(QLORA_BIN), *args], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("qlora export: error:") and "--force" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert snapshot(out) == before
    # --force replaces it
    assert cli.main([*args, "--force", "--no-verify"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_roundtrip_stock_transformers_llama(llama, exports, stock):
    """The exported folders load in stock transformers (no bitsandbytes, no qlora in that process)
    and match the unmerged reference built here."""
    from transformers import LlamaForCausalLM
    meta, tensors = stock.result()
    assert meta["imported_banned"] == []
    assert meta["fp32"] == {"class": "LlamaForCausalLM", "dtype": "torch.float32", "num_labels": 2}
    assert meta["bf16"]["dtype"] == "torch.bfloat16"
    figures = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ref, without = reference_logits(llama.base, llama.adapter, stock.ids, dtype, LlamaForCausalLM)
        got = tensors[f"{name}/logits"]
        figures[name] = compare(got, ref)
        figures[name + " (reference without adapter)"] = compare(without, ref)
    for k, (rel, agree) in figures.items():
        print(f"\n  export {k}: relative logit error vs unmerged reference {rel:.3g}, top-1 agreement {agree:.1f}%")
    print(f"  export time (incl. verification): fp32 {exports.seconds['float32']:.2f} s, "
          f"bf16 {exports.seconds['bfloat16']:.2f} s")
    rel32, agree32 = figures["fp32"]
    assert rel32 <= 1e-4 and agree32 == 100.0
    rel16, agree16 = figures["bf16"]
    assert rel16 < 3e-2
    # the adapter changes the outputs far beyond these errors: the comparison can tell
    assert figures["fp32 (reference without adapter)"][0] > 100 * max(rel32, 1e-7)
    # the export's own verification agrees with ours
    v = exports.results["float32"].verification
    assert v["passed"] and v["vs_reference"]["relative_error"] <= 1e-4
    assert exports.results["bfloat16"].verification["vs_reference"]["relative_error"] < 3e-2


def test_bert_classifier_from_bertmodel_base(bert, stock):
    """Base keys lack the "bert." prefix; the export is a BertForSequenceClassification with the
    trained classifier, matching the unmerged reference."""
    from transformers import BertForSequenceClassification
    meta, tensors = stock.result()
    base_keys = set(base_tensors(bert.base))
    assert not any(k.startswith("bert.") for k in base_keys) and not any("classifier" in k for k in base_keys)
    out_keys = set(base_tensors(bert.out))
    assert {"classifier.weight", "classifier.bias"} <= out_keys
    assert all(k.startswith("bert.") or k.startswith("classifier.") for k in out_keys)
    config = json.loads((bert.out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 3
    assert meta["bert"]["class"] == "BertForSequenceClassification" and meta["bert"]["num_labels"] == 3
    ad = adapter_tensors(bert.adapter)
    for key in ("classifier.weight", "classifier.bias"):
        assert torch.equal(tensors["bert/" + key], ad[key].float())
        assert not torch.equal(ad[key].float(), torch.zeros_like(ad[key].float()))
    ref, without = reference_logits(bert.base, bert.adapter, stock.ids, torch.float32, BertForSequenceClassification,
                                    num_labels=3)
    rel, agree = compare(tensors["bert/logits"], ref)
    print(f"\n  BERT classifier fp32 export vs reference: relative {rel:.3g}, top-1 agreement {agree:.1f}%")
    assert rel <= 1e-4 and agree == 100.0
    assert bert.result.verification["passed"]


def test_sharded_output_loads(exports, stock):
    meta, tensors = stock.result()
    index = json.loads((exports.sharded / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and not (exports.sharded / "model.safetensors").exists()
    assert sorted(p.name for p in exports.sharded.glob("*.safetensors")) == shards
    single = load_file(str(exports.fp32 / "model.safetensors"))
    assert set(index["weight_map"]) == set(single)
    for shard in shards:
        assert (exports.sharded / shard).stat().st_size <= 100_000 + 4096 or \
            len([k for k, v in index["weight_map"].items() if v == shard]) == 1
        for key, value in load_file(str(exports.sharded / shard)).items():
            assert index["weight_map"][key] == shard and torch.equal(value, single[key]), key
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in single.values())
    assert torch.equal(tensors["sharded/logits"], tensors["fp32/logits"])


# ------------------------------------------------------------------------------------------- real model

@pytest.mark.slow
def test_smollm2_export(tmp_path):
    """Real SmolLM2-135M: QLoRA load, all-linear r=8 adapter with random B, export fp32 and bf16."""
    from transformers import AutoModelForCausalLM

    from qlora.bundled import smollm2_path
    from qlora.export import export_adapter, summary
    base = Path(smollm2_path())
    train_qlora_adapter(base, tmp_path / "adapter", r=8, alpha=16, std=4e-3)
    figures = {}
    for dtype in ("float32", "bfloat16"):
        t0 = time.perf_counter()
        result = export_adapter(base, tmp_path / "adapter", tmp_path / dtype, dtype=dtype, progress=False)
        seconds = time.perf_counter() - t0
        print(f"\n--- SmolLM2-135M {dtype} export: {seconds:.1f} s (with verification)\n{summary(result)}")
        figures[dtype] = result.verification
    v32 = figures["float32"]
    assert v32["passed"] and v32["vs_reference"]["relative_error"] <= 1e-4
    assert v32["vs_reference"]["top1_agreement_pct"] == 100.0
    assert figures["bfloat16"]["vs_reference"]["relative_error"] < 3e-2
    for dtype, v in figures.items():
        live = v["vs_live_qlora"]
        print(f"  {dtype}: vs live QLoRA relative {live['relative_error']:.3g}, "
              f"top-1 agreement {live['top1_agreement_pct']:.1f}%")
    # independently: the fp32 export loaded by plain transformers vs our own unmerged reference
    ids = sample_ids(n=2, seq=24, vocab=49152)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "float32", dtype="auto").eval()(input_ids=ids).logits.float()
    ref, without = reference_logits(base, tmp_path / "adapter", ids, torch.float32, AutoModelForCausalLM)
    rel, agree = compare(got, ref)
    print(f"  fp32 export vs our reference: relative {rel:.3g}, top-1 {agree:.1f}%; "
          f"the adapter moves the logits by {compare(without, ref)[0]:.3g} (relative)")
    assert rel <= 1e-4 and agree == 100.0


@pytest.mark.parametrize("shape, dtype, double_quant, quant_type, blocksize", [
    ((256, 512), torch.bfloat16, True, "nf4", 64),
    ((300, 77), torch.float32, True, "fp4", 64),        # a partial last block
    ((1000, 333), torch.float16, False, "nf4", 128),
    ((512, 512), torch.bfloat16, True, "nf4", 256),
])
@pytest.mark.parametrize("chunk", [1 << 20, 4096, 448])
def test_chunked_roundtrip_equals_bitsandbytes_whole_tensor(shape, dtype, double_quant, quant_type, blocksize, chunk):
    import bitsandbytes.functional as bnbf

    from qlora.export.from_files import roundtrip_4bit
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    q, state = bnbf.quantize_4bit(w.to(dtype), blocksize=blocksize, compress_statistics=double_quant,
                                  quant_type=quant_type)
    expected = bnbf.dequantize_4bit(q, state).float()
    settings = {"quantized_from_dtype": str(dtype).removeprefix("torch."), "blocksize": blocksize,
                "double_quant": double_quant, "quant_type": quant_type}
    assert torch.equal(roundtrip_4bit(w, settings, chunk_elements=chunk), expected)


@pytest.mark.parametrize("piece_bytes", [2, 6, 1000, 1 << 20])
def test_stream_tensor_pieces_rebuild_the_tensor(tmp_path, piece_bytes):
    from qlora.errors import QLoRAError
    from qlora.export.checkpoint import stream_tensor as _stream_tensor
    tensors = {"a": torch.randn(37, 11).to(torch.bfloat16), "ids": torch.arange(50, dtype=torch.int64),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    for key, out_dtype in (("a", torch.float32), ("a", torch.bfloat16), ("ids", torch.int64), ("empty", torch.float16)):
        pieces = list(_stream_tensor(tmp_path / "m.safetensors", key, out_dtype, piece_bytes=piece_bytes))
        got = torch.cat(pieces) if pieces else torch.empty(0, dtype=out_dtype)
        want = tensors[key].reshape(-1)
        assert got.dtype == (out_dtype if want.is_floating_point() else want.dtype)
        assert torch.equal(got, want.to(got.dtype))
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])          # truncated inside the last tensor
    last = max(tensors, key=lambda k: json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])[k]["data_offsets"][1]
               if k in json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]) else -1)
    with pytest.raises(QLoRAError, match="truncated"):
        list(_stream_tensor(tmp_path / "cut.safetensors", last, torch.float32, piece_bytes=piece_bytes))


def test_an_image_text_models_export_is_verified(tmp_path):
    """Gemma 3 (image-text: its config nests the language model's, so it has no vocab_size of its own): the
    merged export's check feeds text ids from the text config and passes (it raised AttributeError)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gemma3", text_config=dict(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=7), mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=297, eoi_token_index=298)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    qlora.add_lora(model, qlora.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    result = qlora.export_merged(model.eval(), tmp_path / "out", dtype="float32", progress=False)
    assert result.verification["passed"] and result.verification["vs_reference"]["relative_error"] < 1e-4
