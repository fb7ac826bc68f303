"""Tests of the SFT recipe (recipes/sft.py): config overrides, end to end, the CLI.

    .venv/bin/python -m pytest -q tests/recipes/test_sft.py

End to end: `qlora train recipes/configs/sft.yaml` on a tiny random Llama with SmolLM2's tokenizer, from a JSONL;
PEFT loads the adapter with the same logits. The data loader is tested in tests/qlora/data/test_sft.py.
"""
import json
from pathlib import Path

import pytest
import torch

from qlora.errors import QLoRAError
from tests.qlora.data.test_sft import write

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "recipes/configs/sft.yaml"
CHAT = [{"role": "user", "content": "What does 'cat' mean?"}, {"role": "assistant", "content": "A small feline."},
        {"role": "user", "content": "And 'dog'?"}, {"role": "assistant", "content": "A domestic canine."}]

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------- config overrides (issue 13's recipe side)

def test_override_strings_taken_as_typed_and_bad_values_named():
    from qlora.util.configs import load_config
    from qlora_recipes.sft import SFTConfig
    cfg = load_config(CONFIG, ["data=Q: {text} A:", "eval_data=null", "train.lr=3e-4"], SFTConfig)
    assert cfg.data == "Q: {text} A:" and cfg.eval_data is None and cfg.train.lr == 3e-4
    with pytest.raises(QLoRAError, match=r"override max_length='\[1, 2': YAML cannot read the value .*quote it"):
        load_config(CONFIG, ["max_length=[1, 2"], SFTConfig)
    with pytest.raises(QLoRAError, match="override train.lr='{a: 1}': YAML reads this as a mapping"):
        load_config(CONFIG, ["train.lr={a: 1}"], SFTConfig)
    with pytest.raises(QLoRAError, match="mode='head'; allowed: qlora, lora, full"):
        load_config(CONFIG, ["mode=head"], SFTConfig)


# ---------------------------------------------------------------- end to end

@pytest.mark.parametrize("packing", [False, True])
def test_sft_end_to_end_adapter_loads_in_peft(tmp_path, tiny_chat_model, packing):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora.cli import main
    data = write(tmp_path / "chats.jsonl", [{"messages": CHAT[:2]}, {"messages": CHAT}] * 8)
    out = tmp_path / "run"
    code = main(["train", str(CONFIG), f"model={tiny_chat_model}", f"data={data}", f"out_dir={out}",
                 "eval_fraction=0.25", f"packing={str(packing).lower()}", "train.batch_size=2", "train.max_steps=3",
                 "train.progress=false", "samples=2", "max_new_tokens=4", "lora.r=4", "mode=lora", "export=true",
                 "export_dtype=float32"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_before"]["loss"] > 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[0] == {"step": 0, "eval_loss": summary["eval_before"]["loss"],
                         "eval_perplexity": summary["eval_before"]["perplexity"]}
    assert "gradient checkpointing on (non-reentrant), chunked loss (256 tokens), no fp32 up-casts" in summary["savers"]
    for name in ("metrics.jsonl", "curves.png", "samples.jsonl", "adapter/adapter_config.json", "merged/config.json"):
        assert (out / name).is_file(), name
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["eval"] for s in samples} == {0, 1} and samples[0]["reference"] in ("A small feline.", "A domestic canine.")

    # PEFT reads our adapter and gives the trained model's logits (trained model = merged export here)
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_chat_model), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = peft(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_chat_model), dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-6           # the adapter trained (B moved off zero)


def test_failed_export_verification_exits_1(tmp_path, tiny_chat_model, monkeypatch):
    from qlora.cli import main
    from qlora.export import verify as export_verify
    real = export_verify.verify_export

    def failing(*args, **kwargs):
        report = real(*args, **kwargs)
        return {**report, "passed": False}
    monkeypatch.setattr(export_verify, "verify_export", failing)
    data = write(tmp_path / "chats.jsonl", [{"messages": CHAT[:2]}] * 4)
    code = main(["train", str(CONFIG), f"model={tiny_chat_model}", f"data={data}", f"out_dir={tmp_path / 'run'}",
                 "eval_fraction=0", "train.max_steps=1", "train.progress=false", "mode=lora", "export=true"])
    assert code == 1


def test_recipes_found_by_name_and_listed(capsys):
    from qlora.cli import find_config, main, recipes_dir
    assert find_config("sft") == recipes_dir() / "configs" / "sft.yaml" == CONFIG
    assert main(["train", "--help"]) == 0
    assert "sft" in capsys.readouterr().out.replace("\n", " ")
    assert main(["train", "no_such_recipe"]) == 2
    assert "recipes: demo, dpo, grpo, image_cls, sentiment_prompt, seq_cls, sft, sft_images" in capsys.readouterr().err


def test_mlp_tiles_from_the_recipe_give_the_untiled_loss(tiny_chat_model):
    """mlp_tile= tiles every MLP (qlora.levers.tiled_mlp) and leaves the loss as it was; bad values are one line."""
    from qlora.levers.tiled_mlp import TiledMLP
    from qlora.util.configs import load_config
    from qlora_recipes.sft import SFTConfig, build_model
    with pytest.raises(QLoRAError, match="mlp_tile=-1: must be an integer >= 0"):
        load_config(CONFIG, ["mlp_tile=-1"], SFTConfig)
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for over in ([], ["mlp_tile=8", "mlp_tile_min_tokens=0"]):
        cfg = load_config(CONFIG, ["mode=lora", "lora.lora_dropout=0.0", *over], SFTConfig)
        torch.manual_seed(0)
        model = build_model(cfg, str(tiny_chat_model))
        tiled = [m for m in model.modules() if isinstance(m.__dict__.get("forward"), TiledMLP)]
        assert len(tiled) == (2 if over else 0)
        losses.append(model(input_ids=ids, labels=ids, use_cache=False).loss)
    assert "MLP in 8-token tiles above 0 tokens" in cfg.savers()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
