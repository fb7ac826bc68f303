"""Train a qlora model with Hugging Face's trainers: transformers' `Trainer` and TRL's `SFTTrainer`.

    model = qlora.load_4bit("path/to/model")
    model = qlora.add_lora(model, qlora.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    qlora.prepare_for_training(model)                 # checkpointing (ours: pass gradient_checkpointing=False)
    trainer = transformers.Trainer(model=qlora.train.hf.for_trainer(model), args=..., train_dataset=...)
    trainer.train()
    trainer.save_model("out/adapter")                 # adapter_config.json + adapter_model.safetensors (PEFT format)

Why it is needed: `Trainer.__init__` calls transformers' `validate_quantization_for_training`, which
refuses a model with `is_quantized` set unless it is a `peft.PeftModel` or has adapters loaded through
transformers' own PEFT integration (`model._hf_peft_config_loaded`, set by `model.add_adapter`):
"You cannot perform fine-tuning on purely quantized models". A qlora model has trainable adapters,
just not PEFT's classes. `for_trainer` sets that same flag (what it asserts is true: adapters are
attached) and gives the model a `save_pretrained` that writes qlora's PEFT-format adapter, which is
what `Trainer.save_model` and its checkpoints call. Our LoRA layers do the training; nothing of PEFT
is involved. Not covered: Trainer's `load_best_model_at_end` / `resume_from_checkpoint` on the
adapter (they call PEFT's `load_adapter`); resume with qlora.load_adapter instead.

TRL's preference trainers (DPOTrainer, ...) need a reference model. Given `ref_model=None` and a model that
is not a `peft.PeftModel`, TRL loads a second full copy of the base from `model.config`'s path (+16 GiB for an
8B model in bf16). `reference_model(model)` is that reference without a second copy: the same modules and
weights, its forward run with the adapters disabled (the base the adapters started from):

    trainer = DPOTrainer(model=qlora.for_trainer(model), ref_model=qlora.train.hf.reference_model(model), ...)

KTOTrainer takes `ref_model=` the same way. GRPOTrainer and RLOOTrainer take none: with beta > 0 (RLOO's default
0.05; GRPO's default beta=0 builds no reference) they load a second copy from the model's path, through TRL's
`create_model_from_path`, as DPO and KTO do when given ref_model=None. `shared_reference(model)` answers that
load, while the trainers are built, with `reference_model(model)`; TRL prepares it as its own (dropout off, its
fused head with the trainer's temperature):

    with qlora.train.hf.shared_reference(model):
        trainer = GRPOTrainer(model=qlora.for_trainer(model), args=GRPOConfig(beta=0.04, ...), ...)

TRL's `sync_ref_model=True` (mix the policy into the reference every few steps) cannot work on a reference that
is the policy's own base: under shared_reference it is refused.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import types

from qlora.errors import QLoRAError
from qlora.lora.files import save_adapter
from qlora.lora.inject import disable_adapters


def _save_adapter_pretrained(self, save_directory, state_dict=None, is_main_process: bool = True, **kwargs):
    """Trainer.save_model -> save_pretrained: our adapter files (the state_dict Trainer passes is the
    whole model's; the adapter is read from the model itself)."""
    if is_main_process:
        save_adapter(self, save_directory)


def for_trainer(model):
    """`model` (with qlora adapters) made acceptable to transformers' Trainer and TRL's SFTTrainer; returns it."""
    if getattr(model, "qlora_config", None) is None:
        raise QLoRAError("for_trainer needs a model with qlora adapters: call qlora.add_lora(model, LoraConfig(...)) first")
    if not hasattr(model, "config"):
        raise QLoRAError("for_trainer needs a transformers model (PreTrainedModel)")
    model._hf_peft_config_loaded = True       # adapters are attached: the flag transformers' add_adapter sets
    model.save_pretrained = types.MethodType(_save_adapter_pretrained, model)
    return model


def reference_model(model):
    """The reference for TRL's preference trainers: `model` with its adapters disabled, sharing every module and
    weight with it (a shallow copy of the model object: no tensor is copied). Every call runs under
    qlora.disable_adapters, whatever forward TRL patches in (its fused LM head calls the backbone directly)."""
    if getattr(model, "qlora_config", None) is None:
        raise QLoRAError("reference_model needs a model with qlora adapters: call qlora.add_lora(model, ...) first")
    ref = copy.copy(model)          # the same _modules / _parameters dicts: one set of weights
    cls = type(model)

    def __call__(self, *args, **kwargs):
        with disable_adapters(model):
            return cls.__call__(self, *args, **kwargs)
    ref.__class__ = type(f"Reference{cls.__name__}", (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return ref


@contextlib.contextmanager
def shared_reference(model):
    """While it is open, TRL's trainers asking `create_model_from_path` for `model`'s own path (their reference,
    loaded again) get `reference_model(model)`; any other path loads as before. TRL's SyncRefModelCallback
    (sync_ref_model=True) is refused: it would average the policy into its own frozen base."""
    from trl.trainer import callbacks  # lazy: trl is optional (test extra) and costs ~3 s
    from trl.trainer.utils import get_config_model_id  # lazy: trl is optional (test extra)
    own = get_config_model_id(model.config)
    patched = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("trl") and callable(getattr(module, "create_model_from_path", None)):
            patched[module] = module.create_model_from_path

    def answering(load):
        def create_model_from_path(model_id, *args, **kwargs):
            return reference_model(model) if model_id == own else load(model_id, *args, **kwargs)
        return create_model_from_path

    def refuse_sync(self, *args, **kwargs):
        raise QLoRAError("sync_ref_model=True mixes the policy into its reference, which here is the policy's own "
                         "4-bit base: set sync_ref_model=False")
    sync_init = callbacks.SyncRefModelCallback.__init__
    try:
        for module, load in patched.items():
            module.create_model_from_path = answering(load)
        callbacks.SyncRefModelCallback.__init__ = refuse_sync
        yield
    finally:
        for module, load in patched.items():
            module.create_model_from_path = load
        callbacks.SyncRefModelCallback.__init__ = sync_init
