"""Memory levers: which weights train, what a training step keeps, and where.

    modes.py          full / head / lora / qlora (and -ckpt): one model builder for recipes and the planner
    checkpointing.py  recompute each block in backward (prepare_for_training: no fp32 up-casts)
    offload.py        saved tensors in pinned host memory (CUDA)
    tiled_mlp.py      the MLP in sequence tiles: one tile's intermediates
"""
