r"""How a user's module names match module paths: the two rules qlora uses, in one place.

    matches_suffix("model.layers.0.self_attn.q_proj", ["q_proj"])      # True: a whole-part suffix
    matches_target("model.layers.0.self_attn.q_proj", r".*\.q_proj")   # a string is a full regex
    matches_parts("model.layers.3.mlp.down_proj", "mlp.down_proj")     # whole dotted parts, anywhere

- LoRA `target_modules` / `exclude_modules` / `modules_to_save` and head names (inject, modes,
  requantize): a list entry matches a path equal to it or ending in "." + it; a single string is a
  regular expression matched against the whole path (PEFT's rule).
- `skip_modules` of the 4-bit loaders (quant): a pattern matches whole dotted parts anywhere in the
  path ('layers.0' keeps every module of layer 0).
"""
from __future__ import annotations

import re


def matches_suffix(path: str, names) -> bool:
    """`path` equals one of `names` or ends with "." + one of them."""
    return any(path == n or path.endswith("." + n) for n in names)


def matches_target(path: str, spec) -> bool:
    """PEFT's target rule: a string is a regex over the whole path; a list, suffixes (matches_suffix)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return matches_suffix(path, spec)


def matches_parts(path: str, pattern: str) -> bool:
    """'mlp.down_proj' matches 'model.layers.3.mlp.down_proj': whole dotted parts, anywhere."""
    parts, pat = path.split("."), pattern.split(".")
    return any(parts[i:i + len(pat)] == pat for i in range(len(parts) - len(pat) + 1))
