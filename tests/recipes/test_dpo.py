"""Tests of the DPO recipe (recipes/dpo.py): end to end, precomputed reference, resume, DDP, a MoE, the CLI.

    .venv/bin/python -m pytest -q tests/recipes/test_dpo.py

End to end, `qlora train recipes/configs/dpo.yaml` on a tiny random Llama with SmolLM2's tokenizer, PEFT loading
the adapter with the merged export's logits. The data loader is tested in tests/qlora/data/test_preference.py.
"""
import json
from pathlib import Path

import pytest
import torch

from tests.qlora.data.test_preference import ROWS
from tests.qlora.data.test_sft import write

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "recipes/configs/dpo.yaml"
pytestmark = [pytest.mark.usefixtures("single_thread"),   # PEFT reads the deprecated is_gradient_checkpointing
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def run_dpo(tmp_path, model, data, out, *extra) -> int:
    from qlora.cli import main
    return main(["train", str(CONFIG), f"model={model}", f"data={data}", f"out_dir={out}", "eval_fraction=0.25",
                 "train.batch_size=2", "train.max_steps=3", "train.progress=false", "samples=1", "max_new_tokens=4",
                 "lora.r=4", "lora.lora_dropout=0", "mode=qlora", "train.lr=1e-2", *extra])


def test_dpo_end_to_end_metrics_adapter_in_peft_and_export(tmp_path, tiny_chat_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    data = write(tmp_path / "pairs.jsonl", [ROWS["conversational"], ROWS["multi-turn"]] * 6)
    out = tmp_path / "run"
    assert run_dpo(tmp_path, tiny_chat_model, data, out, "mode=lora", "export=true", "export_dtype=float32") == 0
    summary = json.loads((out / "summary.json").read_text())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")
    assert logged[0]["step"] == 0 and logged[0]["eval_rewards/margins"] == 0.0      # policy = reference before training
    assert abs(logged[0]["eval_loss"] - 0.6931472) < 1e-5                              # log 2
    train_rows = [r for r in logged if "loss" in r]
    assert len(train_rows) == 3 and all(set(names) <= set(r) for r in train_rows)
    assert all(f"eval_{n}" in logged[-1] for n in names) and summary["eval_after"]["rewards/margins"] != 0
    assert "chunked log-probs (256 tokens), reference = the same base, adapters off, no grad" in summary["savers"]
    for name in ("curves.png", "samples.jsonl", "adapter/adapter_config.json", "merged/config.json"):
        assert (out / name).is_file(), name
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_chat_model), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_precomputed_reference_gives_the_same_steps(tmp_path, tiny_chat_model):
    data = write(tmp_path / "pairs.jsonl", [ROWS["conversational"], ROWS["multi-turn"], ROWS["text"]] * 4)
    losses = {}
    for pre in ("false", "true"):
        out = tmp_path / f"run-{pre}"
        assert run_dpo(tmp_path, tiny_chat_model, data, out, f"precompute_ref={pre}", "eval_fraction=0") == 0
        losses[pre] = [(r["loss"], r["rewards/margins"]) for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                                                       .splitlines()) if "loss" in r]
    assert len(losses["true"]) == 3
    for a, b in zip(losses["false"], losses["true"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert losses["false"][-1][1] != 0


def test_bad_row_on_the_command_line_exits_2_with_one_line(tmp_path, tiny_chat_model, capsys):
    data = write(tmp_path / "pairs.jsonl", [ROWS["text"]] * 4 + [{"prompt": "Q", "chosen": "A"}])
    assert run_dpo(tmp_path, tiny_chat_model, data, tmp_path / "run", "eval_fraction=0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pairs.jsonl:5: no 'rejected' value" in err[0], err


def test_resume_continues_the_run_exactly(tmp_path, tiny_chat_model, monkeypatch):
    """Killed in step 4's loss with a checkpoint at step 2; train.resume=true gives the uninterrupted run's losses
    and TRL metrics, exactly (dropout on: the RNG state is restored too)."""
    import qlora_recipes.dpo as recipe
    data = write(tmp_path / "pairs.jsonl", [ROWS["conversational"], ROWS["multi-turn"], ROWS["text"]] * 4)
    args = ("eval_fraction=0", "train.max_steps=4", "train.save_every=2", "lora.lora_dropout=0.1")

    def rows(out):
        return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert run_dpo(tmp_path, tiny_chat_model, data, tmp_path / "a", *args) == 0
    real, calls = recipe.preference_step, []

    def killed_at_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(recipe, "preference_step", killed_at_4)
    assert run_dpo(tmp_path, tiny_chat_model, data, tmp_path / "b", *args) == 130       # "qlora train: interrupted"
    assert sorted(p.name for p in (tmp_path / "b/checkpoints").glob("step-*")) == ["step-0000002"]
    monkeypatch.setattr(recipe, "preference_step", real)
    assert run_dpo(tmp_path, tiny_chat_model, data, tmp_path / "b", *args, "train.resume=true") == 0
    uninterrupted, resumed = rows(tmp_path / "a"), rows(tmp_path / "b")
    drop = ("samples_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in drop} for r in uninterrupted]
    assert len(uninterrupted) == 4 and "rewards/margins" in uninterrupted[-1]


DDP_SCRIPT = """
import json, os, sys
import torch
from safetensors.torch import save_file
from qlora.cli import main, recipes_package
recipes_package()
import qlora_recipes.causal_lm as common
import qlora_recipes.dpo as dpo
config, model, data, out = sys.argv[1:5]
real_finish = dpo.finish
def finish(cfg, model, *args):
    rank = int(os.environ["RANK"])
    trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, os.path.join(out, f"rank{rank}.safetensors"))
    return real_finish(cfg, model, *args)
dpo.finish = finish
sys.exit(main(["train", config, f"model={model}", f"data={data}", f"out_dir={out}", "eval_fraction=0.25",
               "train.batch_size=2", "train.max_steps=2", "train.progress=false", "samples=1", "max_new_tokens=2",
               "lora.r=4", "mode=qlora", "train.lr=1e-2"]))
"""


def test_two_processes_ddp_train_the_same_adapter(tmp_path, tiny_chat_model, torchrun):
    """DDP (torchrun, 2 gloo processes): the preference step runs inside DDP's forward (qlora.train.loop
    LossInForward), so the gradients are all-reduced: both ranks end with the same adapter; rank 0 writes the files."""
    from safetensors.torch import load_file
    script = tmp_path / "ddp_dpo.py"
    script.write_text(DDP_SCRIPT)
    data = write(tmp_path / "pairs.jsonl", [ROWS["conversational"], ROWS["multi-turn"], ROWS["text"]] * 4)
    out = tmp_path / "run"
    out.mkdir()
    torchrun(script, CONFIG, tiny_chat_model, data, out, timeout=300)
    w0, w1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    assert w0.keys() == w1.keys() and w0
    for name in w0:
        torch.testing.assert_close(w0[name], w1[name], rtol=0, atol=0)
    assert any(w0[n].abs().max() > 0 for n in w0 if "lora_B" in n)          # trained
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in logged) == 2 and "rewards/margins" in logged[-2], logged
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2          # one per evaluation, one writer


def test_a_mixture_of_experts_trains_with_its_router_loss(tmp_path, smol_tok_dir):
    """A tiny Qwen3-MoE over SmolLM2's vocabulary, asking for its router logits: 4-bit experts, the preference
    loss + the load-balancing loss (logged as aux_loss, train and eval), the export verified."""
    import shutil

    import transformers
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=49152, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
        num_experts_per_tok=2, pad_token_id=2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
        output_router_logits=True)
    folder = tmp_path / "tiny-moe"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder))
    for p in smol_tok_dir.iterdir():
        shutil.copy(p, folder / p.name)
    data = write(tmp_path / "pairs.jsonl", [ROWS["conversational"], ROWS["multi-turn"]] * 6)
    out = tmp_path / "run"
    assert run_dpo(tmp_path, folder, data, out, "export=true", "train.max_steps=2") == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in logged if "loss" in r) and "eval_aux_loss" in logged[-1]
    assert json.loads((out / "summary.json").read_text())["export"]["verification"]["passed"] is True


def test_an_earlier_run_in_out_dir_is_refused_before_anything_of_it_changes(tmp_path, tiny_chat_model, capsys):
    data = write(tmp_path / "pairs.jsonl", [ROWS["conversational"], ROWS["text"]] * 4)
    out = tmp_path / "run"
    assert run_dpo(tmp_path, tiny_chat_model, data, out, "train.max_steps=1") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "samples.jsonl" in before
    capsys.readouterr()
    assert run_dpo(tmp_path, tiny_chat_model, data, out, "train.max_steps=1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and "holds the adapter of an earlier run" in err[0] and "overwrite=true" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
