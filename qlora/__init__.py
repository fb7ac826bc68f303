"""qlora: fine-tune large models on small GPUs with a 4-bit NF4 base and bf16 LoRA adapters.

    import qlora
    model = qlora.load_4bit("path/to/model")                       # NF4 base (bitsandbytes)
    model = qlora.add_lora(model, qlora.LoraConfig(r=16, target_modules="all-linear"))
    qlora.prepare_for_training(model)                              # checkpointing, no fp32 up-casts
    ... train ...
    qlora.save_adapter(model, "adapter/")                          # PEFT-compatible files
    trainer = transformers.Trainer(model=qlora.for_trainer(model), ...)   # or TRL's SFTTrainer

Everything is imported when first used: `import qlora` itself loads no torch.
"""
__version__ = "0.1.0"

# Every public name is imported on first use (PEP 562): `import qlora` and `qlora --help` cost no
# torch import (~2 s); `qlora.add_lora` imports what it needs the first time it is read.
_LAZY = {
    "LoraConfig": "qlora.config", "QLoRAError": "qlora.errors",
    "add_lora": "qlora.inject", "count_parameters": "qlora.inject", "disable_adapters": "qlora.inject",
    "merge_lora": "qlora.inject", "print_trainable_parameters": "qlora.inject", "unload_lora": "qlora.inject",
    "unmerge_lora": "qlora.inject",
    "load_adapter": "qlora.adapters_io", "read_adapter_config": "qlora.adapters_io", "save_adapter": "qlora.adapters_io",
    "LoRAConv2d": "qlora.lora", "LoRAEmbedding": "qlora.lora", "LoRALinear": "qlora.lora",
    "load_4bit": "qlora.quant", "quantize_model": "qlora.quant",
    "enable_checkpointing": "qlora.checkpointing", "prepare_for_training": "qlora.checkpointing",
    "export_merged": "qlora.export", "export_adapter": "qlora.export",
    "causal_lm_loss": "qlora.losses", "chunked_cross_entropy": "qlora.losses",
    "for_trainer": "qlora.hf",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value          # looked up once
        return value
    raise AttributeError(f"module 'qlora' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})


__all__ = list(_LAZY)
