"""Is this layer quantized, and is it a linear layer at all? The checks, without importing bitsandbytes.

    is_4bit(module)          # a bitsandbytes Linear4bit (LinearNF4 / LinearFP4 included)
    is_quantized(module)     # 4-bit or bitsandbytes' 8-bit Linear8bitLt
    is_4bit_param(p)         # a packed Params4bit: a Linear4bit's weight or a 4-bit experts matrix
    has_4bit(model)          # any 4-bit layer or 4-bit parameter in it: a QLoRA model
    is_linear(module)        # nn.Linear (Linear4bit included) or transformers' Conv1D (GPT-2)
    runs_as_linear(module)   # it computes F.linear(x, weight, bias): it can become 4-bit and take LoRA
    linear_features(module)  # (in, out) of either
    is_transposed(module)    # its checkpoint weight is [in, out]: a Conv1D, or a Linear4bit made from one

A model can only hold bitsandbytes layers once bitsandbytes has been imported, so when it is not in
`sys.modules` the answer is False and the ~1 s import is never paid for the question; likewise
transformers' Conv1D.

Conv1D (GPT-2, GPT-J's ancestors, ...) is a linear layer y = x @ W + b whose weight is stored
[in, out], the transpose of nn.Linear's [out, in]. qlora treats it as a linear layer everywhere:
it is quantized from W.T into a Linear4bit (what transformers' bitsandbytes loader does, so both
paths give the same codes; the layer then records `source_cls = Conv1D`, transformers' own
attribute), LoRA wraps it with A [r, in] and B [out, r] (PEFT's `fan_in_fan_out=True` layout), and
merges and exports transpose s·B·A back to [in, out].
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memprofile.tensors import is_4bit_param  # the parameter-level rule's one home (duck-typed, no bitsandbytes)


def _bnb_nn():
    bnb = sys.modules.get("bitsandbytes")
    return getattr(bnb, "nn", None) if bnb is not None else None


def is_4bit(module) -> bool:
    """True for a bitsandbytes Linear4bit (LinearNF4 / LinearFP4 included), its weight quantized yet or not
    (is_4bit_param asks the weight)."""
    bnn = _bnb_nn()
    return bnn is not None and isinstance(module, bnn.Linear4bit)


def has_4bit(model: nn.Module) -> bool:
    """Whether `model` has a 4-bit base: a bitsandbytes Linear4bit (LinearNF4 / LinearFP4 included) or a
    packed Params4bit anywhere (a 4-bit experts matrix)."""
    return any(is_4bit(m) for m in model.modules()) or any(True for _ in four_bit_params(model))


def four_bit_params(model: nn.Module):
    """(module path, module, parameter name, Params4bit) for every 4-bit weight of `model`, each once."""
    seen = set()
    for path, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if is_4bit_param(p) and id(p) not in seen:
                seen.add(id(p))
                yield path, module, name, p


def is_quantized(module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit layer: a Linear4bit / Linear8bitLt, or any module holding
    a packed Params4bit / Int8Params of its own (bitsandbytes' Embedding4bit, ...)."""
    bnn = _bnb_nn()
    if bnn is None:
        return False
    return isinstance(module, (bnn.Linear4bit, bnn.Linear8bitLt)) or any(
        isinstance(p, (bnn.Params4bit, bnn.Int8Params)) for p in module.parameters(recurse=False))


def is_conv1d(module) -> bool:
    """True for transformers' Conv1D (weight [in, out], y = x @ W + b)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def is_linear(module) -> bool:
    """A linear layer qlora can quantize and adapt: nn.Linear (and subclasses: Linear4bit) or Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def runs_as_linear(module) -> bool:
    """Whether a linear layer computes x @ W.T + b from its weight as it is, so a Linear4bit (and a LoRA beside
    it) computes the same: nn.Linear and Conv1D do; an nn.Linear subclass with a forward of its own (a router
    returning scores and indices, DeepSeek-V4's grouped projection reading weight.view(groups, ...),
    Falcon's FalconLinear) does when a probe says so: its forward on a probe input and probe weights of the
    layer's shape gives F.linear's shape (on the meta device) and, for layers of up to 2^24 weights, F.linear's
    values. One rule for every such class: those that do not stay in float, without LoRA unless named."""
    cls = type(module)
    if is_conv1d(module) or not isinstance(module, nn.Linear) or cls.forward is nn.Linear.forward:
        return is_linear(module)
    plain = {k: v for k, v in module.__dict__.items() if not k.startswith("_")}
    cacheable = all(isinstance(v, (int, float, bool, str, type(None))) for v in plain.values()) and not module._buffers
    if not cacheable:            # its forward may read tensors or objects of its own: probe this instance
        return _probe_now(module)
    key = (cls, module.in_features, module.out_features, module.bias is not None, tuple(sorted(plain.items())))
    if key not in _PROBED:
        _PROBED[key] = _probe_now(module)
    return _PROBED[key]


_PROBED: dict = {}


def _probe_now(module) -> bool:
    n_in, n_out, bias = module.in_features, module.out_features, module.bias is not None
    with unset_fake_temporarily():     # the planner builds its models on fake tensors: probe with real ones
        return _same_as_linear(module, n_in, n_out, bias, "meta") and (
            n_in * n_out > 2 ** 24 or _same_as_linear(module, n_in, n_out, bias, "cpu"))


def _same_as_linear(module, n_in: int, n_out: int, bias: bool, device: str) -> bool:
    """The layer's own forward, on a shallow copy holding probe weights (the original is untouched), against
    F.linear, for a [3, in] and a [2, 3, in] input: equal wherever it runs, and it runs on at least one."""
    g = torch.Generator().manual_seed(0)
    make = (lambda *s: torch.empty(*s, device="meta")) if device == "meta" else (lambda *s: torch.randn(*s, generator=g))
    w, b = make(n_out, n_in), make(n_out) if bias else None
    probe = copy.copy(module)
    probe._parameters = {**module._parameters, "weight": w, "bias": b}
    ran = 0
    for x in (make(3, n_in), make(2, 3, n_in)):
        try:
            with torch.no_grad():
                got = type(module).forward(probe, x)
        except Exception:  # noqa: BLE001 -- a foreign forward that refuses this input shape: try the other
            continue
        want = torch.nn.functional.linear(x, w, b)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return False
        if device != "meta" and not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            return False
        ran += 1
    return ran > 0


def linear_features(module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a Linear4bit or a Conv1D."""
    if is_conv1d(module):
        return tuple(module.weight.shape)          # [in, out]
    return module.in_features, module.out_features


def is_transposed(module) -> bool:
    """Whether the checkpoint stores this layer's weight [in, out]: a Conv1D, or a Linear4bit made from
    one (by qlora.quant.convert or transformers' loader; the Linear4bit itself holds the [out, in] codes)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    if utils is None:
        return False
    source = getattr(module, "source_cls", None)
    return is_conv1d(module) or (isinstance(source, type) and issubclass(source, utils.Conv1D))
