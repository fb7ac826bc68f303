"""qlora: fine-tune large models on small GPUs with a 4-bit NF4 base and bf16 LoRA adapters.

Public API (see README):
    LoraConfig, add_lora, count_parameters, merge_lora, unmerge_lora, unload_lora,
    disable_adapters, save_adapter, load_adapter
"""
from qlora.errors import QLoRAError

__version__ = "0.1.0"
