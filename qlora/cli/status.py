"""The exit-status rules: which errors are the user's (one line, exit 2) and which are ours (exit 3)."""
from __future__ import annotations

import errno
import json
import sys

from memprofile.oom import is_out_of_memory
from qlora.errors import QLoRAError

REPORT_BUGS = "the qlora maintainers, with the command line, `qlora --version` and the traceback above"


def user_error_message(e: BaseException, args=None) -> str | None:
    """One line for an error caused by the user's input or environment, or None for a bug.

    QLoRAError is ours (the message is written for the user). Operating-system errors (a missing or
    unreadable file, a full disk, a read-only folder), out-of-memory and a config file that does not
    parse are the environment's, so they are named with the file and a fix."""
    if isinstance(e, QLoRAError):
        return str(e)
    if is_out_of_memory(e):             # torch's OutOfMemoryError, MemoryError, a RuntimeError saying so
        return (f"out of memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}); lower the batch size "
                "or sequence length, or see `qlora plan --help` for what fits")
    if isinstance(e, OSError):
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        fix = {errno.ENOENT: "check the path", errno.EACCES: "check its permissions or choose another folder",
               errno.EPERM: "check its permissions or choose another folder",
               errno.ENOSPC: "free some disk space or write elsewhere",
               errno.EROFS: "the file system is read-only: write elsewhere",
               errno.EISDIR: "give a file, not a folder", errno.ENOTDIR: "give a folder, not a file",
               errno.EEXIST: "a file of that name is in the way: move it or choose another path",
               errno.EDQUOT: "free some disk space or write elsewhere"}.get(e.errno, "check the path and the disk")
        if isinstance(e, ConnectionError):
            fix = "no network or the Hub is unreachable: give a local folder, or a bundled name (minilm, smollm2)"
        what = e.strerror or (str(e).splitlines() or [type(e).__name__])[0].rstrip(".")
        return f"{what}:{where}; {fix}" if where else f"{what}; {fix}"
    config = getattr(args, "config", None)
    yaml = sys.modules.get("yaml")          # only imported if a YAML file was read
    if yaml is not None and isinstance(e, yaml.YAMLError):
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return (f"{config or 'a YAML file'} is not valid YAML{at}: {getattr(e, 'problem', None) or e}; "
                "fix the file (quote values that hold ':' or '{')")
    if isinstance(e, json.JSONDecodeError):
        return f"a JSON file is not valid JSON ({e}); fix or replace the file"
    return None
