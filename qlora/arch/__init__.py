"""What qlora knows about a model's architecture, one rule each: the output head (heads.py), module-name
matching (names.py), the stack of blocks (blocks.py), "is this layer 4-bit / linear" (quantized.py), a
quiet from_pretrained (loading.py), and "is this a mixture-of-experts module" (experts.py).
Imports nothing above utilities."""
