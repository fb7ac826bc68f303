"""qlora.util.staging: temp-then-rename writes, stale leftovers of killed processes, umask permissions.

    .venv/bin/python -m pytest -q tests/qlora/util/test_staging.py      (< 2 s)
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from qlora.util.staging import atomic_write, clean_stale, make_public, publish, staging_folder, temp_name


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()                         # reaped: the pid names no process now
    return proc.pid


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_keeps_the_umask_permissions(tmp_path, umask_027):
    import tempfile
    target = tmp_path / "report.json"

    def via_mkstemp(p):                  # what memprofile's writer did: mkstemp makes files 0600
        fd, name = tempfile.mkstemp(dir=tmp_path)
        os.close(fd)
        os.replace(name, p)
    atomic_write(target, via_mkstemp)
    assert _mode(target) == 0o640        # 0o666 & ~0o027, as open() would have made it
    atomic_write(target, lambda p: p.write_text("{}"))
    assert target.read_text() == "{}" and _mode(target) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_failed_write_leaves_neither_temp_nor_target(tmp_path):
    def boom(p):
        p.write_text("half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.json", boom)
    assert list(tmp_path.iterdir()) == []


def test_staging_removes_dead_leftovers_names_them_and_keeps_live_ones(tmp_path):
    out = tmp_path / "out"
    dead = temp_name(out, pid=_dead_pid())
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"\0" * 3000)
    old = temp_name(out, "old", pid=_dead_pid())
    old.mkdir()
    live = temp_name(out, pid=os.getppid())          # the parent process: alive
    live.mkdir()
    other = tmp_path / ".other.tmp-1"                # another target's: not ours to touch
    other.mkdir()
    lines = []
    tmp = staging_folder(out, log=lines.append)
    assert tmp == temp_name(out) and tmp.is_dir() and not any(tmp.iterdir())
    assert not dead.exists() and not old.exists() and live.exists() and other.exists()
    assert any(str(dead) in line and "2.9 KiB" in line and "removed" in line for line in lines), lines
    assert any(str(live) in line and "running" in line for line in lines), lines
    publish(tmp, out)
    assert out.is_dir() and not tmp.exists()


def test_publish_replaces_and_glob_cleans_every_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    for step in (6, 8):
        temp_name(root / f"step-{step:07d}", pid=_dead_pid()).mkdir()
    assert len(clean_stale(root / "step-*", log=lambda line: None)) == 2
    assert list(root.iterdir()) == []
    target = root / "step-0000002"
    target.mkdir()
    (target / "a").write_text("old")
    new = staging_folder(target)
    (new / "a").write_text("new")
    publish(new, target)
    assert (target / "a").read_text() == "new" and sorted(p.name for p in root.iterdir()) == ["step-0000002"]


def test_make_public_undoes_mkdtemp_privacy(tmp_path, umask_027):
    import tempfile
    folder = tempfile.mkdtemp(dir=tmp_path)
    fd, name = tempfile.mkstemp(dir=folder)
    os.close(fd)
    assert _mode(folder) == 0o700 and _mode(name) == 0o600
    make_public(folder)
    assert _mode(folder) == 0o750 and _mode(name) == 0o640
