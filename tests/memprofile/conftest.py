"""memprofile tests run single-threaded: the CPU is shared, and per-thread kernel scratch
(flash attention) then matches the estimator's default exactly."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for mp_models


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
