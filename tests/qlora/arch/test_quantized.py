"""qlora.arch.quantized.runs_as_linear: one probe decides which nn.Linear subclasses with a forward of their own
can become 4-bit and take LoRA (those computing x @ W.T + b), with no list of classes.

    .venv/bin/python -m pytest -q tests/qlora/arch/test_quantized.py
"""
import pytest
import torch
from torch import nn

import qlora
from qlora.arch.quantized import runs_as_linear
from qlora.errors import QLoRAError


class Doubled(nn.Linear):
    """Same shapes as F.linear, other values: only the value probe tells."""

    def forward(self, x):
        return 2 * super().forward(x)


class Transposed(nn.Linear):
    """x @ W.T written out: the same as F.linear."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class Scores(nn.Linear):
    """A router: returns (scores, indices), not a Linear output."""

    def forward(self, x):
        scores = super().forward(x)
        return scores, scores.topk(1).indices


def test_the_probe():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4GroupedLinear
    from transformers.models.falcon.modeling_falcon import FalconLinear
    assert runs_as_linear(nn.Linear(8, 4)) and runs_as_linear(Transposed(8, 4)) and runs_as_linear(FalconLinear(8, 4))
    assert not runs_as_linear(Doubled(8, 4)) and not runs_as_linear(Scores(8, 4))
    assert not runs_as_linear(DeepseekV4GroupedLinear(8, 16, n_groups=2))        # reads weight.view(groups, ...)
    assert not runs_as_linear(nn.Embedding(4, 8)) and not runs_as_linear(nn.Conv2d(1, 1, 1))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain, self.doubled, self.same = nn.Linear(8, 8), Doubled(8, 8), Transposed(8, 8)

    def forward(self, x):
        return self.same(self.doubled(self.plain(x)))


def test_a_layer_with_a_forward_of_its_own_stays_float_and_out_of_all_linear():
    torch.manual_seed(0)
    model = qlora.quantize_model(Net(), compute_dtype=torch.float32)
    assert qlora.quant.is_4bit(model.plain) and qlora.quant.is_4bit(model.same)
    assert type(model.doubled) is Doubled                                       # its forward still runs
    qlora.add_lora(model, qlora.LoraConfig(r=2, target_modules="all-linear"))
    assert {n for n, _ in qlora.lora.lora_layers(model).items()} == {"plain", "same"}
    with pytest.raises(QLoRAError, match="'doubled' is a linear layer with a forward of its own .*LoRA cannot wrap it"):
        qlora.add_lora(Net(), qlora.LoraConfig(r=2, target_modules=["doubled"]))


def test_the_probe_gives_the_same_answer_under_fake_tensors():
    """The planner builds its models on fake tensors; the probe runs on real ones (a fake allclose would fail
    and call FalconLinear 'not linear': the plan would keep Falcon's body in 16 bits)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.models.falcon.modeling_falcon import FalconLinear
    with FakeTensorMode():
        assert runs_as_linear(FalconLinear(24, 40)) and not runs_as_linear(Doubled(24, 40))


class CallsSuper(nn.Linear):
    """A cast around nn.Linear's own forward (super() must work on the probe)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class Unpacks(nn.Linear):
    """Reads [batch, seq, dim] inputs only."""

    def forward(self, x):
        b, s, d = x.shape
        return super().forward(x.reshape(b * s, d)).reshape(b, s, -1)


class Scaled(nn.Linear):
    def __init__(self, n_in, n_out, scale):
        super().__init__(n_in, n_out)
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, x):
        return super().forward(x) * self.scale


def test_the_probe_on_super_calls_3d_inputs_and_buffers():
    assert runs_as_linear(CallsSuper(8, 4)) and runs_as_linear(Unpacks(8, 4))        # Unpacks runs on 3-D only
    assert runs_as_linear(Scaled(8, 4, 1.0)) and not runs_as_linear(Scaled(8, 4, 2.0))   # each instance probed
    layer = CallsSuper(8, 4)
    before = layer.weight.detach().clone()
    runs_as_linear(layer)
    assert torch.equal(layer.weight, before) and isinstance(layer.weight, nn.Parameter)   # the layer is untouched
