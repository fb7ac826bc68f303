"""The model `qlora train` would build, from a config alone: built on fake tensors for the planner's traces.

    cfg = load_config("docs/configs/llama-3.1-8b.json");  build(with_layers(cfg, 2), RunSettings(), init=False)

Also what a traced step runs: its batch (make_batch / fake_batch), its loss (loss_fn: the chunked loss,
optionally under activation offload traced as host memory), its optimizer (qlora.optim), and the
functions replaced during a trace (REAL_FUNCTIONS, replacements: bitsandbytes' code book and CPU 8-bit
update, transformers' packed-sequence probe).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from typing import Optional

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from memprofile.fake import on_constants
from memprofile.measure import call_model, default_loss
from memprofile.tracker import host_memory, mark_phase
from qlora.arch.blocks import repeated_module_lists, transformer_blocks
from qlora.arch.loading import from_pretrained_quietly
from qlora.arch.multimodal import language_model_path, model_class_for, text_config_of
from qlora.errors import QLoRAError
from qlora.levers.checkpointing import enable_checkpointing
from qlora.levers.modes import build_for_mode
from qlora.levers.offload import Offloader, offload_saved_tensors
from qlora.levers.tiled_mlp import TiledMLP, tile_mlps
from qlora.objectives.losses import causal_lm_loss
from qlora.objectives.preference import preference_step
from qlora.optim import make_optimizer
from qlora.plan.grpo import grpo_step, prompt_batch
from qlora.plan.settings import TASKS, RunSettings
from qlora.quant.convert import quantize_model
from qlora.quant.load import load_4bit as load

# bitsandbytes computes its 8-bit code book (quantize_blockwise, 8-bit optimizers) with
# data-dependent ops: a tiny constant, computed for real during a trace
REAL_FUNCTIONS = (("bitsandbytes.functional", "create_dynamic_map"),)
# transformers reads the position ids to detect packed sequences (then it builds an explicit
# attention mask); a plan is for full, unpadded, unpacked sequences: the answer is None, as a real
# step on such a batch finds (without it a fake trace would build the [b, 1, s, s] mask)
# one_hot of known values (Gemma 4's pooling of an image's patches by their positions, whose mask then picks the
# image's tokens) stays known: its decomposition starts from zeros, which would make it unknown
REPLACEMENTS = (("transformers.masking_utils", "find_packed_sequence_indices", lambda *a, **k: None),
                ("torch.nn.functional", "one_hot", on_constants(torch.nn.functional.one_hot)))


@contextlib.contextmanager
def value_checks_off():
    """transformers' value checks (`torch_compilable_check`: an image-text model's image tokens against its image
    features, ...) off, as TRANSFORMERS_DISABLE_TORCH_CHECK=1 turns them off: a fake tensor has no values to check,
    and the traced batch holds the model's own count (qlora.plan.images)."""
    key, before = "TRANSFORMERS_DISABLE_TORCH_CHECK", os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def _adamw8bit_cpu(*args, **kwargs):
    """bitsandbytes' CPU 8-bit optimizer update is torch code (fp32 copies of both moments, the
    gradient and the parameter, per tensor): traced as such on CPU, where the fused CUDA kernel
    (no scratch) is the fake kernel's picture."""
    from bitsandbytes.backends.cpu.ops import _optimizer_update_8bit_blockwise_cpu  # lazy: 8-bit optimizers on CPU only
    return _optimizer_update_8bit_blockwise_cpu(*args, **kwargs)


def replacements(settings: RunSettings) -> tuple:
    cpu = (("bitsandbytes.functional", "optimizer_update_8bit_blockwise", _adamw8bit_cpu),)
    return REPLACEMENTS + vision_utilities() + (cpu if settings.device == "cpu" and settings.optimizer != "adamw"
                                                else ())


def vision_utilities() -> tuple:
    """transformers' vision utilities (`transformers.vision_utils.get_vision_*`: window indices, patch positions and
    sequence lengths, made from an image's grid with factories and picks by value, e.g. Qwen2.5-VL's window index),
    where the loaded modeling modules call them, run for real on known grids (on_constants)."""
    utils = sys.modules.get("transformers.vision_utils")
    if utils is None:
        return ()
    fns = {name: f for name, f in vars(utils).items() if name.startswith("get_vision_") and callable(f)}
    return tuple((module_name, name, on_constants(f)) for module_name, module in list(sys.modules.items())
                 if module_name.startswith("transformers.models.") and module is not None
                 for name, f in fns.items() if getattr(module, name, None) is f)


def load_config(config):
    """A transformers PretrainedConfig from a config object, dict, config.json path or model folder."""
    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise QLoRAError(f"cannot read the model config {path}: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise QLoRAError("the config needs a 'model_type' (e.g. 'llama', 'qwen3', 'bert', 'vit')")
    config = dict(config)
    model_type = config.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError) as e:
        first = str(e).splitlines()[0].split(". Should contain one of")[0]   # not the list of every known type
        raise QLoRAError(f"transformers cannot build model_type {model_type!r} ({first}); a newer transformers may "
                         "know it, or the config.json is not a Hugging Face model config") from None


def text_config(config):
    """The config of the model's repeated blocks: an image-text config's text config (qlora.arch.multimodal's
    rule), a text model's own config."""
    return text_config_of(config) or config


def num_layers(config) -> int:
    return int(getattr(text_config(config), "num_hidden_layers"))


def layer_period(config) -> int:
    """The shortest repeating pattern of the blocks' `layer_types` (1 when every block is the same)."""
    types = list(getattr(text_config(config), "layer_types", None) or [])
    for p in range(1, len(types) + 1):
        if all(types[i] == types[i % p] for i in range(len(types))):
            return p
    return 1


def with_layers(config, n: int):
    """A copy of `config` with `n` blocks (an image-text config's language model: its text config's); per-layer
    lists (layer_types, ...) cut to n. The towers keep theirs."""
    total = num_layers(config)
    out = copy.deepcopy(config)
    text = text_config(out)
    for key, value in vars(text_config(config)).items():
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(text, key, value[:n])
    text.num_hidden_layers = n
    return out


def model_class(task: str, config=None):
    """The class `qlora train` builds for `task`: a causal LM's config that nests a text config builds its
    image-text class (qlora.arch.multimodal.model_class_for)."""
    if TASKS[task] == "AutoModelForCausalLM" and config is not None:
        return model_class_for(config)
    return getattr(transformers, TASKS[task])


def build(config, settings: RunSettings, *, path: Optional[str] = None, init: bool = True):
    """The model as `qlora train` builds it. `path`: load real weights from this folder; else
    from `config` (random weights; `init=False` skips the initialisation: for fake tensors)."""
    cls, dtype = model_class(settings.task, config), settings.dtype
    make = getattr(cls, "from_config", None) or cls._from_config     # an Auto class's, a model class's own

    def load_float():
        if path is not None:
            return from_pretrained_quietly(cls, path, dtype=dtype)
        if init:
            return make(config, dtype=dtype)
        from transformers.initialization import no_init_weights  # lazy: transformers >= 5 only
        with no_init_weights():
            model = make(config, dtype=dtype)
        model.tie_weights()  # no_init_weights skips the tying that init_weights does
        return model

    def load_4bit():
        if path is not None:
            return load(path, cls, compute_dtype=dtype)
        return quantize_model(load_float(), compute_dtype=dtype)

    model = build_for_mode(settings.configuration, load_float=load_float, load_4bit=load_4bit, lora=settings.lora())
    return apply_levers(model, settings, trace=not init and path is None)


def apply_levers(model, settings: RunSettings, trace: bool = False):
    """The long-context levers of `settings` on a model built for its mode: checkpoint only the first
    `checkpoint_blocks` blocks, tile the MLPs (offload acts at the step: `loss_fn`). `trace` (a fake
    model of the planner): each checkpointed block's recompute in backward is named as its own phase,
    "backward (recompute)", whose peak extrapolates on its own line (memprofile.tracker.mark_phase)."""
    if settings.checkpointing and settings.checkpoint_blocks is not None:
        enable_checkpointing(model, blocks=settings.checkpoint_blocks)
        if trace:
            def recompute(module, args):
                if torch._C._current_graph_task_id() != -1:      # called inside backward: a recompute
                    mark_phase("backward (recompute)")
            for block in transformer_blocks(model):   # transformers checkpoints `forward`: the block's own hooks stay
                if block.gradient_checkpointing:   # outside, its children's run inside the recompute
                    for child in block.children():
                        child.register_forward_pre_hook(recompute)
    if settings.mlp_tile:
        tile_mlps(model, tile=settings.mlp_tile, min_tokens=settings.mlp_tile_min_tokens)
        if trace:   # the fake model computes 2 tiles per call: the tiles' tensors do not overlap (same peak)
            for m in model.modules():
                if isinstance(m.__dict__.get("forward"), TiledMLP):
                    m.__dict__["forward"].visit = 2
    return model


def first_blocks(model, total: int, n: int):
    """A copy of `model` that runs only the first `n` of its `total` blocks, sharing every module,
    parameter and hook (None when the blocks are not one nn.ModuleList of `total`): the model built
    with n blocks, without building (and quantizing) it again. The modules from the root down to
    the block list are shallow copies; nothing of `model` changes. Models loop over their block
    list (`for layer in self.layers[:num_hidden_layers]`): a shorter list runs fewer blocks."""
    body = language_model_path(model)         # an image-text model's blocks: its language model's
    blocks = {id(b) for b in transformer_blocks(model.get_submodule(body) if body else model)}
    stacks = [name for name, m in repeated_module_lists(model) if len(m) == total
              and (body is None or name.startswith(body + ".")) and (not blocks or {id(c) for c in m} == blocks)]
    if len(stacks) != 1 or not stacks[0]:
        return None
    *path, last = stacks[0].split(".")

    def shallow(module):
        out = copy.copy(module)
        out._modules = dict(module._modules)
        return out
    root = node = shallow(model)
    for name in path:
        node._modules[name] = node = shallow(node._modules[name])
    node._modules[last] = nn.ModuleList(list(node._modules[last])[:n])
    return root


def make_batch(config, task: str, batch: int, seq: int, seed: int = 0, prompt_length: int = 512) -> dict:
    """Inputs of one step: token ids [batch, seq] (+labels), pixels [batch, c, seq, seq], or (grpo) prompts
    [batch, prompt_length] and the completion length seq."""
    gen = torch.Generator().manual_seed(seed)
    config = config if task == "image-cls" else text_config(config)
    if task == "image-cls":
        pixels = torch.randn(batch, config.num_channels, seq, seq, generator=gen)
        return {"pixel_values": pixels, "labels": torch.randint(0, config.num_labels, (batch,), generator=gen)}
    if task == "dpo":
        return preference_batch(torch.randint(0, config.vocab_size, (2 * batch, seq), generator=gen))
    if task == "grpo":
        return prompt_batch(torch.randint(0, config.vocab_size, (batch, prompt_length), generator=gen), seq)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    if task == "causal-lm":
        return {"input_ids": ids, "labels": ids.clone(), **no_cache(config)}
    return {"input_ids": ids, "labels": torch.randint(0, config.num_labels, (batch,), generator=gen), **no_cache(config)}


def no_cache(config) -> dict:
    """A training step keeps no KV cache: said explicitly where the config would turn one on
    (transformers then also warns under checkpointing that it turned it off)."""
    return {"use_cache": False} if getattr(config, "use_cache", False) else {}


def fake_batch(config, task: str, batch: int, seq: int, dtype, prompt_length: int = 512) -> dict:
    """make_batch's shapes and dtypes, built under fake tensors (values do not matter)."""
    config = config if task == "image-cls" else text_config(config)
    if task == "image-cls":
        return {"pixel_values": torch.zeros(batch, config.num_channels, seq, seq, dtype=dtype),
                "labels": torch.zeros(batch, dtype=torch.long)}
    if task == "dpo":
        return preference_batch(torch.zeros(2 * batch, seq, dtype=torch.long))
    if task == "grpo":
        return prompt_batch(torch.zeros(batch, prompt_length, dtype=torch.long), seq)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    labels = ids.clone() if task == "causal-lm" else torch.zeros(batch, dtype=torch.long)
    return {"input_ids": ids, "labels": labels, **no_cache(config)}


def preference_batch(ids: torch.Tensor) -> dict:
    """TRL's preference layout for 2B rows of token ids: every token but the first is a response token, and the
    last row ends in one padding token. Rows of different lengths are padded in a real batch, so its attention
    mask is real (an all-ones mask is dropped by transformers, a padded one makes SDPA keep more per layer)."""
    completion, attention = torch.ones_like(ids), torch.ones_like(ids)
    completion[:, 0] = 0
    completion[-1, -1] = attention[-1, -1] = 0
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def loss_fn(settings: RunSettings, offloader=None):
    """None (the model's own loss) or qlora's chunked loss, as memprofile's step calls it; with
    settings.offload_activations, forward and loss run under qlora.levers.offload with `offloader` (an
    Offloader class; default TracedOffloader: the host copies count as host memory in a trace)."""
    own = settings.task not in ("causal-lm", "dpo", "grpo") or (settings.task == "causal-lm" and settings.loss == "model")
    if own and not settings.offload_activations:
        return None
    size = settings.loss_chunk_size

    def chunked(model, batch):
        if settings.task == "dpo":
            return preference_step(model, batch, chunk_size=size)
        if settings.task == "grpo":
            return grpo_step(model, batch, settings)
        if own:
            return default_loss(call_model(model, batch), batch)
        media = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask", "use_cache")}
        return causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), chunk_size=size,
                              **media)          # an image-text model's pixels etc. go to its forward, as sft's do
    chunked.takes_model = True
    if not settings.offload_activations:
        return chunked

    def offloaded(model, batch):
        with offload_saved_tensors(model, offloader=offloader or TracedOffloader):
            return chunked(model, batch)
    offloaded.takes_model = True
    return offloaded


class TracedOffloader(Offloader):
    """qlora.levers.offload as its CUDA path moves memory, for a trace: the host copy is made inside
    memprofile.tracker.host_memory() (host bytes, not device), the reload is a new device tensor
    (prefetched one block ahead, as on CUDA). On real tensors outside a trace both are plain copies."""

    def _to_host(self, t):
        with host_memory():
            return t.detach().clone(memory_format=torch.contiguous_format), None

    def _to_device(self, p):
        return p.host.clone(), None


def optimizer(settings: RunSettings):
    """The run's optimizer factory as the trace builds it: torch picks the foreach AdamW on CUDA (its
    temporaries are per parameter group); paged AdamW8bit is traced as AdamW8bit (its state is resident
    until the driver pages it out)."""
    name = "adamw" if settings.optimizer == "adamw" else "adamw8bit"
    return lambda params: make_optimizer(name, params, lr=1e-5, foreach=settings.device == "cuda")


def measured_optimizer(settings: RunSettings):
    """The run's optimizer as training makes it (qlora.optim), for measured steps."""
    return lambda params: make_optimizer(settings.optimizer, params, lr=1e-5)
