"""`qlora train sft` end to end on model families the other tests don't train: GPT-2 (transformers'
Conv1D layers), Falcon (new decoder architecture, fused QKV) and OLMo 2 (norms after the blocks),
each a tiny random model over SmolLM2's vocabulary saved with SmolLM2's tokenizer.

    PYTHONPATH=$PWD python -m pytest -q tests/recipes/test_sft_families.py          # GPT-2, Falcon
    PYTHONPATH=$PWD python -m pytest -q -m slow tests/recipes/test_sft_families.py  # OLMo 2

The default recipe (mode qlora, every linear layer but lm_head 4-bit with LoRA, checkpointing,
chunked loss) trains 2 steps and exports; checked: every adapted layer is a 4-bit one, the export's
verification passed, the merged folder loads in stock transformers with the architecture's own
layer types, and PEFT loads the adapter onto the stock base.
"""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from tests.recipes.test_sft import CHAT, CONFIG, write

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB = dict(vocab_size=49152, pad_token_id=2, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "falcon": dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   new_decoder_architecture=True, num_kv_heads=2),
    "olmo2": dict(model_type="olmo2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}


def train_two_steps(config, folder, tokenizer_dir):
    """(the model folder: a random model of `config` with SmolLM2's tokenizer, the run folder of
    `qlora train sft` on it: 2 steps, r=4, exported in float32)."""
    from transformers import AutoModelForCausalLM

    from qlora.cli import main
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    for p in tokenizer_dir.iterdir():
        shutil.copy(p, folder / p.name)
    data = write(folder.parent / "chats.jsonl", [{"messages": CHAT[:2]}, {"messages": CHAT}] * 4)
    out = folder.parent / "run"
    code = main(["train", str(CONFIG), f"model={folder}", f"data={data}", f"out_dir={out}", "eval_fraction=0.25",
                 "train.batch_size=2", "train.max_steps=2", "train.progress=false", "samples=1", "max_new_tokens=2",
                 "lora.r=4", "export=true", "export_dtype=float32"])
    assert code == 0
    return folder, out


@pytest.mark.parametrize("family", [pytest.param("gpt2"), pytest.param("falcon"),
                                    pytest.param("olmo2", marks=pytest.mark.slow)])
def test_sft_trains_and_exports(family, tmp_path, smol_tok_dir):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, **VOCAB)
    folder, out = train_two_steps(config, tmp_path / family, smol_tok_dir)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    facts = json.loads((out / "adapter" / "qlora_adapter.json").read_text())
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        targets = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in f.keys()}
    assert targets and targets <= set(facts["quantized_modules"])          # qlora: every adapted layer was 4-bit
    report = json.loads((out / "merged" / "export_report.json").read_text())
    assert report["verification"]["passed"], report["verification"]
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    stock = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert [type(m).__name__ for m in merged.modules()] == [type(m).__name__ for m in stock.modules()]
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        plain, want = stock(input_ids=ids).logits, merged(input_ids=ids).logits
        peft = PeftModel.from_pretrained(stock, str(out / "adapter")).eval()
        got = peft(input_ids=ids).logits
    # PEFT on the float base = the merged export up to the NF4 rounding the adapter trained against
    assert sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in peft.named_modules()
                  if n.endswith(".lora_A")) == sorted(targets)
    assert (got - want).norm() < (plain - want).norm() + 1e-3 * want.norm()


def test_sft_trains_and_exports_a_mixture_of_experts(tmp_path, smol_tok_dir):
    """qlora train sft on a Qwen3-MoE folder: 4-bit experts, an adapter on every expert matrix (PEFT's
    target_parameters), the merged export in the checkpoint's per-expert layout, loaded by transformers."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                  num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[],
                                  max_position_embeddings=256, **VOCAB)
    folder, out = train_two_steps(config, tmp_path / "moe", smol_tok_dir)
    raw = json.loads((out / "adapter" / "adapter_config.json").read_text())
    facts = json.loads((out / "adapter" / "qlora_adapter.json").read_text())
    matrices = [f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")]
    assert sorted(raw["target_parameters"]) == sorted(matrices) == sorted(facts["quantized_experts"])
    report = json.loads((out / "merged" / "export_report.json").read_text())
    assert report["verification"]["passed"], report["verification"]
    with safe_open(str(out / "merged" / "model.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.experts.3.down_proj.weight" in set(f.keys())     # the per-expert layout
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    stock = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        plain, want = stock(input_ids=ids).logits, merged(input_ids=ids).logits
        got = PeftModel.from_pretrained(stock, str(out / "adapter")).eval()(input_ids=ids).logits
    # PEFT on the float base = the merged export up to the NF4 rounding the adapter trained against
    assert (got - want).norm() < (plain - want).norm() + 1e-3 * want.norm()
