"""qlora.util.dtypes.resolve_dtype: the one meaning of the compute dtype "auto" (RunSettings, the recipes)."""
import pytest
import torch

from qlora.errors import QLoRAError
from qlora.util.dtypes import resolve_dtype


def test_auto_is_bf16_on_cuda_and_fp32_elsewhere(monkeypatch):
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda", 1)) is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32
    for available, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert resolve_dtype("auto") is dtype                  # no device: CUDA when there is one
    assert resolve_dtype("fp16", "cuda") is torch.float16 and resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(QLoRAError, match="int8"):
        resolve_dtype("int8")


def test_run_settings_resolve_auto_for_their_device():
    from qlora.plan.settings import RunSettings
    assert RunSettings(device="cuda").dtype is torch.bfloat16 and RunSettings(device="cpu").dtype is torch.float32
    assert RunSettings(device="cpu", compute_dtype="bf16").dtype is torch.bfloat16
    with pytest.raises(QLoRAError, match="int8"):
        RunSettings(compute_dtype="int8")
