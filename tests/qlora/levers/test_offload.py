"""qlora.levers.offload: saved tensors to host memory, with qlora's checkpointing.

On a CPU the "host" is a second CPU tensor, so what these tests check is the logic: which tensors
leave (exactly the checkpointed block inputs and the large tensors saved outside the blocks), that the
originals are released (a weakref to each block input dies once forward has returned: without the
offload, checkpointing keeps them alive), and that gradients are identical. The CUDA copies and their
overlap are measured by benchmarks/gpu.sh.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import qlora
from qlora.levers.checkpointing import disable_checkpointing
from qlora.levers.offload import offload_saved_tensors

pytestmark = pytest.mark.usefixtures("single_thread")


def model_and_ids(tiny_llama):
    model = tiny_llama(num_hidden_layers=3)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    qlora.prepare_for_training(model)
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    return model.train(), ids


def block_inputs(model):
    """Weakrefs to every decoder layer's hidden-state input, recorded as forward goes."""
    refs = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, args, kwargs: refs.append(weakref.ref(
            args[0] if args else kwargs["hidden_states"])), with_kwargs=True)
    return refs


def grads_of(model, ids, offload: bool):
    from qlora.objectives.losses import causal_lm_loss
    refs = block_inputs(model)
    if offload:
        with offload_saved_tensors(model, min_bytes=0) as off:
            loss = causal_lm_loss(model, ids, ids, chunk_size=8)
    else:
        off, loss = None, causal_lm_loss(model, ids, ids, chunk_size=8)
    gc.collect()
    alive = [r() is not None for r in refs]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, alive, off


def test_offload_moves_the_checkpointed_inputs_and_keeps_the_gradients(tiny_llama):
    ref_loss, ref_grads, alive_ref, _ = grads_of(*model_and_ids(tiny_llama), offload=False)
    loss, grads, alive, off = grads_of(*model_and_ids(tiny_llama), offload=True)
    assert all(alive_ref) and len(alive_ref) == 3        # checkpointing keeps each block input ...
    assert not any(alive)                                # ... offloading releases them all
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    assert ref_grads.keys() == grads.keys() and ref_grads
    for k in ref_grads:
        assert torch.equal(grads[k], ref_grads[k]), k
    # what left: the 3 block inputs [2, 16, 32]; outside the blocks the final norm's input (the last
    # block's output) and the chunked loss's hidden-state gradient [32, 32]; nothing inside a block
    hidden = (2, 16, 32)
    assert off.stats.shapes[:3] == [hidden] * 3
    assert off.stats.shapes.count(hidden) <= 5 and (32, 32) in off.stats.shapes
    assert all(s in (hidden, (32, 32), (2, 16, 1)) for s in off.stats.shapes), off.stats.shapes
    assert off.stats.reloads >= off.stats.tensors


def test_parameters_and_small_tensors_stay(tiny_llama):
    model, ids = model_and_ids(tiny_llama)
    from qlora.objectives.losses import causal_lm_loss
    with offload_saved_tensors(model, min_bytes=2 * 16 * 32 * 4) as off:   # a block input's size
        loss = causal_lm_loss(model, ids, ids, chunk_size=8)
    loss.backward()
    assert off.stats.kept > 0 and set(off.stats.shapes) <= {(2, 16, 32), (32, 32)}
    assert off.stats.bytes == sum(torch.Size(s).numel() * 4 for s in off.stats.shapes)


def test_without_checkpointing_everything_large_leaves(tiny_llama):
    """Without checkpointing the same context moves every saved activation (like torch's save_on_cpu):
    many more tensors, including the blocks' insides (the MLP's [2, 16, 64])."""
    model, ids = model_and_ids(tiny_llama)
    disable_checkpointing(model)
    loss_a, grads_a, _, off = grads_of(model, ids, offload=True)
    assert (2, 16, 64) in off.stats.shapes and off.stats.tensors > 20
    model_b, _ = model_and_ids(tiny_llama)
    disable_checkpointing(model_b)
    loss_b, grads_b, _, _ = grads_of(model_b, ids, offload=False)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_b)
