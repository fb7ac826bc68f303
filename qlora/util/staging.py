"""Write under a temporary name beside the target, then rename: never a half-written target.

    tmp = staging_folder(out)            # out/../.out.tmp-<pid>, fresh; stale ones of dead processes removed
    ... write into tmp ...
    publish(tmp, out)                    # rename; a replaced `out` is removed only after
    atomic_write(path, lambda p: p.write_text(text))      # one file the same way

A killed process leaves its `.NAME.tmp-PID` (or `.NAME.old-PID`) behind; the next `staging_folder`
beside the same target removes those whose process no longer exists and says so, with their size
(a model-sized export leftover is worth knowing about). Files and folders get the permissions the
umask gives (tempfile.mkstemp/mkdtemp would make them private, 0600/0700): `umask_mode` / `make_public`.

    .venv/bin/python -m pytest -q tests/qlora/util/test_staging.py
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from memprofile.units import human
from qlora.errors import QLoRAError


def temp_name(target: Path, kind: str = "tmp", pid: int | None = None) -> Path:
    """`.NAME.tmp-PID` beside `target` (hidden, and the PID says whose it is)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{os.getpid() if pid is None else pid}")


def alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by someone else
        return True
    except OSError:
        return False


def size_of(path: Path) -> int:
    """Bytes of the files under `path` (or of the file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def stale_leftovers(target: Path) -> list[tuple[Path, int, bool]]:
    """(path, pid, process alive) of every `.NAME.tmp-PID` / `.NAME.old-PID` beside `target`
    (NAME may be a glob: `checkpoints/step-*` covers every checkpoint's)."""
    target = Path(target)
    found = []
    if not target.parent.is_dir():
        return found
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid():
                found.append((path, int(pid), alive(int(pid))))
    return found


def clean_stale(target: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the leftovers beside `target` of processes that no longer exist; name each (and its size)
    through `log` (default: stderr). Those of running processes are left and named too. Returns the
    removed paths."""
    log = log or (lambda line: print(line, file=sys.stderr))
    removed = []
    for path, pid, running in stale_leftovers(target):
        size = human(size_of(path), digits=1)
        if running:
            log(f"note: {path} ({size}) belongs to running process {pid}; left alone")
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if path.exists():
            log(f"note: could not remove {path} ({size}), left by process {pid} (no longer running); remove it")
        else:
            log(f"removed {path} ({size}), left by process {pid} that was killed while writing")
            removed.append(path)
    return removed


def umask_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (0o644 / 0o755 usually)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def make_public(path: Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the umask's default permissions."""
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            os.chmod(p, umask_mode(p.is_dir()))


def staging_folder(target: Path, log: Callable[[str], None] | None = None) -> Path:
    """A fresh, empty `.NAME.tmp-PID` folder beside `target` (parents created), after removing the
    stale leftovers of killed processes there."""
    target = Path(target)
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise QLoRAError(f"{blocking} is a file, so {target} cannot be created inside it; choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target, log)
    tmp = temp_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing `target` is moved aside first and removed only once the
    new one is in place (a crash in between leaves `.NAME.old-PID`, removed by the next run)."""
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.exists():
        old = temp_name(target, "old")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp_path)` then rename to `path`: readers never see a half-written file. The file gets
    the umask's permissions, whatever `write` created it with."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
