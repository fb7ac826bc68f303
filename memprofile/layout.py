"""What a model holds, from its config alone: parameters, buffers and Linear layers by name.

    lay = layout(config)            # config: PretrainedConfig, dict, or path to config.json / folder
    lay.params["model.layers.3.mlp.up_proj.weight"]   # ParamInfo(shape, dtype, canonical name)
    lay.linears["model.layers.3.mlp.up_proj"]          # LinearInfo(fin, fout, bias)
    lay.head                                           # ["lm_head"] / ["classifier"]

The model is built on the meta device (no memory, no weights) with ONE transformer block and
the block's entries are replicated for every layer: building all 32 blocks of an 8B model takes
seconds in transformers, one takes milliseconds, and the blocks are identical. Tied parameters
(GPT-2's lm_head and wte, Llama configs with tie_word_embeddings) map to one canonical name.
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
}
DEFAULT_TASK = {"llama": "causal-lm", "mistral": "causal-lm", "qwen2": "causal-lm",
                "gpt2": "causal-lm", "bert": "sequence-classification",
                "roberta": "sequence-classification", "vit": "image-classification"}
HEAD = {"causal-lm": ["lm_head"], "sequence-classification": ["classifier"],
        "image-classification": ["classifier"]}


@dataclass(frozen=True)
class ParamInfo:
    shape: tuple
    dtype: torch.dtype
    canonical: str  # the first name of a tied group

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class LinearInfo:
    fin: int
    fout: int
    bias: bool


@dataclass
class Layout:
    config: object
    task: str
    dtype: torch.dtype
    params: dict = field(default_factory=dict)   # name -> ParamInfo (tied names included)
    linears: dict = field(default_factory=dict)  # module name -> LinearInfo
    buffer_bytes: int = 0
    head: list = field(default_factory=list)  # the task head's module names


def load_config(config):
    """A transformers PretrainedConfig from a config object, a dict, or a config.json path or
    model folder (read locally; nothing is downloaded)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            config = json.load(f)
    if isinstance(config, dict):
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ValueError("config dict needs a 'model_type' (e.g. 'llama', 'bert', 'vit')")
        return AutoConfig.for_model(model_type, **config)
    raise TypeError(f"config must be a PretrainedConfig, dict or path, got {type(config).__name__}")


def task_of(config) -> str:
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if arch.endswith("ForImageClassification"):
            return "image-classification"
    try:
        return DEFAULT_TASK[config.model_type]
    except KeyError:
        raise ValueError(f"model_type {config.model_type!r} is not supported; supported: "
                         f"{sorted(DEFAULT_TASK)}") from None


def _layers_attr(config) -> str:
    return "n_layer" if config.model_type == "gpt2" else "num_hidden_layers"


def layout(config, task: str | None = None, dtype: torch.dtype = torch.bfloat16) -> Layout:
    config = load_config(config)
    task = task or task_of(config)
    key = (config.to_json_string(use_diff=False), task, str(dtype))
    if key not in _CACHE:
        if len(_CACHE) > 16:
            _CACHE.clear()
        _CACHE[key] = _build(config, task, dtype)
    return _CACHE[key]


_CACHE: dict = {}


def _build(config, task, dtype) -> Layout:
    import transformers
    from transformers.pytorch_utils import Conv1D

    n_layers = getattr(config, _layers_attr(config))
    one = copy.deepcopy(config)
    setattr(one, _layers_attr(config), 1)
    auto = getattr(transformers, TASKS[task])
    with torch.device("meta"):
        model = auto.from_config(one, dtype=dtype)

    # the block container: the ModuleList holding the (single) transformer block
    block = next(n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == 1)
    pat = re.compile(rf"^{re.escape(block)}\.0\.(.*)$")

    def expand(name: str) -> list[str]:
        mt = pat.match(name)
        return [f"{block}.{i}.{mt.group(1)}" for i in range(n_layers)] if mt else [name]

    lay = Layout(config=config, task=task, dtype=dtype, head=list(HEAD[task]))
    first_by_id: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical = first_by_id.setdefault(id(p), name)
        for n, c in zip(expand(name), expand(canonical)):
            lay.params[n] = ParamInfo(tuple(p.shape), p.dtype, c)
    seen = set()
    for name, b in model.named_buffers(remove_duplicate=False):
        if id(b) in seen:
            continue
        seen.add(id(b))
        lay.buffer_bytes += b.numel() * b.element_size() * len(expand(name))
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            info = LinearInfo(m.in_features, m.out_features, m.bias is not None)
        elif isinstance(m, Conv1D):
            info = LinearInfo(m.weight.shape[0], m.weight.shape[1], m.bias is not None)
        else:
            continue
        for n in expand(name):
            lay.linears[n] = info
    return lay
