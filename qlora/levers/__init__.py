"""Memory levers: what a training step keeps, and where.

    checkpointing.py  recompute each block in backward (prepare_for_training: no fp32 up-casts)
    offload.py        saved tensors in pinned host memory (CUDA)
    tiled_mlp.py      the MLP in sequence tiles: one tile's intermediates
    losses.py         the LM head and cross-entropy in chunks: never the full [tokens, vocab] logits
"""
