"""What is live at the moment of the peak (memprofile.composition): the categories add up to the peak, exactly on
CPU, and a model whose largest temporary is known by hand puts it in the right category, phase and block.

    .venv/bin/python -m pytest -q tests/memprofile/test_composition.py
"""
import pytest
import torch
from torch import nn

from memprofile.composition import AT_PEAK, describe
from memprofile.measure import measure_step
from memprofile.trace import trace_step

BIG = 2_000_000        # floats: an 8,000,000-byte temporary, far larger than anything else in the step


class Scratch(torch.autograd.Function):
    """Identity whose backward allocates a BIG-float buffer (a gradient of an activation, known by hand)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        buffer = grad.new_zeros(BIG)
        return grad + buffer[:1].sum()


class Block(nn.Module):
    def __init__(self, big_in: str):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.big_in = big_in

    def forward(self, x):
        x = self.lin(x)
        if self.big_in == "forward":               # made and dropped in forward: saved by no op
            x = x + torch.zeros(BIG, dtype=x.dtype, device=x.device).sum()
        if self.big_in == "backward":
            x = Scratch.apply(x)
        return x


class Net(nn.Module):
    def __init__(self, where: int, big_in: str):
        super().__init__()
        self.blocks = nn.ModuleList(Block(big_in if k == where else "") for k in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.square().mean()


def batch():
    return torch.randn(4, 16)


@pytest.mark.parametrize("big_in, kind", [("forward", "forward outputs not saved (logits, loss, ...)"),
                                          ("backward", "gradients of activations")])
@pytest.mark.parametrize("how", ["measured", "traced"])
def test_a_known_temporary_lands_in_its_category_phase_and_block(big_in, kind, how):
    torch.manual_seed(0)
    loss = lambda out, b: out                                   # noqa: E731 (the model returns its loss)
    if how == "measured":
        m = measure_step(Net(1, big_in), batch(), loss_fn=loss, timed_steps=0)
    else:
        m = trace_step(lambda: Net(1, big_in), batch, loss_fn=loss)
    assert set(m.at_peak) == set(AT_PEAK)
    assert sum(m.at_peak.values()) == m.peak                    # adds up, exactly (CPU allocator / the trace)
    assert m.at_peak["temporary"] >= BIG * 4 > m.peak - m.at_peak["temporary"]
    assert m.temporary_parts[kind] >= BIG * 4
    assert m.peak_phase.startswith(f"{big_in} of block 1 (blocks.1)"), m.peak_phase
    assert m.at_peak["weights_trainable"] == 3 * (16 * 16 + 16) * 4
    assert m.at_peak["optimizer"] == 2 * m.at_peak["weights_trainable"] + 3 * 2 * 4   # AdamW: 2 moments, steps


def test_measured_and_traced_compositions_agree_and_read_as_a_line():
    torch.manual_seed(0)
    loss = lambda out, b: out                                   # noqa: E731
    m = measure_step(Net(2, "backward"), batch(), loss_fn=loss, timed_steps=0)
    p = trace_step(lambda: Net(2, "backward"), batch, loss_fn=loss)
    assert m.at_peak == p.at_peak and m.peak_phase == p.peak_phase
    line = describe(m.at_peak, m.peak_phase, m.temporary_parts)
    assert line.startswith("at the peak (backward of block 2 (blocks.2)") and "largest: gradients of activations" in line


def test_gradients_and_activations_at_a_backward_peak():
    """A peak in the backward of block 0 comes after the gradients of blocks 1 and 2 were accumulated and what
    they saved was freed: the only saved tensor left is block 0's input, the batch (counted in inputs)."""
    torch.manual_seed(0)
    loss = lambda out, b: out                                   # noqa: E731
    m = measure_step(Net(0, "backward"), batch(), loss_fn=loss, timed_steps=0)
    assert m.peak_phase.startswith("backward of block 0 (blocks.0)")
    assert m.at_peak["gradients"] == 2 * (16 * 16 + 16) * 4     # blocks 1 and 2, not yet block 0
    assert m.at_peak["activations"] == 0 < m.activations and m.at_peak["inputs"] == 4 * 16 * 4


class Widen(nn.Module):
    """[4, 16] -> a [4, BIG / 4] tensor saved for backward (by the square), averaged back to [4, 16]."""

    def forward(self, x):
        wide = x.repeat(1, BIG // 4 // 16)
        return (wide * wide).mean(1, keepdim=True) + x


class CheckpointedNet(nn.Module):
    """Three blocks whose insides (Linear, Widen) run under non-reentrant checkpointing: in backward each block's
    forward runs again, and its BIG saved tensor is a recomputed activation at the peak."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), Widen()) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False)
        return x.square().mean()


@pytest.mark.parametrize("how", ["measured", "traced"])
def test_a_checkpointed_blocks_recompute_is_named(how):
    torch.manual_seed(0)
    loss = lambda out, b: out                                   # noqa: E731
    m = (measure_step(CheckpointedNet(), batch(), loss_fn=loss, timed_steps=0) if how == "measured" else
         trace_step(CheckpointedNet, batch, loss_fn=loss))
    assert sum(m.at_peak.values()) == m.peak
    assert m.peak_phase.startswith("backward of block"), m.peak_phase
    assert m.temporary_parts["recomputed activations"] >= BIG * 4 > m.at_peak["activations"]
