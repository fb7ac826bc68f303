"""Our LoRA: the config, the layers, attaching them to a model, and PEFT-format adapter files.

    config.py  LoraConfig (PEFT's field names)        layers.py  LoRALinear / LoRAEmbedding / LoRAConv2d
    inject.py  add_lora, merge / unmerge / unload     files.py   save_adapter / load_adapter (PEFT format)
experts.py LoRAExperts: LoRA on every expert of a fused 3-D mixture-of-experts matrix
"""
from qlora.lora.config import LoraConfig
from qlora.lora.files import load_adapter, read_adapter_config, read_adapter_tensors, save_adapter
from qlora.lora.inject import (
                               add_lora,
                               count_parameters,
                               disable_adapters,
                               find_modules,
                               find_targets,
                               lora_layers,
                               merge_lora,
                               print_trainable_parameters,
                               trainable_state_dict,
                               unload_lora,
                               unmerge_lora,
)
from qlora.lora.layers import (
                               LoRAConv2d,
                               LoRAEmbedding,
                               LoRALayer,
                               LoRALinear,
                               ModulesToSave,
                               adapter_dtype,
                               lora_class_for,
)

__all__ = ["LoRAConv2d", "LoRAEmbedding", "LoRALayer", "LoRALinear", "LoraConfig", "ModulesToSave", "adapter_dtype",
           "add_lora", "count_parameters", "disable_adapters", "find_modules", "find_targets", "load_adapter",
           "lora_class_for", "lora_layers", "merge_lora", "print_trainable_parameters", "read_adapter_config",
           "read_adapter_tensors", "save_adapter", "trainable_state_dict", "unload_lora", "unmerge_lora"]
