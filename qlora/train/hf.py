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

TRL's trainers that keep a reference model (DPOTrainer, KTOTrainer given `ref_model=None`; GRPOTrainer with beta > 0;
RLOOTrainer, whose default beta is 0.05) load it, for a policy that is not a `peft.PeftModel`, as a second full
copy of the base from the policy's own path (TRL's `create_model_from_path`; +16 GiB for an 8B model in bf16, and
not even the NF4 base the adapters sit on). `reference_model(model)` is that reference without a second copy: the
same modules and weights, its forward run with the adapters disabled (the base the adapters started from).

That is the default: once `for_trainer` has run, a TRL trainer whose own model is a qlora model and that asks TRL's
loader for that model's path (the reference load, nothing else: not the policy loaded from a string, not a reward
model or teacher, not another trainer's) gets `reference_model(model)`; TRL prepares it as its own (dropout off,
its fused LM head with the trainer's temperature). `for_trainer` wraps TRL's `create_model_from_path` once per
process; the wrapper finds the trainer asking on the call stack (TRL calls its loader from the trainer's
`__init__`, after `self.model` is set) and answers only when the path is that trainer's own model's. No second
base, nothing to ask for:

    trainer = DPOTrainer(model=qlora.for_trainer(model), args=DPOConfig(...), ...)           # ref_model=None
    trainer = GRPOTrainer(model=qlora.for_trainer(model), args=GRPOConfig(beta=0.04, ...), ...)

`ref_model=qlora.train.hf.reference_model(model)` may still be given to DPO / KTO (the same object TRL would get).
With `precompute_ref_log_probs=True` and `ref_model=None`, DPO / KTO load nothing: they score the reference with the
policy before training, which is the base while the adapters are fresh (B = 0), the adapted model if they were
loaded; give `ref_model=reference_model(model)` for the base. TRL's `sync_ref_model=True` (mix the policy into the
reference every few steps) cannot work on a reference that is the policy's own base: it is refused, one line.
Should an installed TRL lack the loader this answers (another version), `for_trainer` warns once, naming
`reference_model`. `shared_reference(model)`, the context manager this default replaces, is kept as an alias.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import sys
import types
import warnings

from qlora.errors import QLoRAError
from qlora.lora.files import save_adapter
from qlora.lora.inject import disable_adapters

SYNC_REFUSED = ("sync_ref_model=True mixes the policy into its reference, which here is the policy's own 4-bit base "
                "(qlora.train.hf.reference_model): set sync_ref_model=False")
_TRL_HOOKED = []       # one entry once TRL's loader and SyncRefModelCallback are wrapped (or found unwrappable)


def _save_adapter_pretrained(self, save_directory, state_dict=None, is_main_process: bool = True, **kwargs):
    """Trainer.save_model -> save_pretrained: our adapter files (the state_dict Trainer passes is the
    whole model's; the adapter is read from the model itself)."""
    if is_main_process:
        save_adapter(self, save_directory)


def for_trainer(model):
    """`model` (with qlora adapters) made acceptable to transformers' Trainer and TRL's trainers; returns it. TRL's
    trainers that would load a second base as their reference get `reference_model(model)` instead."""
    if getattr(model, "qlora_config", None) is None:
        raise QLoRAError("for_trainer needs a model with qlora adapters: call qlora.add_lora(model, LoraConfig(...)) first")
    if not hasattr(model, "config"):
        raise QLoRAError("for_trainer needs a transformers model (PreTrainedModel)")
    model._hf_peft_config_loaded = True       # adapters are attached: the flag transformers' add_adapter sets
    model.save_pretrained = types.MethodType(_save_adapter_pretrained, model)
    _hook_trl()
    return model


def reference_model(model):
    """The reference for TRL's preference trainers: `model` with its adapters disabled, sharing every module and
    weight with it (a shallow copy of the model object: no tensor is copied). Every call runs under
    qlora.disable_adapters, whatever forward TRL patches in (its fused LM head calls the backbone directly)."""
    if getattr(model, "qlora_config", None) is None:
        raise QLoRAError("reference_model needs a model with qlora adapters: call qlora.add_lora(model, ...) first")
    _hook_trl()
    ref = copy.copy(model)          # the same _modules / _parameters dicts: one set of weights
    cls = type(model)

    def __call__(self, *args, **kwargs):
        with disable_adapters(model):
            return cls.__call__(self, *args, **kwargs)
    ref.__class__ = type(f"Reference{cls.__name__}", (cls,),
                         {"__call__": __call__, "__module__": cls.__module__, "qlora_reference": True})
    return ref


@contextlib.contextmanager
def shared_reference(model):
    """Kept for code written before it became the default: `for_trainer` now answers TRL's reference loads with
    `reference_model(model)` (and refuses sync_ref_model=True) with no context needed; this only checks `model`."""
    if getattr(model, "qlora_config", None) is None:
        raise QLoRAError("shared_reference needs a model with qlora adapters: call qlora.add_lora(model, ...) first")
    _hook_trl()
    yield


def _hook_trl() -> None:
    """Once per process, where TRL is installed: wrap its `create_model_from_path` (in trl.trainer.utils, where
    trainers imported later take it from, and in every trl module that already holds it) so that reference loads
    are answered, and SyncRefModelCallback so that it refuses our references. Warns once if TRL lacks either."""
    if _TRL_HOOKED or importlib.util.find_spec("trl") is None:
        return
    _TRL_HOOKED.append(True)
    try:
        from trl.trainer import callbacks, utils  # lazy: trl is optional (test extra); ~0.1 s once transformers is in
    except ImportError:                           # an installed TRL that cannot import: no TRL trainer can be built
        return
    load = getattr(utils, "create_model_from_path", None)
    sync = getattr(callbacks, "SyncRefModelCallback", None)
    if load is None or sync is None:
        warnings.warn("qlora: this TRL builds its reference model in a way qlora does not answer: a trainer given "
                      "ref_model=None may load a second copy of the base; pass ref_model=qlora.train.hf.reference_model"
                      "(model) where the trainer takes one", stacklevel=3)
        return
    answering = _answering_reference_loads(load)
    for module in [utils, *(m for n, m in list(sys.modules.items()) if n.startswith("trl.") and m is not None)]:
        if getattr(module, "create_model_from_path", None) is load:
            module.create_model_from_path = answering
    sync.__init__ = _refusing_our_references(sync.__init__)


def _answering_reference_loads(load):
    """TRL's `create_model_from_path`, answering with `reference_model(policy)` the one load that is a reference:
    asked from inside a Trainer whose model is a qlora model, for that model's own path, architecture inferred."""
    @functools.wraps(load)
    def create_model_from_path(model_id, architecture=None, **kwargs):
        policy = getattr(_trainer_on_stack(), "model", None)
        if (architecture is None and getattr(policy, "qlora_config", None) is not None
                and getattr(policy.config, "_name_or_path", None) == model_id):
            return reference_model(policy)
        return load(model_id, architecture, **kwargs)
    return create_model_from_path


def _trainer_on_stack(depth: int = 16):
    """The innermost transformers Trainer among the callers' `self` (the trainer whose `__init__` is running), or
    None. Stops at the first one: a policy loaded from a string is asked for before that trainer has a `model`."""
    from transformers import Trainer  # lazy: transformers' trainer module costs seconds; only TRL's loader needs it
    frame = inspect.currentframe()
    for _ in range(depth):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
    return None


def _refusing_our_references(init):
    """SyncRefModelCallback.__init__ that refuses a qlora reference (one line): averaging the policy into it would
    write into the policy's own base weights."""
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        ref = kwargs.get("ref_model", args[0] if args else None)
        if getattr(getattr(ref, "module", ref), "qlora_reference", False):   # .module: a DDP / DeepSpeed wrapper
            raise QLoRAError(SYNC_REFUSED)
        init(self, *args, **kwargs)
    return __init__
