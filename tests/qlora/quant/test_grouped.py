"""The grouped experts path (qlora.quant.grouped, qlora.quant.experts, qlora.lora.experts): same numbers as a
loop over experts, no host synchronisation inside a MoE layer.

    .venv/bin/python -m pytest -q tests/qlora/quant/test_grouped.py      (~30 s)

References: a Python loop of plain matmuls over the groups (the primitive), and transformers' own experts
forward ("eager") on bitsandbytes-dequantized weights plus the LoRA update s·B_e·A_e as a differentiable
weight (every family: forward, and gradients of the input and of both LoRA matrices, fp32 1e-5).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qlora
from qlora.arch.experts import expert_weight_names, is_experts_module
from qlora.quant import experts as qe
from qlora.quant import grouped
from qlora.quant.experts import dequantize_experts
from qlora.quant.grouped import group_ends, grouped_mm
from tests.qlora.quant.test_experts import FAMILIES, MORE_FAMILIES, tiny_moe

pytestmark = pytest.mark.usefixtures("single_thread")


def loop_reference(a, b, ids):
    return torch.cat([a[ids == g] @ b[g] for g in range(b.shape[0])])


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype,K,N", [(torch.float32, 32, 24), (torch.float32, 6, 5), (torch.bfloat16, 12, 4)])
def test_grouped_mm_is_a_loop_over_groups(dtype, K, N, native, monkeypatch):
    """Forward and both gradients; odd widths (zero-padded to 16 bytes inside the op) and empty groups;
    torch's kernel and the fallback loop."""
    if not native:
        monkeypatch.setattr(grouped, "_NATIVE", None)
    torch.manual_seed(0)
    G = 5
    ids = torch.sort(torch.randint(0, G - 2, (13,)))[0]          # groups 3 and 4 get no rows
    a = torch.randn(13, K, dtype=dtype, requires_grad=True)
    b = torch.randn(G, K, N, dtype=dtype, requires_grad=True)
    y = grouped_mm(a, b, group_ends(ids, G))
    dy = torch.randn_like(y)
    y.backward(dy)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y2 = loop_reference(a2, b2, ids)
    y2.backward(dy)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y2, **tol)
    torch.testing.assert_close(a.grad, a2.grad, **tol)
    torch.testing.assert_close(b.grad, b2.grad, **tol)
    assert b.grad[3:].abs().max() == 0                           # empty groups: zero gradient, not garbage


def adapted_layer(family: str):
    """The first experts module of a 4-bit tiny model with LoRA (non-zero B) on its matrices, and inputs that
    leave the last expert without tokens."""
    model = tiny_moe(family)
    qlora.quantize_model(model, compute_dtype=torch.float32)
    qlora.add_lora(model, qlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    experts = next(m for m in model.modules() if is_experts_module(m))
    up = expert_weight_names(experts)[0]
    hidden = experts.expert_deltas[up].lora_A.shape[2]
    torch.manual_seed(1)
    T, K, E = 7, 2, experts.num_experts
    idx = torch.stack([torch.randperm(E - 1)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K), -1)
    return experts, torch.randn(T, hidden), idx, w


def transformers_reference(experts):
    """A copy running transformers' own experts forward on W_e + s·B_e·A_e, with A and B as new leaves."""
    ref = copy.deepcopy(experts)
    ref.__dict__.pop("forward")
    layers = ref.expert_deltas
    del ref.expert_deltas
    ref.config = copy.copy(ref.config)
    ref.config._experts_implementation = "eager"
    leaves = {}
    for name in expert_weight_names(ref):
        lora = layers[name]
        A = lora.lora_A.detach().clone().requires_grad_()
        B = lora.lora_B.detach().clone().requires_grad_()
        delta = torch.einsum("eor,eri->eoi", B, A) * lora.scaling
        w = dequantize_experts(experts.get_parameter(name)) + (delta.transpose(1, 2) if ref.is_transposed else delta)
        del ref._parameters[name]
        setattr(ref, name, w)
        leaves[name] = (A, B)
    return ref, leaves


@pytest.mark.parametrize("family", list(FAMILIES) + list(MORE_FAMILIES))
def test_grouped_experts_with_lora_equal_transformers_forward_and_gradients(family):
    experts, x, idx, w = adapted_layer(family)
    x1 = x.clone().requires_grad_()
    y = experts(x1, idx, w)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref, leaves = transformers_reference(experts)
    x2 = x.clone().requires_grad_()
    y2 = ref(x2, idx, w)
    y2.backward(dy)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for name, (A, B) in leaves.items():
        lora = experts.expert_deltas[name]
        torch.testing.assert_close(lora.lora_A.grad, A.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora.lora_B.grad, B.grad, rtol=1e-5, atol=1e-5)
        assert lora.lora_B.grad[-1].abs().max() == 0 and lora.lora_B.grad[:-1].abs().max() > 0


def test_a_layer_is_dequantized_at_once_or_in_groups_with_the_same_numbers(monkeypatch):
    experts, x, idx, w = adapted_layer("qwen3_moe")
    E = experts.num_experts
    seen = []
    real = qe.dequantize_codes
    monkeypatch.setattr(qe, "dequantize_codes", lambda c, qs, lo=0, hi=None: seen.append((lo, hi)) or real(c, qs, lo, hi))
    x1 = x.clone().requires_grad_()
    experts(x1, idx, w).sum().backward()
    assert experts.qlora_chunk_experts == E and set(seen) == {(0, E)}     # the whole layer's matrix, once per use
    seen.clear()
    experts.qlora_chunk_experts = 3                  # a layer above CHUNK_BYTES: groups of 3 experts
    x2 = x.clone().requires_grad_()
    grads = {n: experts.expert_deltas[n].lora_B.grad.clone() for n in experts.expert_deltas}
    experts.zero_grad()
    y2 = experts(x2, idx, w)
    y2.sum().backward()
    assert set(seen) == {(0, 3), (3, 6), (6, 8)}
    experts.qlora_chunk_experts = E
    torch.testing.assert_close(y2, experts(x.clone(), idx, w), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(experts.expert_deltas[n].lora_B.grad, g, rtol=1e-6, atol=1e-6)


class HostSyncs(TorchDispatchMode):
    """Ops that make the host wait for the device: `.item()` / `bool()` / `int()` (_local_scalar_dense) and
    ops whose output shape depends on values (nonzero, bincount, unique, masked_select, indexing by a mask;
    indexing by integers is tagged so too but is not)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tags = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
        by_integers = func is torch.ops.aten.index.Tensor and all(
            i is None or i.dtype != torch.bool for i in args[1])
        if any(t in func.tags for t in tags) and not by_integers:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_a_moe_layer_never_waits_on_the_host(family):
    """Counted on real tensors (the dispatcher's ops), and on fake tensors, where anything reading values
    on the host (`.tolist()`, which the dispatcher does not see, included) raises."""
    experts, x, idx, w = adapted_layer(family)
    x = x.requires_grad_()
    with HostSyncs() as syncs:
        experts(x, idx, w).sum().backward()
    assert syncs.ops == []
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x.detach()).requires_grad_()
        fidx, fw = mode.from_tensor(idx), mode.from_tensor(w)
        experts(fx, fidx, fw).sum().backward()
    assert fx.grad is not None and fx.grad.shape == x.shape
