"""qlora: fine-tune large models on small GPUs with a 4-bit NF4 base and bf16 LoRA adapters.

    import qlora
    model = qlora.load_4bit("path/to/model")                       # NF4 base (bitsandbytes)
    model = qlora.add_lora(model, qlora.LoraConfig(r=16, target_modules="all-linear"))
    qlora.prepare_for_training(model)                              # checkpointing, no fp32 up-casts
    ... train ...
    qlora.save_adapter(model, "adapter/")                          # PEFT-compatible files
    trainer = transformers.Trainer(model=qlora.for_trainer(model), ...)   # or TRL's SFTTrainer

Everything is imported when first used: `import qlora` itself loads no torch.

One subpackage per concern (arch, quant, lora, levers, objectives, data, plan, fsdp, train, export, cli, util),
and three modules: errors.py (QLoRAError and the other exceptions raised for the user), optim.py (the
optimizers by name) and bundled.py (real models that ship inside pip packages: minilm, smollm2).
"""
import importlib
import importlib.util
import sys as _sys
import warnings

from qlora.util.quiet import drop_known_noise

__version__ = "0.1.0"

# Every public name is imported on first use (PEP 562): `import qlora` and `qlora --help` cost no
# torch import (~2 s); `qlora.add_lora` imports what it needs the first time it is read.
_LAZY = {
    "LoraConfig": "qlora.lora.config", "QLoRAError": "qlora.errors",
    "add_lora": "qlora.lora.inject", "count_parameters": "qlora.lora.inject", "disable_adapters": "qlora.lora.inject",
    "merge_lora": "qlora.lora.inject", "print_trainable_parameters": "qlora.lora.inject",
    "unload_lora": "qlora.lora.inject", "unmerge_lora": "qlora.lora.inject",
    "load_adapter": "qlora.lora.files", "read_adapter_config": "qlora.lora.files", "save_adapter": "qlora.lora.files",
    "LoRAConv2d": "qlora.lora.layers", "LoRAEmbedding": "qlora.lora.layers", "LoRALinear": "qlora.lora.layers",
    "load_4bit": "qlora.quant.load", "quantize_model": "qlora.quant.convert",
    "enable_checkpointing": "qlora.levers.checkpointing", "prepare_for_training": "qlora.levers.checkpointing",
    "export_merged": "qlora.export.from_model", "export_adapter": "qlora.export.from_files",
    "export_gguf": "qlora.export.gguf",
    "causal_lm_loss": "qlora.objectives.losses", "chunked_cross_entropy": "qlora.objectives.losses",
    "for_trainer": "qlora.train.hf",
}

# Modules that moved since 0.1.0: `import qlora.losses` (or `from qlora.tiled_mlp import ...`) gives the module
# where that code lives now (the same module object, imported on first use) with a DeprecationWarning.
_MOVED = {
    "qlora.config": "qlora.lora.config",
    "qlora.inject": "qlora.lora.inject",
    "qlora.adapters_io": "qlora.lora.files",
    "qlora.checkpointing": "qlora.levers.checkpointing",
    "qlora.offload": "qlora.levers.offload",
    "qlora.tiled_mlp": "qlora.levers.tiled_mlp",
    "qlora.losses": "qlora.objectives.losses",
    "qlora.hf": "qlora.train.hf",
    "qlora.profile": "qlora.plan.sweep",
    "qlora.quantized": "qlora.arch.quantized",
    "qlora.heads": "qlora.arch.heads",
    "qlora.names": "qlora.arch.names",
    "qlora.loading": "qlora.arch.loading",
    "qlora.sizes": "qlora.util.sizes",
    "qlora.staging": "qlora.util.staging",
    "qlora.chunked4bit": "qlora.quant.chunked",
    "qlora.export_verify": "qlora.export.verify",
    "qlora.requantize": "qlora.export.requantize",
    "qlora.base_checkpoint": "qlora.export.checkpoint",
    "qlora.shard_writer": "qlora.export.writer",
    "qlora.modes": "qlora.levers.modes",
    "qlora.levers.losses": "qlora.objectives.losses",
    "qlora.levers.preference": "qlora.objectives.preference",
    "qlora.export.live": "qlora.export.from_model",
    "qlora.export.merge": "qlora.export.from_files",
    "qlora.export.common": "qlora.export.result",
}


class _MovedModules:
    """The import-system finder and loader of `_MOVED`: the old name is bound to the new module."""

    def find_spec(self, name, path=None, target=None):
        if name in _MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} is now {_MOVED[spec.name]}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(_MOVED[spec.name])

    def exec_module(self, module):
        pass


_sys.meta_path.append(_MovedModules())
drop_known_noise()


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value          # looked up once
        return value
    raise AttributeError(f"module 'qlora' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})


__all__ = list(_LAZY)
