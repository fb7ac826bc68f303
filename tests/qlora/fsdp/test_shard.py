"""QLoRA sharded with FSDP2 (qlora.fsdp) on 2 gloo CPU processes, against one process.

One torchrun launch of tests/qlora/fsdp/fsdp_script.py checks several things at once (see its docstring);
this file runs the one-process reference in the test process and compares:
  - sharding is real: each rank holds half of the packed 4-bit bytes, adapters, frozen floats and
    AdamW state of the one-process run (measured from each rank's own tensors);
  - same maths: 12 steps on 2 ranks x batch 2 give the loss curve and final adapter of 1 process x batch 4;
  - the packed bytes and quant states are unchanged by training; the sharded model's logits and LoRA
    gradients equal, bit for bit, those of the unsharded model with the same adapter;
  - every 16-bit pattern (NaN as bf16/fp16 included) survives sharding and the all-gather bit for bit;
  - kill + resume reproduce the uninterrupted curve, also resumed in one process; the adapter loads
    in PEFT and exports;
  - bad input (too few examples to split, a rank with another model) gets a clear error.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

SCRIPT = Path(__file__).with_name("fsdp_script.py")


def _script_module():
    spec = importlib.util.spec_from_file_location("fsdp_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory, torchrun):
    """The 2-process run (facts per rank, rank 0's tensors) and the 1-process reference."""
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(SCRIPT, out, timeout=240)
    facts = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    s = _script_module()
    from qlora.train.loop import train
    torch.set_num_threads(1)
    ref_model = s.qlora_llama()
    fresh_packed = s.packed_state(ref_model)
    ref = train(ref_model, s.data(), s.collate, s.lm_loss, s.train_config(out / "ref", 2 * s.PER_RANK_BATCH))
    return {"out": out, "facts": facts, "s": s, "ref": ref, "ref_model": ref_model, "fresh_packed": fresh_packed,
            "tensors": load_file(str(out / "A_tensors.safetensors"))}


def test_two_ranks_hold_half_of_everything(run):
    f0, f1 = run["facts"]
    assert (f0["rank"], f1["rank"], f0["world"], f0["backend"]) == (0, 1, 2, "gloo")
    assert f1["meta_before"] and not f0["meta_before"]          # rank 1 never held the model's values
    assert f0["A_n_shard_layers"] == 14                         # 7 linears x 2 blocks, all 4-bit and sharded
    assert f0["A_placements"] == ["(Shard(dim=0),)"]            # every parameter is a dim-0 DTensor shard
    one = run["ref"].local_bytes
    n_steps = 4 * 28                                            # AdamW's fp32 step counter per tensor, replicated
    assert one["packed_4bit"] > 30_000 and one["optimizer"] == 2 * one["trainable"] + n_steps   # 2 fp32 moments
    for kind in ("packed_4bit", "trainable", "frozen_float", "optimizer"):
        # FSDP2's local shard is torch.chunk's: the two halves add up to the whole
        both = f0["A_local_bytes"][kind] + f1["A_local_bytes"][kind]
        assert both == one[kind] + (n_steps if kind == "optimizer" else 0), kind
        for f in (f0, f1):
            assert abs(f["A_local_bytes"][kind] - one[kind] / 2) <= 0.02 * one[kind], kind
    # the code books / nested absmax / offset are replicated (~1.1 KiB a layer)
    assert f0["A_local_bytes"]["quant_constants"] == f1["A_local_bytes"]["quant_constants"] == one["quant_constants"]


def test_same_loss_curve_and_adapter_as_one_process_with_twice_the_batch(run):
    f0, f1 = run["facts"]
    ref = [loss for _, loss in run["ref"].losses]
    two = [loss for _, loss in f0["A_losses"]]
    assert len(ref) == len(two) == run["s"].STEPS
    assert f0["A_losses"] == f1["A_losses"]
    assert max(abs(a - b) for a, b in zip(ref, two)) < 1e-5
    assert max(ref) - min(ref) > 1e-3                       # it trained: the curve moves
    ours = load_file(str(run["out"] / "A" / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(run["out"] / "ref" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and len(ours) == 28
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5
    assert any(k.endswith("lora_B.weight") and ours[k].abs().max() > 1e-3 for k in ours)


def test_gradient_accumulation_under_fsdp_gives_the_same_adapter(run):
    """2 ranks x 2 micro-batches of 1 per step = 2 ranks x batch 2: the same examples, the same mean gradient."""
    acc = load_file(str(run["out"] / "E" / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(run["out"] / "A" / "adapter" / "adapter_model.safetensors"))
    assert acc.keys() == ref.keys()
    assert max((acc[k] - ref[k]).abs().max().item() for k in acc) < 1e-5


def test_packed_bytes_unchanged_and_sharded_layers_compute_exactly(run):
    s, t = run["s"], run["tensors"]
    packed = {k.removeprefix("packed."): v for k, v in t.items() if k.startswith("packed.")}
    assert packed.keys() == run["fresh_packed"].keys()
    for k, v in run["fresh_packed"].items():
        assert v.dtype == packed[k].dtype and torch.equal(v, packed[k]), k
    # the unsharded model carrying the adapter trained sharded: the same logits and gradients, bit for bit
    model = s.qlora_llama()
    saved = load_file(str(run["out"] / "A" / "adapter" / "adapter_model.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(saved[f"base_model.model.{n}"])
    model.train()
    probe = s.probe(model)
    assert torch.equal(probe["logits"], t["probe.logits"])
    grads = [k for k in probe if k.startswith("grad.")]
    assert len(grads) == 28
    for k in grads:
        assert torch.equal(probe[k], t[f"probe.{k}"]), k


def test_every_byte_pattern_survives_sharding_and_all_gather(run):
    for f in run["facts"]:
        assert f["B_nan_as_bf16"] == 254 and f["B_nan_as_fp16"] == 2046   # such pairs are in the packed bytes
        assert f["B_gathered_equal"] == [True, True]        # uint8 in forward, the same 131,072 bytes
        assert f["B_local_shard_bytes"] == [65536, 65536]   # each rank stored half
        assert f["B_output_equal"]                          # output of the unsharded layers, exactly


def test_kill_and_resume_reproduce_the_curve(run):
    f0, f1 = run["facts"]
    assert f0["C_interrupted_at"] == f1["C_interrupted_at"] == run["s"].KILL_AT
    assert [step for step, _ in f0["C_resumed_losses"]][0] == 5            # from the step-4 checkpoint
    assert f0["C_curve"] == f0["A_losses"]                                 # metrics.jsonl: the uninterrupted curve
    assert f0["C_resumed_losses"] == f0["A_losses"][4:]


def test_a_two_rank_checkpoint_resumes_in_one_process(run, tmp_path):
    """Gathered checkpoints are one-process files: resume at the same global batch (1 x 4 = 2 x 2)."""
    import shutil

    from qlora.train.loop import train
    s = run["s"]
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(run["out"] / "C" / "checkpoints" / "step-0000008", tmp_path / "checkpoints" / "step-0000008")
    resumed = train(s.qlora_llama(), s.data(), s.collate, s.lm_loss,
                    s.train_config(tmp_path, 2 * s.PER_RANK_BATCH, resume=True, save_every=None))
    two = dict(map(tuple, run["facts"][0]["A_losses"]))
    assert [step for step, _ in resumed.losses] == [9, 10, 11, 12]
    assert max(abs(loss - two[step]) for step, loss in resumed.losses) < 1e-5


def test_adapter_loads_in_peft_and_exports(run, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    from qlora.export.from_files import export_adapter
    s, folder = run["s"], run["out"] / "A" / "adapter"
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert json.loads((folder / "qlora_adapter.json").read_text())["architecture"] == "LlamaForCausalLM"
    torch.manual_seed(0)
    base = LlamaForCausalLM(s.llama_config()).float()
    base.save_pretrained(tmp_path / "base")
    pm = peft.PeftModel.from_pretrained(base, str(folder))
    loaded = {n.replace(".default", ""): p for n, p in pm.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k].detach(), saved[k]) for k in saved)
    result = export_adapter(tmp_path / "base", folder, tmp_path / "merged", dtype="float32", progress=False)
    assert len(result.layers) == 14 and result.verification["passed"], result.verification


def test_bad_input_gets_a_clear_error(run):
    for f in run["facts"]:
        assert f["D_too_few"].startswith("2 training examples in micro-batches of batch_size=2 over 2 process(es)")
        assert "use at least 4 examples" in f["D_too_few"]
        assert f["D_other_model"].startswith("rank(s) [1] hold a different model than rank 0")


# ---------------------------------------------------------------- in-process (no launch)

@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_shardable_layer_computes_what_linear4bit_does(quant_type, double_quant):
    """Linear4bitShard on the same bytes: forward, input and bias gradients bit for bit; to_linear4bit back."""
    from torch import nn

    from qlora.fsdp import Linear4bitShard
    from qlora.quant import dequantize_weight, make_linear4bit
    torch.manual_seed(0)
    ref = make_linear4bit(nn.Linear(96, 40), quant_type=quant_type, double_quant=double_quant,
                          compute_dtype=torch.float32)
    ref.bias.requires_grad_(True)
    shard = Linear4bitShard.from_linear4bit(ref)
    assert shard.weight.dtype == shard.absmax.dtype == torch.uint8 and not shard.weight.requires_grad
    assert shard.absmax.numel() == ref.weight.quant_state.absmax.numel() * (1 if double_quant else 4)
    outs = []
    for layer in (ref, shard):
        x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = layer(x)
        y.pow(2).sum().backward()
        outs.append((y.detach(), x.grad, layer.bias.grad.clone()))
        layer.bias.grad = None
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    back = shard.to_linear4bit()
    assert torch.equal(dequantize_weight(back), dequantize_weight(ref))


def test_meta_model_matches_the_quantized_one():
    """qlora.fsdp.meta_4bit builds what quantize_model does (names, shapes, dtypes), without values."""
    s = _script_module()
    from qlora.fsdp.shard import _signature, to_shardable
    real, meta = s.qlora_llama(), s.qlora_llama(meta=True)
    assert all(p.is_meta for p in meta.parameters()) and not any(p.is_meta for p in real.parameters())
    assert _signature(to_shardable(meta)) == _signature(to_shardable(real))


@pytest.mark.parametrize("kw, needle", [
    ({"fsdp": True, "optimizer": "adamw8bit"}, "fsdp=True with optimizer='adamw8bit'"),
    ({"fsdp": "yes"}, "fsdp='yes': must be true or false"),
])
def test_fsdp_config_rejects_bad_values(kw, needle):
    from qlora import QLoRAError
    from qlora.train.loop import TrainConfig
    with pytest.raises(QLoRAError) as info:
        TrainConfig(**kw)
    assert needle in str(info.value)


def test_one_process_fsdp_just_trains_and_writes_the_adapter(tmp_path):
    """No process group: fsdp=True runs the ordinary loop, and the final adapter lands in out_dir/adapter."""
    s = _script_module()
    from qlora.train.loop import train
    result = train(s.qlora_llama(), s.data(8), s.collate, s.lm_loss, s.train_config(tmp_path, 4, save_every=None))
    assert result.steps == 2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
