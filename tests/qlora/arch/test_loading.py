"""qlora.arch.loading: one line of ours instead of transformers' load report, for 4-bit and float loads.

    .venv/bin/python -m pytest -q tests/qlora/arch/test_loading.py      (~10 s)
"""
from __future__ import annotations

import pytest
import torch

from qlora.arch.loading import from_pretrained_quietly


@pytest.fixture
def bert_base(tmp_path):
    """A BertModel checkpoint (no classifier): loading it for classification adds a new head."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def test_plain_transformers_prints_the_report(bert_base, caplog):
    """What is being replaced (so the tests below can fail): transformers' multi-line table."""
    from transformers import BertForSequenceClassification
    BertForSequenceClassification.from_pretrained(bert_base, num_labels=3)
    assert "LOAD REPORT" in caplog.text and "MISSING" in caplog.text


def test_float_load_says_one_line(bert_base, capsys, caplog):
    from transformers import BertForSequenceClassification
    model = from_pretrained_quietly(BertForSequenceClassification, bert_base, num_labels=3)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "new head classifier: 3 labels, initialised"
    assert "LOAD REPORT" not in caplog.text and "not sharded" not in caplog.text and not caplog.records
    assert model.classifier.out_features == 3


def test_load_4bit_says_one_line(bert_base, capsys, caplog):
    from transformers import AutoModelForSequenceClassification

    import qlora
    from qlora.arch.quantized import is_4bit
    model = qlora.load_4bit(str(bert_base), AutoModelForSequenceClassification, num_labels=2,
                            compute_dtype=torch.float32)
    assert "new head classifier: 2 labels, initialised" in capsys.readouterr().out
    assert "LOAD REPORT" not in caplog.text and "MISSING" not in caplog.text
    assert any(is_4bit(m) for m in model.modules())


def test_unused_checkpoint_weights_get_a_note(tmp_path, caplog):
    """A checkpoint with a module the class does not have: named in one line (a real surprise)."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(tmp_path / "m")
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    weights["extra.proj.weight"] = torch.zeros(2, 2)
    save_file(weights, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    lines = []
    from_pretrained_quietly(BertModel, tmp_path / "m", log=lines.append)
    assert len(lines) == 1 and "unused" in lines[0] and "extra.proj" in lines[0], lines
    assert "LOAD REPORT" not in caplog.text
