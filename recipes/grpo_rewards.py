"""GRPO's reward functions: the user's (`path/to/file.py:function`, `module:function`) and a few built in.

    rewards = load_rewards(["exact_answer", "my_rewards.py:brevity"])        # [(name, function)]
    table = score(rewards, prompts, completions, completion_ids, columns)    # [rows, functions], NaN = None

A reward function has TRL's signature, `f(prompts, completions, completion_ids, **columns) -> list[float | None]`:
one value per completion (None: this function does not score that row), the data's other columns passed by
name (each a list aligned with the rows), conversational completions as message lists like TRL's. Built in:
  exact_answer   1.0 when the completion's last number (else its last word) equals the `answer` column
  format         1.0 when the completion matches the `format` column's regex (re.fullmatch, DOTALL), else 0.0
  length         -|words - target| / max(words, target) against the `length` column (or 20 words): in [-1, 0]
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Callable

from qlora.errors import QLoRAError

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _last_token(text: str) -> str:
    numbers = _NUMBER.findall(text.replace(",", ""))
    if numbers:
        return numbers[-1].rstrip("0").rstrip(".") if "." in numbers[-1] else numbers[-1]
    words = re.findall(r"\w+", text)
    return words[-1].lower() if words else ""


def exact_answer(prompts, completions, answer, **_) -> list[float]:
    return [float(_last_token(_text(c)) == _last_token(str(a))) for c, a in zip(completions, answer)]


def format(prompts, completions, format, **_) -> list[float]:      # noqa: A001 (the column's name)
    return [float(re.fullmatch(f, _text(c), re.DOTALL) is not None) for c, f in zip(completions, format)]


def length(prompts, completions, length=None, **_) -> list[float]:
    targets = length or [20] * len(completions)
    return [-abs(len(_text(c).split()) - t) / max(len(_text(c).split()), t, 1) for c, t in zip(completions, targets)]


BUILT_IN = {"exact_answer": exact_answer, "format": format, "length": length}


def load_rewards(specs: list[str]) -> list[tuple[str, Callable]]:
    """[(name, function)] of built-in names, `file.py:function` (relative to the working directory) or
    `module:function`; anything that does not resolve is one QLoRAError line."""
    if not specs:
        raise QLoRAError(f"rewards is empty: name at least one (built in: {', '.join(BUILT_IN)}; or file.py:function)")
    return [(spec.rsplit(":", 1)[-1], _resolve(spec)) for spec in specs]


def _resolve(spec: str) -> Callable:
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise QLoRAError(f"reward {spec!r}: use a built-in name ({', '.join(BUILT_IN)}), path/to/file.py:function "
                         "or module:function")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise QLoRAError(f"reward {spec!r}: no file {where} (paths are relative to the working directory)")
        unit = importlib.util.spec_from_file_location(f"qlora_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(unit)
        sys.modules[unit.name] = module
        unit.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise QLoRAError(f"reward {spec!r}: cannot import module {where!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise QLoRAError(f"reward {spec!r}: {where} has no function {name!r}")
    return fn


def score(rewards: list[tuple[str, Callable]], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list]) -> list[list[float]]:
    """[rows][functions] rewards (NaN where a function returned None); a function that raises, returns the
    wrong count or a non-number is one QLoRAError line naming it (and the row)."""
    table = [[math.nan] * len(rewards) for _ in completions]
    for j, (name, fn) in enumerate(rewards):
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except QLoRAError:
            raise
        except Exception as e:  # noqa: BLE001 (the user's code: one line naming it, not a traceback)
            raise QLoRAError(f"reward {name!r} raised {type(e).__name__}: {e} (on a batch of {len(completions)} "
                             f"completions; first prompt: {str(prompts[0])[:80]!r})") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise QLoRAError(f"reward {name!r} returned {got} values for {len(completions)} completions; it must "
                             "return a list with one float (or None) per completion")
        for i, v in enumerate(values):
            if v is None:
                continue
            if not isinstance(v, (int, float)) or math.isnan(float(v)):
                raise QLoRAError(f"reward {name!r} returned {v!r} for row {i} (prompt {str(prompts[i])[:80]!r}); "
                                 "use a float, or None to leave the row unscored")
            table[i][j] = float(v)
    return table
