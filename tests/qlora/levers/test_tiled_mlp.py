"""qlora.levers.tiled_mlp: the MLP in sequence tiles gives the untiled outputs and gradients, with less memory.

fp32 on CPU, against the same module run untiled by plain autograd (the independent reference):
with LoRA adapters inside (dropout 0, and dropout > 0 against a per-tile reference drawing the same
masks), with bitsandbytes 4-bit layers, under checkpointing, and the peak measured by memprofile.
"""
from __future__ import annotations

import copy

import pytest
import torch

import qlora
from qlora.errors import QLoRAError
from qlora.levers.tiled_mlp import TiledMLP, tile_mlps, untile_mlps

pytestmark = pytest.mark.usefixtures("single_thread")


def lora_llama(tiny_llama, dropout=0.0, **cfg):
    model = tiny_llama(**cfg)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, p in model.named_parameters():          # non-zero B: the adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def mlp_out_and_grads(mlp, x, seed=0):
    """Output, d(loss)/dx and the trainable parameters' gradients of one MLP call."""
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    y = mlp(x)
    weights = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}
    mlp.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def assert_all_close(a, b):
    (ya, gxa, gpa), (yb, gxb, gpb) = a, b
    torch.testing.assert_close(yb, ya, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gxb, gxa, atol=1e-6, rtol=1e-5)
    assert gpa.keys() == gpb.keys() and gpa
    for k in gpa:
        assert gpa[k].abs().sum() > 0, k
        torch.testing.assert_close(gpb[k], gpa[k], atol=1e-6, rtol=1e-5, msg=k)


def tile_shapes(mlp):
    """Input shapes seen by the MLP's first Linear (to show the tiling really ran)."""
    seen = []
    first = next(m for m in mlp.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Linear4bit")
    first.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    return seen


def test_tiled_equals_untiled_with_lora(tiny_llama):
    model = lora_llama(tiny_llama)
    x = torch.randn(2, 21, 32, generator=torch.Generator().manual_seed(1))   # 42 tokens, tiles of 8 (+ 2)
    ref = mlp_out_and_grads(model.model.layers[0].mlp, x)
    assert tile_mlps(model, tile=8, min_tokens=0) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    mlp = model.model.layers[0].mlp
    seen = tile_shapes(mlp)
    got = mlp_out_and_grads(mlp, x)
    assert seen[:6] == [(1, 8, 32)] * 5 + [(1, 2, 32)]            # forward tiles, then the backward recompute
    assert len(seen) == 12
    assert_all_close(ref, got)


def test_dropout_masks_replayed_in_backward(tiny_llama):
    """With dropout, tiling draws its masks per tile: the reference is the same per-tile calls under plain
    autograd from the same seed. Wrong random state in the recompute would give other gradients."""
    model = lora_llama(tiny_llama, dropout=0.3)
    mlp = model.model.layers[1].mlp
    x = torch.randn(1, 30, 32, generator=torch.Generator().manual_seed(2))

    class PerTile(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.cat([self.inner(x[:, s:s + 8]) for s in range(0, x.shape[1], 8)], dim=1)
    ref = mlp_out_and_grads(PerTile(mlp), x, seed=5)
    tile_mlps(model, tile=8, min_tokens=0)
    got = mlp_out_and_grads(mlp, x, seed=5)
    assert_all_close((ref[0], ref[1], {k.removeprefix("inner."): v for k, v in ref[2].items()}), got)
    untiled = copy.deepcopy(mlp)
    untile_mlps(untiled)
    other = mlp_out_and_grads(untiled, x, seed=5)                 # one call draws other masks: must differ
    assert not torch.allclose(other[0], got[0])


def test_4bit_layers_inside_the_mlp(tiny_llama):
    pytest.importorskip("bitsandbytes")
    from qlora.quant import quantize_model
    model = quantize_model(tiny_llama(hidden_size=64, intermediate_size=128), compute_dtype=torch.float32)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    mlp = model.model.layers[0].mlp
    assert type(mlp.down_proj.base_layer).__name__ == "Linear4bit"
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(3))
    ref = mlp_out_and_grads(mlp, x)
    tile_mlps(model, tile=16, min_tokens=0)
    assert_all_close(ref, mlp_out_and_grads(mlp, x))


def test_whole_model_with_checkpointing_same_loss_and_grads(tiny_llama):
    ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(4))

    def loss_and_grads(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    ref = loss_and_grads(lora_llama(tiny_llama))
    model = lora_llama(tiny_llama)
    qlora.prepare_for_training(model)
    tile_mlps(model, tile=10, min_tokens=0)
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, ref[0], atol=1e-6, rtol=1e-6)
    for k in ref[1]:
        torch.testing.assert_close(grads[k], ref[1][k], atol=1e-6, rtol=1e-5, msg=k)


def test_below_min_tokens_and_no_grad_run_untiled(tiny_llama):
    model = lora_llama(tiny_llama)
    tile_mlps(model, tile=4, min_tokens=16)
    mlp = model.model.layers[0].mlp
    seen = tile_shapes(mlp)
    mlp(torch.randn(1, 16, 32))                       # 16 tokens: not above min_tokens
    with torch.no_grad():
        mlp(torch.randn(1, 40, 32))                   # no autograd: nothing to save, nothing to tile
    mlp(torch.randn(1, 17, 32))
    assert seen == [(1, 16, 32), (1, 40, 32)] + [(1, 4, 32)] * 4 + [(1, 1, 32)]
    assert isinstance(mlp.__dict__["forward"], TiledMLP)
    assert tile_mlps(model, tile=8, min_tokens=0) and mlp.forward.tile == 8       # re-tiling updates
    untile_mlps(model)
    assert "forward" not in mlp.__dict__
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in lora_llama(tiny_llama).named_parameters()}


def test_bad_input(tiny_llama):
    model = tiny_llama()
    with pytest.raises(QLoRAError, match="tile=0 must be an integer >= 1"):
        tile_mlps(model, tile=0)
    with pytest.raises(QLoRAError, match="'ffn' matches no module"):
        tile_mlps(model, names=("ffn",))


def test_peak_memory_drops_by_the_intermediates(tiny_llama):
    """memprofile's exact CPU peak of a step through one wide MLP: untiled, the step holds gate, up,
    act(gate) and their product [N, I] (and their gradients in backward); tiled, one tile's."""
    from memprofile.measure import measure_step
    hidden, inter, tokens, tile = 32, 1024, 2048, 128
    model = lora_llama(tiny_llama, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, tokens, hidden)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x).square().mean()

    def peak():
        return measure_step(Step(), x, loss_fn=lambda out, b: out, warmup_steps=1, timed_steps=0).peak
    untiled = peak()
    tile_mlps(model, tile=tile, min_tokens=0)
    tiled = peak()
    intermediate = tokens * inter * 4                                # one [N, I] fp32 tensor: 8 MiB
    print(f"peak MiB untiled {untiled / 2**20:.1f}, tiled {tiled / 2**20:.1f}")
    assert untiled - tiled > 3 * intermediate, (untiled / 2**20, tiled / 2**20)
    assert tiled < untiled / 3


def test_falcon_adds_into_the_tiled_output():
    """Falcon's block adds the attention output into the MLP's output in place (`mlp_output +=`):
    the tiled output must be a tensor of its own, not a view made inside the autograd Function."""
    from transformers import FalconConfig, FalconForCausalLM
    cfg = FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
                       new_decoder_architecture=True, num_kv_heads=2)
    ids = torch.randint(1, 64, (2, 24), generator=torch.Generator().manual_seed(5))

    def loss_and_grads(tiled):
        torch.manual_seed(0)
        model = FalconForCausalLM(cfg)
        qlora.add_lora(model, qlora.LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        model.train()
        if tiled:
            assert tile_mlps(model, tile=10, min_tokens=0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    ref, tiled = loss_and_grads(False), loss_and_grads(True)
    torch.testing.assert_close(tiled[0], ref[0], atol=1e-6, rtol=1e-6)
    for k in ref[1]:
        torch.testing.assert_close(tiled[1][k], ref[1][k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_moe_blocks_tile_or_run_as_they_are(family):
    """A MoE block is token-wise: tiled (4-bit experts, LoRA on every expert), loss and gradients are the
    untiled ones. gpt-oss' block also returns its router scores: it runs untiled, with the same results."""
    import copy

    import qlora
    from qlora.levers.tiled_mlp import TiledMLP, tile_mlps
    from tests.qlora.quant.test_experts import tiny_moe
    model = tiny_moe(family)
    qlora.quantize_model(model, compute_dtype=torch.float32)
    qlora.add_lora(model, qlora.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    tiled = copy.deepcopy(model)
    tile_mlps(tiled, tile=4, min_tokens=4)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (model, tiled):
        m.train()
        loss = qlora.causal_lm_loss(m, ids, ids)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    for a, b in zip(model.parameters(), tiled.parameters()):
        if a.requires_grad and a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    forwards = [m.__dict__["forward"] for m in tiled.modules() if isinstance(m.__dict__.get("forward"), TiledMLP)]
    assert forwards and all(f.not_tileable == (family == "gpt_oss") for f in forwards)
