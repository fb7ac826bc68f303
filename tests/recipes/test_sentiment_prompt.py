"""Tests of the causal LM SFT recipe (recipes/sentiment_prompt.py, recipes/configs/sentiment_prompt.yaml).

    .venv/bin/python -m pytest tests/recipes/test_sentiment_prompt.py -s            # default suite (~35 s)
    .venv/bin/python -m pytest tests/recipes/test_sentiment_prompt.py -s -m slow    # real SmolLM2-135M (several minutes on CPU)

Default suite: the recipe's real code path (`qlora train recipes/configs/sentiment_prompt.yaml`, through
qlora.cli.run_recipe) with mode=all on a tiny random 2-layer LlamaForCausalLM with tied embeddings
(like SmolLM2), saved to a temp folder with the bundled MiniLM tokenizer's files copied in (a
generic tokenizer that needs no download), on 16 real Rotten Tomatoes snippets. Checked against
numbers computed here from the model config: each mode's trainable and total parameter counts
(all-linear LoRA: r·(in+out) per Linear, lm_head excluded; head mode = the tied embedding), the
prompt/answer label masking, and that the qlora mode ends with a merged export that loads with
stock transformers. The slow test runs the default config on the real SmolLM2 at small sizes.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "recipes/configs/sentiment_prompt.yaml"
H, I, L, HEADS, KV, R = 32, 64, 2, 4, 2, 4          # hidden, intermediate, layers, heads, KV heads, LoRA rank
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def tiny_lm_folder(tmp_path) -> Path:
    """A random tied-embedding Llama (vocab = MiniLM's 30,522) + MiniLM's tokenizer, saved as bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.bundled import minilm_path
    folder = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                         num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        if (Path(minilm_path()) / name).is_file():
            shutil.copy(Path(minilm_path()) / name, folder / name)
    return folder


def expected_counts(vocab: int) -> dict:
    """(trainable, total) per mode of the tiny tied Llama (no biases)."""
    kv_out = KV * (H // HEADS)
    layer = 2 * H * H + 2 * H * kv_out + 3 * H * I + 2 * H          # q, o + k, v + gate, up, down + 2 RMSNorms
    base = vocab * H + L * layer + H                                    # tied embedding/lm_head counted once
    lora = L * (2 * R * (H + H) + 2 * R * (H + kv_out) + 2 * R * (H + I) + R * (I + H))
    return {"full": (base, base), "head": (vocab * H, base), "lora": (lora, base + lora),
            "qlora": (lora, base + lora)}


def test_causal_lm_recipe_tiny_all_modes(tmp_path, tiny_lm_folder):
    from transformers import AutoModelForCausalLM

    from qlora.cli import run_recipe
    out = tmp_path / "run"
    rows = run_recipe(str(CONFIG), [f"model={tiny_lm_folder}", f"out_dir={out}", "mode=all", "train_size=16",
                                    "test_size=8", "max_length=32", "train.epochs=1", "train.batch_size=8",
                                    "train.progress=false", f"lora.r={R}", "export_dtype=float32"])
    table = json.loads((out / "table.json").read_text())["rows"]
    assert [r["mode"] for r in table] == ["full", "head", "lora", "qlora"] == [r["mode"] for r in rows]
    want = expected_counts(30522)
    for r in table:
        assert (r["trainable_params"], r["total_params"]) == want[r["mode"]], r["mode"]
        m = r["metrics"]
        assert r["steps"] == 2 and m["accuracy"] in {k / 8 for k in range(9)}          # 8 test snippets
        assert m["greedy_accuracy"] in {k / 8 for k in range(9)}
        assert m["eval_loss"] > 0 and torch.isfinite(torch.tensor(m["eval_loss"]))

    adapter = json.loads((out / "qlora" / "adapter" / "adapter_config.json").read_text())
    facts = json.loads((out / "qlora" / "adapter" / "qlora_adapter.json").read_text())
    assert len(facts["quantized_modules"]) == 7 * L and adapter["task_type"] == "CAUSAL_LM"
    assert not any("lm_head" in m for m in facts["quantized_modules"])

    # the qlora mode ended with the merged export: a plain folder that stock transformers loads
    merged = out / "qlora" / "merged"
    assert (merged / "config.json").is_file() and (merged / "export_report.json").is_file()
    assert not (out / "lora" / "merged").exists()
    report = json.loads((merged / "export_report.json").read_text())
    assert report["verification"]["passed"], report["verification"]
    plain = AutoModelForCausalLM.from_pretrained(str(merged))
    assert sum(p.numel() for p in plain.parameters()) == want["full"][1]
    from transformers import AutoTokenizer  # the tokenizer travels with the export
    assert AutoTokenizer.from_pretrained(str(merged))("a fine film")["input_ids"] == \
        AutoTokenizer.from_pretrained(str(tiny_lm_folder))("a fine film")["input_ids"]


def test_prompt_masking(tiny_lm_folder):
    """Labels are -100 on the prompt and equal the answer tokens (+ EOS where there is one) after it;
    a long review is truncated, never the answer or the "\\nSentiment:" tail."""
    import importlib

    from transformers import AutoTokenizer

    from qlora.util.configs import load_config
    ns = vars(importlib.import_module("qlora_recipes.sentiment_prompt"))
    cfg = load_config(CONFIG, ["max_length=24"], ns["SentimentPromptConfig"])
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lm_folder))
    encode = ns["PromptEncoder"](tokenizer, cfg)
    fresh = tokenizer(" fresh", add_special_tokens=False)["input_ids"]
    tail = tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
    ids, labels = encode("a warm , funny film", 1)
    n = len(ids) - len(fresh)
    assert labels == [-100] * n + fresh and ids[n:] == fresh and ids[n - len(tail):n] == tail
    ids, labels = encode("word " * 200, 0)
    rotten = tokenizer(" rotten", add_special_tokens=False)["input_ids"]
    assert len(ids) == 24 and ids[-len(rotten):] == rotten and ids[-len(rotten) - len(tail):-len(rotten)] == tail

    smol = ns["SentimentPromptConfig"](answers=[" fresh", " fresh!"])
    with pytest.raises(Exception, match="same token"):
        ns["PromptEncoder"](tokenizer, smol)


@pytest.mark.slow
def test_causal_lm_recipe_real_smollm2(tmp_path):
    """The default config (mode=qlora) on the real SmolLM2-135M at small sizes (4 steps of 8): the exact
    adapter size, a finite answer loss, and a merged export that passes its verification."""
    from qlora.bundled import smollm2_path
    from qlora.cli import run_recipe
    smollm2_path()
    out = tmp_path / "run"
    # an fp32 export: its check against the unmerged reference is strict (relative error <= 1e-4, 100% top-1);
    # the default bf16 export's check (<= 5e-2, >= 95% top-1 on ~60 tokens) can miss by one token
    rows = run_recipe(str(CONFIG), [f"out_dir={out}", "train_size=32", "test_size=32", "train.progress=false",
                                    "export_dtype=float32"])
    assert [r["mode"] for r in rows] == ["qlora"]
    r = rows[0]
    # 30 layers x r=8 x (q 576+576, k/v 576+192 each, o 576+576, gate/up 576+1536 each, down 1536+576)
    assert r["trainable_params"] == 30 * 8 * (2 * 1152 + 2 * 768 + 3 * 2112) == 2_442_240
    assert 0 < r["metrics"]["eval_loss"] < float("inf") and r["accuracy"] in {k / 32 for k in range(33)}
    report = json.loads((out / "qlora" / "merged" / "export_report.json").read_text())
    assert report["verification"]["passed"]
