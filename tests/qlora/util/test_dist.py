"""qlora.util.dist: the one rank rule (qlora.fsdp's loader, the recipes' main process)."""
import pytest
import torch.distributed as dist

from qlora.util.dist import is_main_process, rank


def test_rank_from_the_launcher_then_from_the_process_group(monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    assert rank() == 0 and is_main_process()
    monkeypatch.setenv("RANK", "3")
    assert rank() == 3 and not is_main_process()
    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert rank() == 0 and is_main_process()       # the process group's rank wins over RANK
    finally:
        dist.destroy_process_group()
