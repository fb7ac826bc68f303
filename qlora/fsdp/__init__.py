"""QLoRA sharded over processes with FSDP2: the 4-bit base as uint8 shards (shard.py), loaded once (load.py).

    model = qlora.fsdp.load_4bit_once(path)     # rank 0 reads the weights; the others build it on meta
    train(model, ..., TrainConfig(fsdp=True))   # calls shard_model(model)
"""
from qlora.fsdp.load import load_4bit_once, meta_4bit
from qlora.fsdp.shard import (
                              Linear4bitShard,
                              blocks,
                              clip_grad_norm_,
                              device_for_rank,
                              full,
                              gathered,
                              is_dtensor,
                              is_sharded,
                              local,
                              local_bytes,
                              shard_full_,
                              shard_model,
                              shard_optimizer_state,
                              to_shardable,
)

load_4bit = load_4bit_once   # the 0.1.0 name

__all__ = ["Linear4bitShard", "blocks", "clip_grad_norm_", "device_for_rank", "full", "gathered", "is_dtensor",
           "is_sharded", "load_4bit", "load_4bit_once", "local", "local_bytes", "meta_4bit", "shard_full_",
           "shard_model", "shard_optimizer_state", "to_shardable"]
