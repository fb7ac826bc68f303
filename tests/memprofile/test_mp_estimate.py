"""memprofile.estimate against memprofile.measure: a CPU sweep over architectures, batches,
sequence lengths and all six configurations; every category within 10% on every row."""
import time

import pytest
import torch

from memprofile.estimate import CONFIGURATIONS, estimate, plan, quantized_bytes
from memprofile.layout import layout
from memprofile.measure import measure_step
from memprofile.report import markdown_table, make_row
from memprofile.tensors import CATEGORIES
from mp_models import configure, tiny_config, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")

TOLERANCE = 0.10
# (arch, batches, seqs): for ViT, seq is the image side in pixels (patch 8: 17 and 65 tokens)
SWEEP = [("llama", (1, 4), (16, 64)), ("bert", (1, 4), (16, 64)), ("vit", (1, 4), (32, 64)),
         ("gpt2", (2,), (32,))]


def _sweep_rows():
    rows, errors = [], []
    for arch, batches, seqs in SWEEP:
        for seq in seqs:
            for conf in CONFIGURATIONS:
                model, config, make_batch = tiny_model(arch, layers=2, image_size=seq if arch == "vit" else 32)
                configure(model, conf, arch)
                for b in batches:
                    measured = measure_step(model, make_batch(b, seq), timed_steps=0)
                    predicted = estimate(config, conf, b, seq, rank=8, device="cpu", cpu_threads=1)
                    rows.append(make_row(conf, b, seq, 8, measured, predicted))
                    rows[-1]["arch"] = arch
                    m, p = measured.bytes(), predicted.bytes()
                    err = {k: (p[k] - m[k]) / m[k] if m[k] else float(p[k] != 0) for k in CATEGORIES}
                    errors.append((arch, conf, b, seq, err, predicted.peak_at))
    return rows, errors


def test_estimate_is_within_10_percent_of_measurement_on_every_row(capsys):
    rows, errors = _sweep_rows()
    worst = max(errors, key=lambda e: max(abs(v) for v in e[4].values()))
    with capsys.disabled():
        print("\narch   config       b   seq  " + "  ".join(f"{k[:12]:>12s}" for k in CATEGORIES))
        for arch, conf, b, seq, err, where in errors:
            print(f"{arch:6s} {conf:11s} {b:2d} {seq:4d}  "
                  + "  ".join(f"{v * 100:+11.2f}%" for v in err.values()) + f"   peak at {where}")
        print(f"worst: {worst[0]} {worst[1]} b={worst[2]} seq={worst[3]}: "
              f"{max(abs(v) for v in worst[4].values()) * 100:.2f}%")
    bad = [e for e in errors if any(abs(v) > TOLERANCE for v in e[4].values())]
    assert not bad, bad
    assert len(rows) == 3 * 2 * 2 * 6 + 6
    assert "| qlora-ckpt |" in markdown_table(rows)


def test_one_layer_build_replicates_to_the_full_model():
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", layers=3)
    lay = layout(config, dtype=torch.bfloat16)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    named = dict(full.named_parameters())
    assert {n for n, i in lay.params.items() if i.canonical == n} == set(named)
    assert all(lay.params[n].shape == tuple(p.shape) for n, p in named.items())
    assert lay.buffer_bytes == sum(b.numel() * b.element_size() for b in full.buffers())
    assert set(lay.linears) == {n for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}


def test_tied_head_and_configuration_conventions():
    cfg = tiny_config("gpt2")  # lm_head is tied to wte
    head = estimate(cfg, "head", 2, 16, device="cpu")
    lay = layout(cfg)
    wte = lay.params["transformer.wte.weight"]
    assert head.weights_trainable == wte.numel * 2  # training the tied head trains the embedding
    lora = estimate(cfg, "lora", 2, 16, rank=4, device="cpu")
    adapters = sum(4 * (li.fin + li.fout) for n, li in lay.linears.items() if n != "lm_head")
    assert lora.trainable_params == adapters
    q = estimate(cfg, "qlora", 2, 16, rank=4, device="cpu")
    assert q.weights_quantized == sum(quantized_bytes(li.fin * li.fout)
                                      for n, li in lay.linears.items() if n != "lm_head")
    with pytest.raises(ValueError):
        estimate(cfg, "dora", 2, 16)


def test_plan_answers_for_llama3_8b_in_seconds():
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
           "vocab_size": 128256, "max_position_embeddings": 8192}
    estimate(cfg, "qlora", 1, 128, device="cuda")  # first call builds the (one-block) meta model
    t0 = time.perf_counter()
    result = plan(cfg, 24 * 2**30, seq=2048, device="cuda")
    seconds = time.perf_counter() - t0
    assert seconds < 5, seconds
    e = result["qlora-ckpt"]["estimate"]
    assert 8.0e9 < e.total_params < 8.1e9
    assert result["full"]["batch"] == 0  # 8B full fine-tuning in bf16 + AdamW: ~60 GiB of state
    assert result["qlora-ckpt"]["batch"] >= result["qlora"]["batch"] >= 1
    assert result["qlora-ckpt"]["batch"] >= result["lora-ckpt"]["batch"]
    assert result["qlora-ckpt"]["peak"] <= 24 * 2**30
    nxt = estimate(cfg, "qlora-ckpt", result["qlora-ckpt"]["batch"] + 1, 2048, device="cuda")
    assert nxt.peak > 24 * 2**30
