"""The recipes' GGUF export (export=true export_format=gguf, recipes/causal_lm.py): after training, the merged
folder and out_dir/model.gguf + model.Modelfile, verified; a K-quant without llama_cpp is refused before training.

    .venv/bin/python -m pytest -q tests/recipes/test_gguf_export.py
"""
import importlib.util
import json
from pathlib import Path

import pytest

from tests.qlora.data.test_sft import write

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "recipes/configs/sft.yaml"
CHAT = [{"role": "user", "content": "What does 'cat' mean?"}, {"role": "assistant", "content": "A small feline."}]

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sft_export_format_gguf(tmp_path, tiny_chat_model):
    from transformers import AutoModelForCausalLM

    from qlora.cli import main
    data = write(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 4)
    out = tmp_path / "run"
    code = main(["train", str(CONFIG), f"model={tiny_chat_model}", f"data={data}", f"out_dir={out}",
                 "eval_fraction=0", "train.max_steps=1", "train.progress=false", "mode=lora", "lora.r=4",
                 "export=true", "export_format=gguf", "export_dtype=f16"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    check = summary["export_gguf"]["verification"]
    assert check["passed"] is True and check["checks"]["transformers"]["relative_error"] < 1e-3
    assert (out / "model.Modelfile").read_text().startswith("# Ollama Modelfile")
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf")
    assert model.config.num_hidden_layers == 2


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama_cpp is installed here")
def test_k_quant_without_llama_cpp_refused_before_training(tmp_path, tiny_chat_model, capsys):
    from qlora.cli import main
    data = write(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 4)
    code = main(["train", str(CONFIG), f"model={tiny_chat_model}", f"data={data}", f"out_dir={tmp_path / 'run'}",
                 "export=true", "export_format=gguf", "export_dtype=q4_k_m"])
    assert code == 2 and "pip install llama-cpp-python" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
