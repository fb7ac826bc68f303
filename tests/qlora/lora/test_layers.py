"""LoRA layers against hand-computed references: LoRALinear, LoRAEmbedding, LoRAConv2d, ModulesToSave.

Every expected value is computed here with plain torch ops from the layer's own tensors:
    Linear:    base(x) + s · x @ A.T @ B.T
    Embedding: base(ids) + s · A.T[ids] @ B.T
    Conv2d:    base(x) + s · conv1x1(conv(x, A, stride, padding, dilation), B)
with s = alpha / r (rsLoRA: alpha / sqrt(r)).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlora import LoraConfig, LoRAConv2d, LoRAEmbedding, LoRALinear, QLoRAError
from qlora.lora.layers import ModulesToSave, lora_class_for

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5


def _randomise(layer) -> None:
    """Non-zero B (a fresh adapter has B = 0, which would make every formula test trivially pass)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _linear(in_f=12, out_f=10, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


# ---------------------------------------------------------------- hand-computed forward

@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_matches_formula(bias):
    base = _linear(bias=bias)
    layer = LoRALinear(base, r=4, lora_alpha=12)
    _randomise(layer)
    x = torch.randn(3, 5, 12)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (4, 12) and B.shape == (10, 4)
    s = 12 / 4
    expected = (x @ base.weight.T + (base.bias if bias else 0)) + s * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    # the update is not negligible, so the comparison above really checks the adapter path
    assert (layer(x) - base(x)).abs().max() > 0.1


def test_embedding_forward_matches_formula():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = LoRAEmbedding(base, r=3, lora_alpha=5)
    _randomise(layer)
    ids = torch.tensor([[0, 3, 19, 3], [7, 7, 1, 0]])
    A, B = layer.lora_embedding_A, layer.lora_embedding_B
    assert A.shape == (3, 20) and B.shape == (6, 3)
    s = 5 / 3
    expected = base.weight[ids] + s * (A.T[ids] @ B.T)
    torch.testing.assert_close(layer(ids), expected, atol=ATOL, rtol=0)
    assert (layer(ids) - base(ids)).abs().max() > 0.1


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 0, 1), (2, 2, 1, 2), (4, 4, 0, 1)])
def test_conv2d_forward_matches_formula(kernel, stride, padding, dilation):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    layer = LoRAConv2d(base, r=2, lora_alpha=3)
    _randomise(layer)
    x = torch.randn(2, 3, 9, 9)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (2, 3, kernel, kernel) and B.shape == (5, 2, 1, 1)
    s = 3 / 2
    base_out = F.conv2d(x, base.weight, base.bias, stride=stride, padding=padding, dilation=dilation)
    low = F.conv2d(x, A, stride=stride, padding=padding, dilation=dilation)      # [b, r, h', w']
    expected = base_out + s * F.conv2d(low, B)                                     # 1x1 conv r -> out
    out = layer(x)
    assert out.shape == base_out.shape
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert (out - base_out).abs().max() > 0.1


def test_conv2d_refuses_grouped_conv():
    base = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(QLoRAError, match="groups=2"):
        LoRAConv2d(base, r=2, lora_alpha=2)


# ---------------------------------------------------------------- scaling

@pytest.mark.parametrize("r,alpha", [(16, 8), (4, 32), (1, 2)])
def test_rslora_scaling(r, alpha):
    plain = LoRALinear(_linear(), r=r, lora_alpha=alpha)
    rs = LoRALinear(_linear(), r=r, lora_alpha=alpha, use_rslora=True)
    assert plain.scaling == pytest.approx(alpha / r)
    assert rs.scaling == pytest.approx(alpha / math.sqrt(r))
    assert LoraConfig(r=r, lora_alpha=alpha, target_modules=["x"]).scaling == pytest.approx(alpha / r)
    assert LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, target_modules=["x"]).scaling == \
        pytest.approx(alpha / math.sqrt(r))
    # the forward pass uses the rsLoRA scale, not alpha / r
    _randomise(rs)
    x = torch.randn(4, 12)
    A, B = rs.lora_A.weight, rs.lora_B.weight
    expected = rs.base_layer(x) + alpha / math.sqrt(r) * (x @ A.T @ B.T)
    torch.testing.assert_close(rs(x), expected, atol=ATOL, rtol=0)
    if r > 1:
        wrong = rs.base_layer(x) + alpha / r * (x @ A.T @ B.T)
        assert not torch.allclose(rs(x), wrong, atol=1e-3)


@pytest.mark.parametrize("cls,base", [
    (LoRAEmbedding, lambda: nn.Embedding(10, 4)),
    (LoRAConv2d, lambda: nn.Conv2d(2, 3, 3)),
])
def test_rslora_scaling_other_layers(cls, base):
    assert cls(base(), r=9, lora_alpha=6, use_rslora=True).scaling == pytest.approx(2.0)
    assert cls(base(), r=9, lora_alpha=6).scaling == pytest.approx(6 / 9)


# ---------------------------------------------------------------- dropout

def test_dropout_only_in_training_and_only_on_adapter_input():
    d = 64
    torch.manual_seed(0)
    base = nn.Linear(d, d)
    layer = LoRALinear(base, r=d, lora_alpha=d, lora_dropout=0.5)   # s = 1
    with torch.no_grad():                                           # A = B = I: update == dropout(x)
        layer.lora_A.weight.copy_(torch.eye(d))
        layer.lora_B.weight.copy_(torch.eye(d))
    x = torch.randn(8, d) + 3.0                                     # no zeros in x
    base_out = base(x)

    layer.eval()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1 - base_out, x, atol=ATOL, rtol=0)   # no dropout in eval

    layer.train()
    t1, t2 = layer(x), layer(x)
    assert not torch.equal(t1, t2)
    for t in (t1, t2):
        update = t - base_out            # the base path is intact: what remains is dropout(x)
        kept = (update - 2 * x).abs() < 1e-4       # inverted dropout: kept entries are x / (1 - p)
        dropped = update.abs() < 1e-4
        assert bool((kept | dropped).all()), "the update must be exactly dropout(x) with p=0.5"
        frac = dropped.float().mean().item()
        assert 0.3 < frac < 0.7


def test_no_dropout_module_when_p_is_zero():
    layer = LoRALinear(_linear(), r=2, lora_alpha=2, lora_dropout=0.0)
    assert isinstance(layer.lora_dropout, nn.Identity)
    _randomise(layer)
    layer.train()
    x = torch.randn(5, 12)
    assert torch.equal(layer(x), layer(x))


# ---------------------------------------------------------------- init, merge, unmerge

@pytest.mark.parametrize("make", [
    lambda: LoRALinear(_linear(), r=4, lora_alpha=8),
    lambda: LoRAEmbedding(nn.Embedding(20, 6), r=4, lora_alpha=8),
    lambda: LoRAConv2d(nn.Conv2d(3, 5, 3, padding=1), r=4, lora_alpha=8),
], ids=["linear", "embedding", "conv2d"])
def test_fresh_adapter_changes_nothing_and_merge_matches_delta(make):
    layer = make()
    x = torch.randint(0, 20, (2, 5)) if isinstance(layer, LoRAEmbedding) else (
        torch.randn(2, 3, 8, 8) if isinstance(layer, LoRAConv2d) else torch.randn(2, 12))
    assert torch.equal(layer(x), layer.base_layer(x))          # B = 0 at init
    _randomise(layer)
    w0 = layer.base_layer.weight.detach().clone()
    before = layer(x)

    # delta_weight equals s·B·A computed here, reshaped like the base weight
    s = layer.scaling
    if isinstance(layer, LoRAEmbedding):
        delta = s * (layer.lora_embedding_B @ layer.lora_embedding_A).T
    elif isinstance(layer, LoRAConv2d):
        a, b = layer.lora_A.weight, layer.lora_B.weight
        delta = s * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    else:
        delta = s * layer.lora_B.weight @ layer.lora_A.weight
    assert delta.shape == w0.shape

    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0 + delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=ATOL, rtol=0)
    w_merged = layer.base_layer.weight.detach().clone()
    layer.merge()                                               # idempotent
    assert torch.equal(layer.base_layer.weight, w_merged)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    w_unmerged = layer.base_layer.weight.detach().clone()
    layer.unmerge()                                             # idempotent
    assert torch.equal(layer.base_layer.weight, w_unmerged)
    torch.testing.assert_close(layer(x), before, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_merge_refuses_non_finite(bad):
    layer = LoRALinear(_linear(), r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_B.weight.fill_(bad)
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(QLoRAError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w0)
    assert not layer.merged


def test_embedding_init_is_peft_s_and_leaves_unseen_tokens_alone():
    """Embedding adapters start with A = 0, B random (PEFT's and loralib's choice): after training on
    some tokens, every other token's update is still exactly zero."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    torch.manual_seed(0)
    peft_layer = get_peft_model(nn.Sequential(nn.Embedding(50, 8)),
                                PeftLoraConfig(r=4, lora_alpha=4, target_modules=["0"]))
    ours = LoRAEmbedding(nn.Embedding(50, 8), r=4, lora_alpha=4)
    for A, B in ((peft_layer.base_model.model[0].lora_embedding_A["default"],
                  peft_layer.base_model.model[0].lora_embedding_B["default"]),
                 (ours.lora_embedding_A, ours.lora_embedding_B)):
        assert torch.count_nonzero(A) == 0 and torch.count_nonzero(B) == B.numel()
    opt = torch.optim.AdamW([ours.lora_embedding_A, ours.lora_embedding_B], lr=1e-2)
    seen = torch.tensor([[3, 7, 7, 11]])
    for _ in range(3):
        opt.zero_grad()
        ours(seen).square().sum().backward()
        opt.step()
    delta = ours.delta_weight()                                     # [50, 8]
    moved = delta.abs().sum(-1) > 0
    assert moved.nonzero().flatten().tolist() == [3, 7, 11]


def test_gaussian_and_false_init():
    torch.manual_seed(0)
    g = LoRALinear(nn.Linear(256, 256), r=8, lora_alpha=8, init_lora_weights="gaussian")
    assert g.lora_A.weight.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert torch.count_nonzero(g.lora_B.weight) == 0
    f = LoRALinear(nn.Linear(16, 16), r=4, lora_alpha=8, init_lora_weights=False)
    assert torch.count_nonzero(f.lora_B.weight) == f.lora_B.weight.numel()
    x = torch.randn(2, 16)
    assert not torch.allclose(f(x), f.base_layer(x))


def test_adapter_dtype_follows_base_or_config():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    assert LoRALinear(base, r=2, lora_alpha=2).lora_A.weight.dtype == torch.bfloat16
    layer = LoRALinear(nn.Linear(8, 8), r=2, lora_alpha=2, dtype=torch.bfloat16)
    assert layer.lora_B.weight.dtype == torch.bfloat16
    x = torch.randn(3, 8)
    assert layer(x).dtype == torch.float32     # output keeps the base's dtype


def test_wrapper_forwards_attributes_to_base():
    base = _linear()
    layer = LoRALinear(base, r=2, lora_alpha=2)
    assert layer.weight is base.weight
    assert (layer.in_features, layer.out_features) == (12, 10)
    with pytest.raises(AttributeError):
        layer.no_such_attribute


def test_lora_class_for():
    class MyLinear(nn.Linear):
        pass
    assert lora_class_for(nn.Linear(2, 2)) is LoRALinear
    assert lora_class_for(MyLinear(2, 2)) is LoRALinear
    assert lora_class_for(nn.Embedding(3, 2)) is LoRAEmbedding
    assert lora_class_for(nn.Conv2d(1, 1, 1)) is LoRAConv2d
    assert lora_class_for(nn.LayerNorm(3)) is None
    assert lora_class_for(nn.Conv1d(1, 1, 1)) is None


def test_modules_to_save_uses_trainable_copy():
    base = _linear()
    w0 = base.weight.detach().clone()
    m = ModulesToSave(base)
    assert m.original_module is base and m.modules_to_save is not base
    assert all(not p.requires_grad for p in m.original_module.parameters())
    assert all(p.requires_grad for p in m.modules_to_save.parameters())
    with torch.no_grad():
        m.modules_to_save.weight.add_(1.0)
    x = torch.randn(2, 12)
    torch.testing.assert_close(m(x), F.linear(x, w0 + 1.0, base.bias), atol=ATOL, rtol=0)
    assert torch.equal(base.weight, w0)        # the original is untouched
    m.use_original = True
    assert torch.equal(m(x), base(x))


def test_merge_refuses_fp16_overflow():
    """W + s·B·A is finite in fp32 but overflows fp16 (max 65504): refused, nothing changed."""
    base = nn.Linear(2, 2, bias=False).half()
    with torch.no_grad():
        base.weight.fill_(60000.0)
    layer = LoRALinear(base, r=1, lora_alpha=1)
    with torch.no_grad():
        layer.lora_A.weight.fill_(100.0)
        layer.lora_B.weight.fill_(100.0)                  # delta = 10000 per entry
    w0 = base.weight.detach().clone()
    with pytest.raises(QLoRAError, match="non-finite"):
        layer.merge()
    assert torch.equal(base.weight, w0) and not layer.merged


def test_merge_refuses_4bit_base():
    """A bitsandbytes Linear4bit: merging in place would re-quantize, so it is refused."""
    from qlora.quant import make_linear4bit
    base = make_linear4bit(nn.Linear(64, 64))
    layer = lora_class_for(base)(base, r=2, lora_alpha=2)
    assert isinstance(layer, LoRALinear)
    assert layer.lora_A.weight.dtype == torch.bfloat16       # adapters on a 4-bit base default to bf16
    w0 = base.weight.detach().clone()
    with pytest.raises(QLoRAError, match="4-bit"):
        layer.merge()
    with pytest.raises(QLoRAError, match="4-bit"):
        layer.check_merge()
    assert torch.equal(base.weight, w0) and not layer.merged


def _saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> tuple[int, list]:
    """Bytes autograd saves for backward in module(x), each storage once, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(n for ptr, n in storages.items() if ptr not in params), saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("four_bit", [False, True])
def test_lora_linear_saves_its_input_once_and_the_rank_r_activation(dtype, four_bit):
    # Frozen base + adapter: backward needs x (for dA) and A(x) (for dB); the frozen base needs
    # neither (its weight has no gradient), so the step should keep x once, in the adapter's dtype.
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(256, 512, bias=False, dtype=dtype)

        def forward(self, x):
            return self.proj(x)
    model = Holder()
    if four_bit:
        from qlora.quant import quantize_model
        quantize_model(model, compute_dtype=dtype)
    model.proj.requires_grad_(False)
    model.proj = LoRALinear(model.proj, r=8, lora_alpha=8, dtype=dtype)
    x = torch.randn(4, 64, 256, dtype=dtype, requires_grad=True)
    nbytes, saved = _saved_activation_bytes(model, x)
    element = torch.finfo(dtype).bits // 8
    assert nbytes == (4 * 64 * 256 + 4 * 64 * 8) * element, [(tuple(t.shape), t.dtype) for t in saved]
