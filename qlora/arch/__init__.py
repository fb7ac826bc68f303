"""What qlora knows about a model's architecture, one rule each: the output head (heads.py), module-name
matching (names.py), the stack of blocks (blocks.py), "is this layer 4-bit / linear" (quantized.py), a
quiet from_pretrained (loading.py), "is this a mixture-of-experts module" (experts.py), and which part of an
image-text model is its language model and which its vision / audio towers (multimodal.py).
Imports nothing above utilities."""
