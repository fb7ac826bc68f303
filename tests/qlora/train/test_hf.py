"""qlora models under transformers' Trainer and TRL's SFTTrainer (qlora/hf.py).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/qlora/train/test_hf.py

A tiny random Llama in NF4 (qlora.load_4bit) + qlora.add_lora trains 2 steps under each trainer;
the test checks that the stock trainer refuses the model without the helper (the check we pass),
that the adapter changed, that `trainer.save_model()` wrote our PEFT-format adapter, and that PEFT's
`PeftModel.from_pretrained` on the same 4-bit base gives the trained model's logits.
"""
import warnings

import pytest
import torch

import qlora
from tests.qlora.objectives.test_grpo import _reward_length, _tiny_tokenizer

pytestmark = [pytest.mark.usefixtures("single_thread"),   # TRL configs warn about their own gradient_checkpointing key
              pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
IDS = torch.tensor([[5, 17, 30, 42, 9, 11]])


@pytest.fixture
def tiny_folder(tmp_path, tiny_llama):
    folder = tmp_path / "tiny"
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(str(folder))
    return folder


def qlora_model(folder):
    model = qlora.load_4bit(str(folder), compute_dtype=torch.float32)
    model = qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=True))
    return qlora.prepare_for_training(model, checkpointing=False)


def b_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def check_saved_adapter(model, folder, adapter_dir, before):
    from peft import PeftModel
    after = b_weights(model)
    assert any((after[n] - before[n]).abs().max() > 0 for n in before), "no LoRA B weight moved"
    assert (adapter_dir / "adapter_model.safetensors").is_file() and (adapter_dir / "adapter_config.json").is_file()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        peft = PeftModel.from_pretrained(qlora.load_4bit(str(folder), compute_dtype=torch.float32), str(adapter_dir))
        got = peft.eval()(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_trainer_refuses_without_helper_and_trains_with_it(tmp_path, tiny_folder):
    from transformers import Trainer, TrainingArguments
    model = qlora_model(tiny_folder)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 96, (4, 8), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             disable_tqdm=True)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=args, train_dataset=data)
    before = b_weights(model)
    trainer = Trainer(model=qlora.for_trainer(model), args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    check_saved_adapter(model, tiny_folder, tmp_path / "adapter", before)


def test_trl_sft_trainer_trains_and_saves_our_adapter(tmp_path, tiny_folder):
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    vocab = {f"w{i}": i for i in range(96)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w1", pad_token="w0", eos_token="w2")
    model = qlora_model(tiny_folder)
    data = Dataset.from_list([{"prompt": f"w{3 + i} w{4 + i} w5", "completion": f" w{7 + i} w8"} for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no", gradient_checkpointing=False, logging_steps=1,
                     bf16=False, disable_tqdm=True)
    before = b_weights(model)
    trainer = SFTTrainer(model=qlora.for_trainer(model), args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    # TRL casts the adapters of a 4-bit model to bf16 (the QLoRA paper's recipe); PEFT loads them into
    # fp32 LoRA layers, so compare in fp32 with the very same (bf16-representable) values
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    check_saved_adapter(model, tiny_folder, tmp_path / "adapter", before)


def test_trl_dpo_trainer_uses_the_same_base_as_its_reference(tmp_path, tiny_folder, monkeypatch):
    """DPOTrainer with qlora.train.hf.reference_model: no second model is loaded (TRL's loader would raise
    here), the reference's outputs are the base model's (adapters disabled), and training moves the adapter."""
    pytest.importorskip("trl")
    import trl.trainer.dpo_trainer as dpo
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from qlora.train.hf import reference_model

    def no_second_model(*args, **kwargs):
        raise AssertionError("TRL loaded a second copy of the base model")
    monkeypatch.setattr(dpo, "create_model_from_path", no_second_model)
    vocab = {f"w{i}": i for i in range(96)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w1", pad_token="w0", eos_token="w2")
    model = qlora_model(tiny_folder)
    with torch.no_grad():                                  # a non-zero adapter: policy != reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ref = reference_model(model)
    base = qlora.load_4bit(str(tiny_folder), compute_dtype=torch.float32).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=IDS).logits, base(input_ids=IDS).logits, rtol=0, atol=1e-6)
        assert (model(input_ids=IDS).logits - base(input_ids=IDS).logits).abs().max() > 1e-3
    data = Dataset.from_list([{"prompt": f"w{3 + i} w{4 + i} w5", "chosen": f" w{7 + i} w8",
                               "rejected": f" w{20 + i} w21"} for i in range(8)])
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                     gradient_checkpointing=False, bf16=False)
    before = b_weights(model)
    from accelerate.state import AcceleratorState
    try:
        trainer = DPOTrainer(model=qlora.for_trainer(model), ref_model=ref, args=args, train_dataset=data,
                             processing_class=tok)
        trainer.train()
    finally:      # the trainer's accelerate state is process-wide: the next test's Accelerator starts fresh
        AcceleratorState._reset_state(reset_partial_state=True)
    after = b_weights(model)
    assert any((after[n] - before[n]).abs().max() > 0 for n in before)
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert logged and all("rewards/accuracies" in r or "rewards/chosen" in r for r in logged), logged


@pytest.fixture
def loads(monkeypatch):
    """Every model or config transformers loads from a path, as (what, path): the loads TRL's
    `create_model_from_path` makes (AutoConfig for the architecture, then `<Architecture>.from_pretrained`)."""
    from transformers import AutoConfig, PreTrainedModel
    seen = []
    config_load, model_load = AutoConfig.from_pretrained.__func__, PreTrainedModel.from_pretrained.__func__

    def config_spy(cls, path, *args, **kwargs):
        seen.append(("config", str(path)))
        return config_load(cls, path, *args, **kwargs)

    def model_spy(cls, path, *args, **kwargs):
        seen.append(("model", str(path)))
        return model_load(cls, path, *args, **kwargs)
    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(config_spy))
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(model_spy))
    return seen


@pytest.fixture
def fresh_accelerate():
    """The trainers' accelerate state is process-wide: each test's Accelerator starts fresh, and leaves none."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _trl_trainer(trl, name, model, tmp_path, **extra):
    """TRL's `name` trainer on `model` (qlora.for_trainer'd here) with no ref_model, 2 tiny steps' worth of data."""
    from datasets import Dataset
    common = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                  report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                  gradient_checkpointing=False, bf16=False, **extra)
    prompts = [{"prompt": f"w{3 + i} w{4 + i} w5"} for i in range(8)]
    if name == "dpo":
        data = Dataset.from_list([{**p, "chosen": " w7 w8", "rejected": " w20 w21"} for p in prompts])
        return trl.DPOTrainer(model=qlora.for_trainer(model), args=trl.DPOConfig(**common), train_dataset=data,
                              processing_class=_tiny_tokenizer())
    if name == "kto":
        data = Dataset.from_list([{**p, "completion": f" w{7 + i} w8", "label": i % 2 == 0}
                                  for i, p in enumerate(prompts)])
        return trl.KTOTrainer(model=qlora.for_trainer(model), args=trl.KTOConfig(**common), train_dataset=data,
                              processing_class=_tiny_tokenizer())
    cls, config = {"grpo": (trl.GRPOTrainer, trl.GRPOConfig), "rloo": (trl.RLOOTrainer, trl.RLOOConfig)}[name]
    args = config(**common, num_generations=2, max_completion_length=4, **({"beta": 0.04} if name == "grpo" else {}))
    assert args.beta > 0                                   # RLOO's default (0.05) keeps a reference
    return cls(model=qlora.for_trainer(model), reward_funcs=_reward_length, args=args,
               train_dataset=Dataset.from_list(prompts), processing_class=_tiny_tokenizer())


@pytest.mark.parametrize("name", ["dpo", "kto", "grpo", "rloo"])
def test_trl_trainers_get_the_policys_own_base_as_reference_by_default(name, tmp_path, tiny_folder, loads,
                                                                        fresh_accelerate):
    """DPO and KTO with ref_model=None, GRPO with beta=0.04, RLOO with its default beta, given only
    qlora.for_trainer(model): nothing is loaded (no config, no model), the trainer's reference holds the policy's
    own tensors, its logits are the model's with adapters disabled (not the policy's), and training moves the
    adapter."""
    trl = pytest.importorskip("trl")
    model = qlora_model(tiny_folder)
    with torch.no_grad():                                  # a non-zero adapter: policy != reference
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = b_weights(model)
    loads.clear()
    trainer = _trl_trainer(trl, name, model, tmp_path)
    assert loads == []
    ref = trainer.ref_model
    assert type(ref).__name__ == "ReferenceLlamaForCausalLM"
    assert {p.data_ptr() for p in ref.parameters()} == {p.data_ptr() for p in model.parameters()}
    with torch.no_grad():
        got = ref(input_ids=IDS).logits
        with qlora.disable_adapters(model):
            base = model(input_ids=IDS).logits
        policy = model(input_ids=IDS).logits
        fused = ref(input_ids=IDS, labels=IDS, fused_lm_head=True).log_probs      # TRL's head: the backbone directly
    torch.testing.assert_close(got, base, rtol=0, atol=0)
    assert (policy - base).abs().max() > 1e-3
    want = torch.log_softmax(base[:, :-1] / getattr(trainer, "temperature", 1.0), -1).gather(-1, IDS[:, 1:, None])
    torch.testing.assert_close(fused.reshape(want.shape), want, rtol=1e-5, atol=1e-5)
    trainer.train()
    assert loads == []
    after = b_weights(model)
    assert any((after[n] - before[n]).abs().max() > 0 for n in before)


def test_loads_that_are_not_a_qlora_reference_pass_through(tmp_path, tiny_folder, loads, fresh_accelerate):
    """With a for_trainer'd qlora model of the same folder alive, TRL's loader called outside a trainer, and a
    DPOTrainer given the folder as a string (a full-precision policy), load what they loaded before: the policy and
    its reference are two real models, not ours."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.utils import create_model_from_path
    model = qlora.for_trainer(qlora_model(tiny_folder))
    loads.clear()
    plain = create_model_from_path(str(tiny_folder))
    assert loads == [("config", str(tiny_folder)), ("model", str(tiny_folder))]
    assert not hasattr(plain, "qlora_reference") and plain is not model
    loads.clear()
    data = Dataset.from_list([{"prompt": "w3 w4", "chosen": " w7", "rejected": " w9"}] * 4)
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, disable_tqdm=True,
                         gradient_checkpointing=False)
    trainer = trl.DPOTrainer(model=str(tiny_folder), args=args, train_dataset=data, processing_class=_tiny_tokenizer())
    assert [what for what, _ in loads].count("model") == 2
    assert getattr(trainer.model, "qlora_config", None) is None
    assert not hasattr(trainer.ref_model, "qlora_reference")


def test_sync_ref_model_is_refused_on_our_reference(tmp_path, tiny_folder, fresh_accelerate):
    """sync_ref_model=True would average the policy into its own base: refused in one line, whether the
    reference came from TRL's load (ref_model=None) or was given, and under the kept shared_reference alias."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from qlora.train.hf import reference_model, shared_reference
    model = qlora_model(tiny_folder)
    data = Dataset.from_list([{"prompt": "w3 w4", "chosen": " w7", "rejected": " w9"}] * 4)
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, sync_ref_model=True,
                         gradient_checkpointing=False, disable_tqdm=True)
    for ref in (None, reference_model(model)):
        with pytest.raises(qlora.QLoRAError, match="set sync_ref_model=False"):
            trl.DPOTrainer(model=qlora.for_trainer(model), ref_model=ref, args=args, train_dataset=data,
                           processing_class=_tiny_tokenizer())
    with shared_reference(model), pytest.raises(qlora.QLoRAError, match="set sync_ref_model=False"):
        trl.DPOTrainer(model=qlora.for_trainer(model), args=args, train_dataset=data,
                       processing_class=_tiny_tokenizer())
    with pytest.raises(qlora.QLoRAError, match="add_lora"), shared_reference(torch.nn.Linear(2, 2)):
        pass


def test_a_trl_without_the_loader_gets_one_warning(monkeypatch):
    """A TRL whose trainers do not load through `create_model_from_path` (another version): for_trainer says once
    that a second base may be loaded, naming reference_model."""
    pytest.importorskip("trl")
    import trl.trainer.utils

    from qlora.train import hf
    monkeypatch.setattr(hf, "_TRL_HOOKED", [])
    monkeypatch.delattr(trl.trainer.utils, "create_model_from_path")
    model = qlora.add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), qlora.LoraConfig(r=2, target_modules=["0"]))
    model.config = None
    with pytest.warns(UserWarning, match=r"qlora\.train\.hf\.reference_model"):
        hf.for_trainer(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.for_trainer(model)
