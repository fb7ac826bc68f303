"""qlora: fine-tune large models on small GPUs with a 4-bit NF4 base and bf16 LoRA adapters.

    import qlora
    model = qlora.load_4bit("path/to/model")                       # NF4 base (bitsandbytes)
    model = qlora.add_lora(model, qlora.LoraConfig(r=16, target_modules="all-linear"))
    qlora.prepare_for_training(model)                              # checkpointing, no fp32 up-casts
    ... train ...
    qlora.save_adapter(model, "adapter/")                          # PEFT-compatible files
    trainer = transformers.Trainer(model=qlora.for_trainer(model), ...)   # or TRL's SFTTrainer

Heavy pieces (bitsandbytes, transformers) are imported only when used.
"""
from qlora.adapters_io import load_adapter, read_adapter_config, save_adapter
from qlora.config import LoraConfig
from qlora.errors import QLoRAError
from qlora.inject import (add_lora, count_parameters, disable_adapters, merge_lora,
                          print_trainable_parameters, unload_lora, unmerge_lora)
from qlora.lora import LoRAConv2d, LoRAEmbedding, LoRALinear

__version__ = "0.1.0"

_LAZY = {
    "load_4bit": "qlora.quant", "quantize_model": "qlora.quant",
    "enable_checkpointing": "qlora.checkpointing", "prepare_for_training": "qlora.checkpointing",
    "export_merged": "qlora.export", "export_adapter": "qlora.export",
    "causal_lm_loss": "qlora.losses", "chunked_cross_entropy": "qlora.losses",
    "for_trainer": "qlora.hf",
}


def __getattr__(name):
    # quant/checkpointing/export pull in bitsandbytes or transformers: import them on first use
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qlora' has no attribute {name!r}")


__all__ = ["LoraConfig", "QLoRAError", "add_lora", "count_parameters", "print_trainable_parameters",
           "merge_lora", "unmerge_lora", "unload_lora", "disable_adapters", "save_adapter", "load_adapter",
           "read_adapter_config", "LoRALinear", "LoRAEmbedding", "LoRAConv2d", *_LAZY]
