"""qlora.levers.checkpointing: checkpointing changes memory, not maths; prepare_for_training.

Everything runs in fp32 with dropout 0 so losses and gradients with and without checkpointing
must agree to 1e-5 (on CPU the recompute is deterministic: they are in fact equal).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from qlora.errors import QLoRAError
from qlora.levers.checkpointing import (
    CheckpointedForward,
    disable_checkpointing,
    enable_checkpointing,
    is_checkpointing,
    prepare_for_training,
)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm MLP block: x + W2 gelu(W1 norm(x)); keeps [B, T, 4H] for backward without checkpointing."""

    def __init__(self, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x, scale=1.0):
        return x + scale * self.down(nn.functional.gelu(self.up(self.norm(x))))


class PlainNet(nn.Module):
    """Not a transformers model: embedding, an nn.ModuleList of blocks, a head."""

    def __init__(self, vocab=50, hidden=32, n_blocks=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(n_blocks))
        self.extra = nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)])  # smaller list
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        x = self.embed(ids)                 # [B, T, H]
        for block in self.blocks:
            x = block(x, scale=0.5)         # a kwarg, passed through the checkpoint
        for layer in self.extra:
            x = x + layer(x)
        return self.head(x)                 # [B, T, vocab]


def plain_net():
    torch.manual_seed(0)
    return PlainNet()


def loss_of(model, ids):
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def loss_and_grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = loss_of(model, ids)
        loss.backward()
    bad = [str(w.message) for w in caught if "requires_grad" in str(w.message)]
    assert not bad, bad
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward during one training forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(model, ids)
    return total


def freeze_embedding(model):
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.embed
    emb.weight.requires_grad_(False)
    return model


def assert_same(ref, got):
    (loss_a, grads_a), (loss_b, grads_b) = ref, got
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert grads_b[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-5, msg=name)
        assert grads_a[name].abs().sum() > 0, name


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(3)
    return torch.randint(1, 50, (2, 16), generator=g)


# ------------------------------------------------------------------------------------------
# same maths, less memory
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_tiny_llama_same_loss_and_grads_with_frozen_embedding(tiny_llama, ids, use_reentrant):
    base = freeze_embedding(tiny_llama(hidden_size=64, intermediate_size=128))
    ckpt = enable_checkpointing(copy.deepcopy(base), use_reentrant=use_reentrant)
    assert is_checkpointing(ckpt) and not is_checkpointing(base)
    assert_same(loss_and_grads(base, ids), loss_and_grads(ckpt, ids))
    # the frozen embedding got no gradient, the first layer's attention did
    assert ckpt.model.embed_tokens.weight.grad is None
    assert ckpt.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_plain_module_list_same_loss_and_grads_with_frozen_embedding(ids, use_reentrant):
    base = freeze_embedding(plain_net())
    names = list(base.state_dict())
    ckpt = enable_checkpointing(copy.deepcopy(base), use_reentrant=use_reentrant)
    assert all(isinstance(b.__dict__.get("forward"), CheckpointedForward) for b in ckpt.blocks)
    assert "forward" not in ckpt.extra[0].__dict__  # only the largest repeated stack
    assert list(ckpt.state_dict()) == names          # parameter names unchanged
    assert_same(loss_and_grads(base, ids), loss_and_grads(ckpt, ids))
    assert ckpt.blocks[0].up.weight.grad.abs().sum() > 0


def test_fewer_bytes_saved_for_backward(tiny_llama, ids):
    for name, model in (("tiny Llama", tiny_llama(hidden_size=64, intermediate_size=128)), ("plain", plain_net())):
        freeze_embedding(model)
        without = saved_bytes(model, ids)
        enable_checkpointing(model)
        with_ckpt = saved_bytes(model, ids)
        print(f"\n{name}: saved for backward {without} B without checkpointing, {with_ckpt} B with "
              f"({with_ckpt / without:.0%})")
        assert with_ckpt < 0.6 * without


def test_reentrant_plain_without_fix_would_lose_gradients(ids):
    """Why the input-grad fix matters: torch's raw reentrant checkpoint with a frozen input."""
    model = freeze_embedding(plain_net()).train()
    x = model.embed(ids)
    assert not x.requires_grad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.utils.checkpoint.checkpoint(model.blocks[0], x, use_reentrant=True)
    assert any("requires_grad" in str(w.message) for w in caught)
    assert not y.requires_grad  # the block's parameters would get no gradient at all
    # ours: the same block through enable_checkpointing(use_reentrant=True)
    enable_checkpointing(model, use_reentrant=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = model.blocks[0](x)
    assert not [w for w in caught if "requires_grad" in str(w.message)]
    y.sum().backward()
    assert model.blocks[0].up.weight.grad is not None


def test_eval_and_no_grad_are_not_checkpointed(ids):
    base, ckpt = plain_net(), enable_checkpointing(plain_net())
    ckpt.eval()
    calls = []
    ckpt.blocks[0].up.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(ckpt(ids), base.eval()(ids), atol=0, rtol=0)
    assert len(calls) == 1
    ckpt.train()
    loss_of(ckpt, ids).backward()
    assert len(calls) == 3  # forward + recompute in backward


def test_idempotent_deepcopy_and_disable(ids):
    model = enable_checkpointing(enable_checkpointing(plain_net()))
    forward = model.blocks[1].__dict__["forward"]
    assert isinstance(forward, CheckpointedForward) and forward.block is model.blocks[1]
    clone = copy.deepcopy(model)
    assert clone.blocks[1].__dict__["forward"].block is clone.blocks[1]  # not the original's
    with torch.no_grad():
        clone.blocks[0].down.weight.add_(1.0)
    assert not torch.equal(clone.train()(ids), model.train()(ids))
    disable_checkpointing(model)
    assert not is_checkpointing(model)


def test_transformers_use_reentrant_false_does_not_keep_input_grad_hook(tiny_llama):
    model = enable_checkpointing(tiny_llama())
    assert not getattr(model, "_require_grads_hooks", None)
    model = enable_checkpointing(tiny_llama(), use_reentrant=True)
    assert getattr(model, "_require_grads_hooks", None)


def test_enable_checkpointing_bad_input():
    with pytest.raises(QLoRAError, match="no nn.ModuleList of >= 2 blocks.*accepted"):
        enable_checkpointing(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(QLoRAError, match="use_reentrant='no'"):
        enable_checkpointing(plain_net(), use_reentrant="no")
    with pytest.raises(QLoRAError, match="needs a torch.nn.Module"):
        enable_checkpointing([1, 2])


# ------------------------------------------------------------------------------------------
# prepare_for_training
# ------------------------------------------------------------------------------------------
@pytest.fixture
def quantized_llama(tiny_llama):
    pytest.importorskip("bitsandbytes")
    from qlora.quant import quantize_model

    def make(**overrides):
        model = tiny_llama(hidden_size=64, intermediate_size=128, **overrides).to(torch.bfloat16)
        return quantize_model(model, compute_dtype=torch.bfloat16)
    return make


def test_prepare_for_training_freezes_4bit_keeps_other_flags_and_dtypes(quantized_llama):
    from qlora.quant import is_linear4bit
    model = quantized_llama(mlp_bias=True)
    model.model.norm.weight.requires_grad_(False)       # caller's choice: kept
    model.lm_head.weight.requires_grad_(True)           # caller's choice: kept
    biased = [m for m in model.modules() if is_linear4bit(m) and m.bias is not None]
    assert biased  # the MLP projections
    for m in biased:
        m.bias.requires_grad_(True)                     # frozen by prepare_for_training
    dtypes = {n: p.dtype for n, p in model.named_parameters()}

    assert prepare_for_training(model) is model
    for name, m in model.named_modules():
        if is_linear4bit(m):
            assert not any(p.requires_grad for p in m.parameters()), name
    assert not model.model.norm.weight.requires_grad and model.lm_head.weight.requires_grad
    assert model.model.layers[0].input_layernorm.weight.requires_grad  # untouched default
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes   # no up-casts by default
    assert is_checkpointing(model)


def test_prepare_for_training_upcast_norms(quantized_llama, tiny_llama):
    model = quantized_llama(tie_word_embeddings=True)
    prepare_for_training(model, checkpointing=False, upcast_norms=True)
    assert not is_checkpointing(model)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[1].post_attention_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie kept
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.uint8 and q_proj.compute_dtype == torch.bfloat16


def test_checkpointing_through_4bit_layers_same_grads(ids):
    """Recompute through bitsandbytes Linear4bit gives the same grads (fp32 compute, frozen base)."""
    pytest.importorskip("bitsandbytes")
    from qlora.quant import quantize_model
    base = freeze_embedding(quantize_model(plain_net(), compute_dtype=torch.float32, skip_modules=["head"]))
    prepare_for_training(base, checkpointing=False)
    ckpt = prepare_for_training(copy.deepcopy(base))
    ref, got = loss_and_grads(base, ids), loss_and_grads(ckpt, ids)
    assert any(n.startswith("blocks.0.norm") for n in ref[1])  # trainable params inside the blocks
    assert_same(ref, got)


def test_prepare_for_training_bad_input():
    with pytest.raises(QLoRAError, match="checkpointing='yes' must be True or False"):
        prepare_for_training(plain_net(), checkpointing="yes")
    with pytest.raises(QLoRAError, match="needs a torch.nn.Module"):
        prepare_for_training(None)


# ------------------------------------------------------------------------------------------
# a subset of the blocks (speed for memory)
# ------------------------------------------------------------------------------------------
def test_subset_of_plain_blocks(ids):
    model = enable_checkpointing(plain_net(), blocks=2)
    patched = [isinstance(b.__dict__.get("forward"), CheckpointedForward) for b in model.blocks]
    assert patched == [True, True, False, False]
    enable_checkpointing(model, blocks=[1, 3])          # a list of indices; re-enabling re-chooses
    assert [isinstance(b.__dict__.get("forward"), CheckpointedForward) for b in model.blocks] == [
        False, True, False, True]
    ref = loss_and_grads(freeze_embedding(plain_net()), ids)
    assert_same(ref, loss_and_grads(freeze_embedding(model), ids))


def test_subset_of_transformers_layers_saves_in_between(tiny_llama, ids):
    """Saved bytes grow linearly with the blocks left out: all < 2 of 4 < none; same gradients."""
    def model(blocks):
        m = freeze_embedding(tiny_llama(num_hidden_layers=4))
        return m if blocks == "off" else enable_checkpointing(m, blocks=blocks)
    sizes = {b: saved_bytes(model(b), ids) for b in (None, 2, 0, "off")}
    assert sizes[None] < sizes[2] < sizes[0]
    assert sizes[0] == sizes["off"]                       # 0 blocks checkpointed = none
    per_block = (sizes[0] - sizes[None]) / 4
    assert abs((sizes[2] - sizes[None]) - 2 * per_block) <= 0.05 * per_block   # ~linear (tensors shared across blocks)
    layers = model(2).model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, True, False, False]
    assert_same(loss_and_grads(model("off"), ids), loss_and_grads(model(2), ids))


def test_subset_bad_input(tiny_llama):
    with pytest.raises(QLoRAError, match="blocks=5 must be between 0 and 4"):
        enable_checkpointing(plain_net(), blocks=5)
    with pytest.raises(QLoRAError, match="block index 2 out of range: the model has 2 blocks"):
        enable_checkpointing(tiny_llama(), blocks=[0, 2])
    with pytest.raises(QLoRAError, match="must be None"):
        prepare_for_training(tiny_llama(), checkpoint_blocks="half")
