"""Plan a training run's memory from a config.json alone: the model `qlora train` would build,
traced on fake tensors (memprofile.trace), no weights and no device.

    from qlora.plan import RunSettings, Planner
    p = Planner("docs/configs/llama-3.1-8b.json", RunSettings())    # qlora train's defaults
    p.estimate(batch=1, seq=2048).bytes()        # the seven categories, predicted
    p.largest_batch(24 * 2**30, seq=2048)        # micro-batch that fits
    p.longest_seq(24 * 2**30)                    # longest sequence at batch 1

    qlora plan --model docs/configs/llama-3.1-8b.json --memory 24GiB --seq 2048 --effective-batch 16

The model is built as training builds it: transformers `AutoModelFor*.from_config`, then
`qlora.modes.build_for_mode` (qlora: `qlora.quantize_model`, NF4 + double quantization; LoRA via
`qlora.add_lora`; `-ckpt`: non-reentrant checkpointing of every block), the loss qlora trains with
(chunked head + cross-entropy, `qlora.losses.causal_lm_loss`, or the model's own) and the optimizer
(torch AdamW, bitsandbytes AdamW8bit; paged AdamW8bit is traced as AdamW8bit: its state is
resident until the driver pages it out). Defaults are `qlora train`'s (COMMON decisions):
RunSettings' field defaults.

Repeated blocks: traced with `2 * period` and `3 * period` blocks and extrapolated (memprofile.trace);
the smaller model is the larger one's first blocks (`first_blocks`), so each is built and quantized once.
Mixture of experts: transformers' default experts kernel ("grouped_mm") sorts all tokens x top_k
routed copies into one buffer, so memory does not depend on the routing: the balanced and the
worst case (every token to the same experts) are the same bytes. A model whose step depends on
tensor values (an "eager" expert loop, `.item()`) gets a one-line QLoRAError.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from qlora.config import LoraConfig, check_ints, dtype_name, parse_dtype
from qlora.errors import QLoRAError
from qlora.loading import from_pretrained_quietly
from qlora.offload import Offloader

TASKS = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
         "image-cls": "AutoModelForImageClassification"}
LOSSES = ("chunked", "model")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
MODES = ("full", "head", "lora", "qlora")
# bitsandbytes computes its 8-bit code book (quantize_blockwise, 8-bit optimizers) with
# data-dependent ops: a tiny constant, computed for real during a trace
REAL_FUNCTIONS = (("bitsandbytes.functional", "create_dynamic_map"),)
# transformers reads the position ids to detect packed sequences (then it builds an explicit
# attention mask); a plan is for full, unpadded, unpacked sequences: the answer is None, as a real
# step on such a batch finds (without it a fake trace would build the [b, 1, s, s] mask)
REPLACEMENTS = (("transformers.masking_utils", "find_packed_sequence_indices", lambda *a, **k: None),)


def _adamw8bit_cpu(*args, **kwargs):
    """bitsandbytes' CPU 8-bit optimizer update is torch code (fp32 copies of both moments, the
    gradient and the parameter, per tensor): traced as such on CPU, where the fused CUDA kernel
    (no scratch) is the fake kernel's picture."""
    from bitsandbytes.backends.cpu.ops import _optimizer_update_8bit_blockwise_cpu
    return _optimizer_update_8bit_blockwise_cpu(*args, **kwargs)


def replacements(settings: "RunSettings") -> tuple:
    cpu = (("bitsandbytes.functional", "optimizer_update_8bit_blockwise", _adamw8bit_cpu),)
    return REPLACEMENTS + (cpu if settings.device == "cpu" and settings.optimizer != "adamw" else ())


@dataclass(frozen=True)
class RunSettings:
    """What the training run will use; every default is `qlora train`'s."""

    mode: str = "qlora"
    """full | head | lora | qlora (NF4 4-bit base, double quantization, blocksize 64)."""
    checkpointing: bool = True
    """Non-reentrant activation checkpointing of every block (qlora.prepare_for_training)."""
    loss: str = "chunked"
    """chunked: qlora.losses' chunked head + cross-entropy; model: the model's own loss (full logits)."""
    loss_chunk_size: int = 256
    """Tokens per chunk of the chunked loss."""
    optimizer: str = "adamw"
    """adamw | adamw8bit | paged_adamw8bit."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 16
    """LoRA alpha (no effect on memory)."""
    lora_dropout: float = 0.05
    """LoRA dropout: > 0 makes each adapted layer save a dropped copy of its input."""
    target_modules: Union[str, tuple] = "all-linear"
    """LoRA targets: all-linear or module-name suffixes."""
    compute_dtype: str = "auto"
    """auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 | float32: weights, adapters, compute."""
    device: str = "cuda"
    """Device the run will use: resolves compute_dtype auto."""
    task: str = "causal-lm"
    """causal-lm | seq-cls | image-cls."""
    checkpoint_blocks: Optional[int] = None
    """With checkpointing: checkpoint only the first k blocks (None: every block; 0: none). A block
    left out keeps its activations and skips its recompute (qlora.prepare_for_training(checkpoint_blocks=k))."""
    offload_activations: bool = False
    """What autograd saves of 1 MiB or more (with checkpointing: the block inputs) kept in pinned host
    memory (qlora.offload; train.offload_activations, which qlora train applies on CUDA only). Host
    bytes are predicted apart (StepMemory.host), not in the device peak."""
    mlp_tile: int = 0
    """The MLP (every module named "mlp") in sequence tiles of this many tokens (qlora.tiled_mlp); 0: off."""
    mlp_tile_min_tokens: int = 4096
    """With mlp_tile: tile only inputs of more than this many tokens (shorter ones run as they are)."""

    def __post_init__(self):
        choices = {"mode": MODES, "loss": LOSSES, "optimizer": OPTIMIZERS, "task": tuple(TASKS),
                   "device": ("cuda", "cpu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise QLoRAError(f"{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        check_ints(self, ("lora_r", "loss_chunk_size"))
        for name in ("checkpointing", "offload_activations"):
            if not isinstance(getattr(self, name), bool):
                raise QLoRAError(f"{name}={getattr(self, name)!r}: must be true or false")
        check_ints(self, ("mlp_tile", "mlp_tile_min_tokens"), minimum=0)
        k = self.checkpoint_blocks
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise QLoRAError(f"checkpoint_blocks={k!r}: must be null (every block) or an integer >= 0")
        if k is not None and not self.checkpointing:
            raise QLoRAError(f"checkpoint_blocks={k} needs checkpointing=true (or leave it null)")
        if self.compute_dtype != "auto":
            parse_dtype(self.compute_dtype)
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        self.lora()  # validates rank, alpha, dropout, targets

    @property
    def dtype(self) -> torch.dtype:
        if self.compute_dtype == "auto":
            return torch.bfloat16 if self.device == "cuda" else torch.float32
        return parse_dtype(self.compute_dtype)

    @property
    def configuration(self) -> str:
        return self.mode + ("-ckpt" if self.checkpointing else "")

    def lora(self) -> LoraConfig:
        """The adapters' config (a classifier's new head trains in full: qlora.modes.build_for_mode)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, dtype=self.dtype)

    def with_configuration(self, configuration: str) -> "RunSettings":
        base, _, ckpt = configuration.partition("-")
        if base not in MODES or ckpt not in ("", "ckpt"):
            raise QLoRAError(f"configuration {configuration!r}: use full, head, lora or qlora, optionally with -ckpt")
        return replace(self, mode=base, checkpointing=ckpt == "ckpt",
                       checkpoint_blocks=self.checkpoint_blocks if ckpt == "ckpt" else None)

    def describe(self) -> str:
        loss = f"chunked loss ({self.loss_chunk_size} tokens)" if self.loss == "chunked" else "the model's own loss"
        if self.task != "causal-lm":
            loss = "the model's own loss"
        lora = (f"LoRA r={self.lora_r} alpha={self.lora_alpha:g} dropout={self.lora_dropout:g} on "
                f"{self.target_modules if isinstance(self.target_modules, str) else ','.join(self.target_modules)}; "
                if self.mode in ("lora", "qlora") else "")
        quant = "NF4 4-bit base (double quant, blocksize 64); " if self.mode == "qlora" else ""
        ckpt = "off"
        if self.checkpointing:
            ckpt = "on (non-reentrant" + ("" if self.checkpoint_blocks is None else
                                          f", the first {self.checkpoint_blocks} blocks only") + ")"
        tile = (f"; MLP in {self.mlp_tile}-token tiles above {self.mlp_tile_min_tokens} tokens" if self.mlp_tile else "")
        return (f"{self.configuration}: {quant}{lora}{dtype_name(self.dtype)} compute; "
                f"checkpointing {ckpt}; {loss}; {self.optimizer}; "
                f"{'activation offload to host memory' if self.offload_activations else 'no activation offload'}{tile}")


# ------------------------------------------------------------------------------ config
def load_config(config):
    """A transformers PretrainedConfig from a config object, dict, config.json path or model folder."""
    from transformers import AutoConfig, PretrainedConfig

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


def num_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers"))


def layer_period(config) -> int:
    """The shortest repeating pattern of `config.layer_types` (1 when every block is the same)."""
    types = list(getattr(config, "layer_types", None) or [])
    for p in range(1, len(types) + 1):
        if all(types[i] == types[i % p] for i in range(len(types))):
            return p
    return 1


def with_layers(config, n: int):
    """A copy of `config` with `n` blocks; per-layer lists (layer_types, ...) cut to n."""
    total = num_layers(config)
    out = copy.deepcopy(config)
    out.num_hidden_layers = n
    for key, value in vars(config).items():
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(out, key, value[:n])
    return out


# ------------------------------------------------------------------------------ the run
def model_class(task: str):
    import transformers
    return getattr(transformers, TASKS[task])


def build(config, settings: RunSettings, *, path: Optional[str] = None, init: bool = True):
    """The model as `qlora train` builds it. `path`: load real weights from this folder; else
    from `config` (random weights; `init=False` skips the initialisation: for fake tensors)."""
    from qlora.modes import build_for_mode

    cls, dtype = model_class(settings.task), settings.dtype

    def load_float():
        if path is not None:
            return from_pretrained_quietly(cls, path, dtype=dtype)
        if init:
            return cls.from_config(config, dtype=dtype)
        from transformers.initialization import no_init_weights
        with no_init_weights():
            model = cls.from_config(config, dtype=dtype)
        model.tie_weights()  # no_init_weights skips the tying that init_weights does
        return model

    def load_4bit():
        if path is not None:
            from qlora.quant import load_4bit as load
            return load(path, cls, compute_dtype=dtype)
        from qlora.quant import quantize_model
        return quantize_model(load_float(), compute_dtype=dtype)

    model = build_for_mode(settings.configuration, load_float=load_float, load_4bit=load_4bit, lora=settings.lora())
    return apply_levers(model, settings, trace=not init and path is None)


def apply_levers(model, settings: RunSettings, trace: bool = False):
    """The long-context levers of `settings` on a model built for its mode: checkpoint only the first
    `checkpoint_blocks` blocks, tile the MLPs (offload acts at the step: `loss_fn`). `trace` (a fake
    model of the planner): each checkpointed block's recompute in backward is named as its own phase,
    "backward (recompute)", whose peak extrapolates on its own line (memprofile.trace.mark_phase)."""
    from qlora.checkpointing import _hf_blocks, enable_checkpointing
    if settings.checkpointing and settings.checkpoint_blocks is not None:
        enable_checkpointing(model, blocks=settings.checkpoint_blocks)
        if trace:
            from memprofile.trace import mark_phase

            def recompute(module, args):
                if torch._C._current_graph_task_id() != -1:      # called inside backward: a recompute
                    mark_phase("backward (recompute)")
            for block in _hf_blocks(model):   # transformers checkpoints `forward`: the block's own hooks stay
                if block.gradient_checkpointing:   # outside, its children's run inside the recompute
                    for child in block.children():
                        child.register_forward_pre_hook(recompute)
    if settings.mlp_tile:
        from qlora.tiled_mlp import TiledMLP, tile_mlps
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
    from torch import nn

    from qlora.checkpointing import _hf_blocks, _repeated_module_lists
    blocks = {id(b) for b in _hf_blocks(model)}     # transformers' block class, where it has one
    stacks = [name for name, m in _repeated_module_lists(model)
              if len(m) == total and (not blocks or {id(c) for c in m} == blocks)]
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


def make_batch(config, task: str, batch: int, seq: int, seed: int = 0) -> dict:
    """Inputs of one step: token ids [batch, seq] (+labels), or pixels [batch, c, seq, seq]."""
    gen = torch.Generator().manual_seed(seed)
    if task == "image-cls":
        pixels = torch.randn(batch, config.num_channels, seq, seq, generator=gen)
        return {"pixel_values": pixels, "labels": torch.randint(0, config.num_labels, (batch,), generator=gen)}
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    if task == "causal-lm":
        return {"input_ids": ids, "labels": ids.clone(), **_no_cache(config)}
    return {"input_ids": ids, "labels": torch.randint(0, config.num_labels, (batch,), generator=gen), **_no_cache(config)}


def _no_cache(config) -> dict:
    """A training step keeps no KV cache: said explicitly where the config would turn one on
    (transformers then also warns under checkpointing that it turned it off)."""
    return {"use_cache": False} if getattr(config, "use_cache", False) else {}


def _fake_batch(config, task: str, batch: int, seq: int, dtype) -> dict:
    """make_batch's shapes and dtypes, built under fake tensors (values do not matter)."""
    if task == "image-cls":
        return {"pixel_values": torch.zeros(batch, config.num_channels, seq, seq, dtype=dtype),
                "labels": torch.zeros(batch, dtype=torch.long)}
    ids = torch.zeros(batch, seq, dtype=torch.long)
    labels = ids.clone() if task == "causal-lm" else torch.zeros(batch, dtype=torch.long)
    return {"input_ids": ids, "labels": labels, **_no_cache(config)}


def loss_fn(settings: RunSettings, offloader=None):
    """None (the model's own loss) or qlora's chunked loss, as memprofile's step calls it; with
    settings.offload_activations, forward and loss run under qlora.offload with `offloader` (an
    Offloader class; default TracedOffloader: the host copies count as host memory in a trace)."""
    own = settings.task != "causal-lm" or settings.loss == "model"
    if own and not settings.offload_activations:
        return None
    from memprofile.measure import _call_model, default_loss
    from qlora.losses import causal_lm_loss
    size = settings.loss_chunk_size

    def chunked(model, batch):
        if own:
            return default_loss(_call_model(model, batch), batch)
        return causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), chunk_size=size)
    chunked.takes_model = True
    if not settings.offload_activations:
        return chunked
    from qlora.offload import offload_saved_tensors

    def offloaded(model, batch):
        with offload_saved_tensors(model, offloader=offloader or TracedOffloader):
            return chunked(model, batch)
    offloaded.takes_model = True
    return offloaded


class TracedOffloader(Offloader):
    """qlora.offload as its CUDA path moves memory, for a trace: the host copy is made inside
    memprofile.trace.host_memory() (host bytes, not device), the reload is a new device tensor
    (prefetched one block ahead, as on CUDA). On real tensors outside a trace both are plain copies."""

    def _to_host(self, t):
        from memprofile.trace import host_memory
        with host_memory():
            return t.detach().clone(memory_format=torch.contiguous_format), None

    def _to_device(self, p):
        return p.host.clone(), None


def optimizer(settings: RunSettings):
    """Optimizer factory as qlora.train.make_optimizer builds it on the run's device (torch picks
    the foreach AdamW on CUDA: its temporaries are per parameter group; paged: as AdamW8bit)."""
    if settings.optimizer == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=1e-5, foreach=settings.device == "cuda")
    import bitsandbytes as bnb
    return lambda params: bnb.optim.AdamW8bit(params, lr=1e-5)


def measured_optimizer(settings: RunSettings):
    from qlora.train import TrainConfig, make_optimizer
    cfg = TrainConfig(optimizer=settings.optimizer, lr=1e-5)
    return lambda params: make_optimizer(params, cfg)


# ------------------------------------------------------------------------------ the planner
class Planner:
    """Predicted memory of one training step of `config` under `settings`, at any batch and seq.

    The fake models (period and 2*period blocks) are built once and stepped at each shape asked
    for; results are cached."""

    def __init__(self, config, settings: RunSettings = RunSettings()):
        self.config = load_config(config)
        self.layers = num_layers(self.config)
        self.period = layer_period(self.config)
        self.settings = settings = _normalized_blocks(settings, self.layers)
        self._models: dict = {}
        self._cache: dict = {}
        self._parts = self._mixed_parts()

    def _fake_model(self, n: int, seq: int):
        """(fake mode, model with n blocks, its optimizer: one per model, its state does not depend
        on the shape). The 2p-block model is the 3p-block one's first blocks (`first_blocks`: built
        and quantized once) with the 3p one's optimizer (the blocks left out get no gradient, so
        their state is neither counted nor stepped)."""
        from memprofile.trace import fake_tensors, new_fake_mode
        key = (n, seq if self.settings.task == "image-cls" else None)
        if key in self._models:
            return self._models[key]
        big = 3 * self.period
        if n == 2 * self.period and self.layers > big:
            mode, model, opt = self._fake_model(big, seq)
            with fake_tensors(mode, REAL_FUNCTIONS, replacements(self.settings)):
                smaller = first_blocks(model, big, n)
            if smaller is not None:
                self._models[key] = (mode, smaller, opt)
                return self._models[key]
        cfg = with_layers(self.config, n)
        if self.settings.task == "image-cls":
            cfg.image_size = seq
        mode = new_fake_mode()
        with fake_tensors(mode, REAL_FUNCTIONS, replacements(self.settings)):
            model = self._traced(lambda: build(cfg, self.settings, init=False), "building")
            params = [p for p in model.parameters() if p.requires_grad]
            opt = optimizer(self.settings)(params) if params else None
        self._models[key] = (mode, model, opt)
        return self._models[key]

    def _traced(self, fn, what: str):
        from memprofile.trace import TraceError
        try:
            return fn()
        except QLoRAError:
            raise
        except TraceError as e:
            raise QLoRAError(f"{self.config.model_type} ({self.settings.configuration}): cannot trace {what}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any failure inside transformers/bitsandbytes: one line
            msg = str(e).splitlines()[0] if str(e) else ""
            raise QLoRAError(f"{self.config.model_type} ({self.settings.configuration}): cannot trace {what}: "
                             f"{type(e).__name__}: {msg}") from None

    def _step(self, n: int, batch: int, seq: int):
        from memprofile.trace import fake_tensors, trace_built
        mode, model, opt = self._fake_model(n, seq)
        with fake_tensors(mode, REAL_FUNCTIONS, replacements(self.settings)):
            return self._traced(lambda: trace_built(
                model, lambda: _fake_batch(self.config, self.settings.task, batch, seq, self.settings.dtype),
                loss_fn=loss_fn(self.settings), optimizer=opt,
                host_is_device=self.settings.device == "cpu"), "the training step")

    def estimate(self, batch: int, seq: int):
        """memprofile StepMemory (predicted) of one steady-state step at (batch, seq)."""
        from memprofile.trace import extrapolate
        if (batch, seq) not in self._cache:
            p, L = self.period, self.layers
            if self._parts is not None:   # the first k of L blocks checkpointed
                result = self._estimate_mixed(batch, seq)
            elif L <= 3 * p:
                result = self._step(L, batch, seq)
            else:  # from the 2nd block on, each adds the same bytes (the 1st differs: measured)
                result = extrapolate(self._step(2 * p, batch, seq), self._step(3 * p, batch, seq), 2 * p, 3 * p, L)
            self._cache[(batch, seq)] = result
        return self._cache[(batch, seq)]

    def _mixed_parts(self):
        """With the first k of L blocks checkpointed (0 < k < L, more blocks than traced): the three
        traced models k-of-L is extrapolated from, in units of `period` blocks p: (p checkpointed + p
        not), (2p + p), (p + 2p). None otherwise."""
        k, p, L = self.settings.checkpoint_blocks, self.period, self.layers
        if k is None or L <= 3 * p:
            return None
        shapes = ((p, p), (2 * p, p), (p, 2 * p))
        return [Planner(with_layers(self.config, c + u), replace(self.settings, checkpoint_blocks=c)) for c, u in shapes]

    def _estimate_mixed(self, batch: int, seq: int):
        """Checkpointed and uncheckpointed blocks as two increments (memprofile.trace.extrapolate_increments):
        base (p + p) + (k - p)/p x one more checkpointed unit + (L - k - p)/p x one more plain unit. The
        recompute inside backward is its own phase (apply_levers), so the peak is the larger of the
        backward through the plain blocks (linear in both counts) and the recomputes."""
        from memprofile.trace import extrapolate_increments
        base, more_ckpt, more_plain = (part.estimate(batch, seq) for part in self._parts)
        k, p, L = self.settings.checkpoint_blocks, self.period, self.layers
        return extrapolate_increments(base, [(more_ckpt, (k - p) / p), (more_plain, (L - k - p) / p)])

    def with_checkpoint_blocks(self, k: Optional[int]) -> "Planner":
        """The planner of the same run with the first k blocks checkpointed (None: all), sharing this
        one's traces where it can (every 0 < k < L uses the same three traced models)."""
        if k == self.settings.checkpoint_blocks:
            return self
        cache = self.__dict__.setdefault("_siblings", {})
        key = _normalized_blocks(replace(self.settings, checkpointing=True, checkpoint_blocks=k), self.layers)
        if key not in cache:
            other = Planner(self.config, key)
            mixed = next((c for c in cache.values() if c._parts is not None), None)
            if other._parts is not None and mixed is not None:
                other._parts = mixed._parts      # the same traced models, another k
            cache[key] = other
        return cache[key]

    def fits(self, budget: int, batch: int, seq: int) -> bool:
        return self.estimate(batch, seq).peak <= budget

    def largest_batch(self, budget: int, seq: int, max_batch: int = 4096) -> int:
        """Largest batch whose predicted peak fits (0: not even 1). The peak is close to affine
        in the batch: the line through batches 1 and 2 gives the guess, checked and stepped."""
        if not self.fits(budget, 1, seq):
            return 0
        peak = lambda b: self.estimate(b, seq).peak  # noqa: E731
        lo, hi, guess = 1, None, 2
        while hi is None:  # beyond the known points the line under-estimates: jump to its crossing
            b = min(max(guess, lo + 1), max_batch)
            if not self.fits(budget, b, seq):
                hi = b
            elif b == max_batch:
                return b
            else:
                lo = b
                slope = (peak(b) - peak(1)) / (b - 1)
                guess = max_batch if slope <= 0 else b + max(1, int((budget - peak(b)) // slope))
        while hi - lo > 1:  # between the points the chord over-estimates: its crossing fits
            cut = lo + int((budget - peak(lo)) * (hi - lo) // max(peak(hi) - peak(lo), 1))
            mid = min(max(cut, lo + 1), hi - 1)
            if self.fits(budget, mid, seq):
                lo = mid
                if mid + 1 < hi and not self.fits(budget, mid + 1, seq):
                    hi = mid + 1
            else:
                hi = mid
        return lo

    def longest_seq(self, budget: int, batch: int = 1, step: int = 256, max_seq: Optional[int] = None,
                    start: int = 2048) -> int:
        """Longest sequence (a multiple of `step`, 256) whose predicted peak fits at `batch` (0: not even
        `step`), up to the model's max_position_embeddings.

        Each probe is an estimate (two traces), so the search guesses: the peak is close to a
        function of the tokens, batch x seq (plus attention's seq^2 terms where a kernel keeps
        them), so every estimate made so far, at any batch, is a point; a parabola through the
        three nearest the budget gives the length to probe, which is kept when it fits and one
        `step` more does not. Without a point above the budget the length grows 4x; after two
        guesses that did not settle it, the bracket is halved."""
        limit = max_seq or getattr(self.config, "max_position_embeddings", None) or 1 << 20
        limit = max(step, limit // step * step)
        fits = lambda s: self.estimate(batch, s).peak <= budget  # noqa: E731
        s = min(max(start // step * step, step), limit)
        if fits(s):
            lo, hi = s, None
        elif s == step or self._state_bytes(batch, s) > budget or not fits(step):
            return 0                       # weights, gradients and optimizer state alone do not fit
        else:
            lo, hi = step, s
        guesses = 0
        while hi is None or hi - lo > step:
            if lo == limit:
                return limit
            guess = self._guess_seq(budget, batch, lo, hi or limit + step) if guesses < 2 else None
            if guess is None:
                guess = min(4 * lo, limit) if hi is None else (lo + hi) // 2
            guesses += 1
            mid = min(max(guess // step * step, lo + step), (hi or limit + step) - step)
            if not fits(mid):
                hi = mid
            elif mid + step >= (hi or limit + step) or not fits(mid + step):
                return mid
            else:
                lo = mid + step
        return lo

    def _guess_seq(self, budget: int, batch: int, lo: int, hi: int) -> Optional[int]:
        """Where the estimates so far (as tokens / batch) cross the budget, strictly inside (lo, hi)."""
        pts = {}
        for (b, s), e in sorted(self._cache.items(), key=lambda kv: kv[0][0] != batch):  # this batch's first
            pts.setdefault(b * s / batch, e.peak)
        xs = sorted(pts)
        above = [x for x in xs if pts[x] > budget]
        below = [x for x in xs if pts[x] <= budget]
        if not above or not below:
            return None
        near = sorted(sorted(below, key=lambda x: abs(x - lo))[:2] + sorted(above, key=lambda x: abs(x - hi))[:1])
        crossing = _parabola_crossing([(x, pts[x]) for x in near], budget)
        return int(crossing) if crossing is not None and lo < crossing < hi else None

    def _state_bytes(self, batch: int, seq: int) -> int:
        """What a step holds whatever its length: weights, gradients, optimizer state."""
        b = self.estimate(batch, seq).bytes()
        return sum(b[k] for k in ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer"))


def _normalized_blocks(settings: RunSettings, layers: int) -> RunSettings:
    """checkpoint_blocks k of a model with `layers` blocks: k = layers is every block (None), k = 0
    no checkpointing; more than `layers` is an error."""
    k = settings.checkpoint_blocks
    if k is None or not settings.checkpointing:
        return settings
    if k > layers:
        raise QLoRAError(f"checkpoint_blocks={k}: the model has {layers} blocks")
    if k == layers:
        return replace(settings, checkpoint_blocks=None)
    if k == 0:
        return replace(settings, checkpointing=False, checkpoint_blocks=None)
    return settings


def _parabola_crossing(points, level: float) -> Optional[float]:
    """x where the parabola (or line) through the (x, y) points reaches `level`, if it does."""
    import numpy as np
    xs, ys = zip(*points)
    coef = np.polyfit(xs, ys, min(2, len(xs) - 1))
    roots = [r.real for r in np.roots(np.concatenate([coef[:-1], [coef[-1] - level]])) if abs(r.imag) < 1e-9]
    inside = [r for r in roots if min(xs) <= r <= max(xs) * 1.0001]
    return max(inside) if inside else None


def option(planner: Planner, budget: int, seq: int, effective_batch: int) -> Optional[dict]:
    """The micro-batch and accumulation for `effective_batch` examples per step under one
    configuration (None: not even batch 1 fits)."""
    largest = planner.largest_batch(budget, seq)
    if largest == 0:
        return None
    accum = math.ceil(effective_batch / min(largest, effective_batch))
    micro = math.ceil(effective_batch / accum)
    return {"configuration": planner.settings.configuration, "micro_batch": micro, "grad_accum": accum,
            "checkpointing": planner.settings.checkpointing, "largest_batch": largest,
            "peak": planner.estimate(micro, seq).peak}


def recommend(options) -> Optional[dict]:
    """Of one mode's options (with and without checkpointing): without checkpointing when a
    micro-batch of at least half the checkpointed one fits (it is ~30 % faster), else with it."""
    best = None
    for option in (o for o in options if o is not None):
        if best is None or (not option["checkpointing"] and 2 * option["micro_batch"] >= best["micro_batch"]) \
                or (best["checkpointing"] is False and option["micro_batch"] > 2 * best["micro_batch"]):
            best = option
    return best


def fsdp_per_rank(estimate, world_size: int, largest_block_bytes: int) -> dict:
    """Per-rank bytes under FSDP (a formula, not a trace): weights, gradients and optimizer state
    sharded over `world_size`, plus one block's all-gathered parameters (the largest block's
    unsharded bytes), activations as on one device."""
    b = estimate.bytes()
    sharded = {k: math.ceil(b[k] / world_size) for k in
               ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer")}
    saved = sum(b[k] - sharded[k] for k in sharded)
    out = {**sharded, "activations": b["activations"], "all_gather": largest_block_bytes}
    out["peak"] = b["peak"] - saved + largest_block_bytes
    return out


def _largest_block_bytes(planner: Planner) -> int:
    """Unsharded bytes of one block's parameters (what FSDP all-gathers at a time): the increment
    between the traced models' weights."""
    p = planner.period
    if planner.layers <= 3 * p:
        e = planner.estimate(1, 64)
        return sum(e.bytes()[k] for k in ("weights_quantized", "weights_frozen", "weights_trainable")) // planner.layers
    a, b = planner._step(2 * p, 1, 64), planner._step(3 * p, 1, 64)
    w = lambda e: sum(e.bytes()[k] for k in ("weights_quantized", "weights_frozen", "weights_trainable"))  # noqa: E731
    return (w(b) - w(a)) // p


def _row(config, settings: RunSettings, budget: int, seq: int, effective_batch: int, world_size: int,
         own: bool) -> dict:
    """One configuration's row of the plan (and its recommendation option when `own`: the mode planned for)."""
    planner = Planner(config, settings)
    e = planner.estimate(1, seq)
    row = {"configuration": settings.configuration, "peak_batch1": e.peak, "bytes": e.bytes(), "peak_at": e.peak_at,
           "largest_batch": planner.largest_batch(budget, seq),
           "longest_seq": None if settings.task == "image-cls" else planner.longest_seq(budget, start=seq),
           "trainable_params": e.trainable_params, "total_params": e.total_params,
           "option": option(planner, budget, seq, effective_batch) if own else None}
    if world_size > 1:
        row["fsdp"] = fsdp_per_rank(e, world_size, _largest_block_bytes(planner))
    longest = row["longest_seq"]
    at = planner.estimate(1, longest) if longest else None   # cached by the search
    row["at_longest"] = {"bytes": at.bytes() if at else None, "host": (at.host or 0) if at else None,
                         "peak_at": at.peak_at if at else None}
    return row


def _workers(jobs: int) -> int:
    """Processes for the plan's configurations: one per core (forked: the imports are shared), 1
    where fork is not available."""
    import multiprocessing
    if jobs < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(jobs, cores))


def _import_before_fork(config, settings: RunSettings) -> None:
    """What every worker would import on its first trace (~3 s: the modeling code, bitsandbytes,
    the tracer), imported once in the parent so that the forked workers share it."""
    import importlib
    _import_bitsandbytes()
    for name in ("memprofile.trace", "qlora.modes", "qlora.quant", "qlora.losses", "qlora.checkpointing",
                 "transformers.initialization"):
        importlib.import_module(name)
    try:
        model_class(settings.task)._model_mapping[type(config)]
    except Exception:  # noqa: BLE001 - a model this task cannot build: the workers say so in one line
        pass


def _import_bitsandbytes() -> None:
    """Import bitsandbytes with its torch.compile wrappers made on first call instead of at import.
    Its default backend wraps four kernels in torch.compile when imported, which imports TorchDynamo
    and Inductor (1.6 s of a plan's ~7 s of imports, `python -X importtime`) though a trace never
    calls them (fake tensors run bitsandbytes' fake kernels). A wrapper compiles as torch.compile's
    own does, on the first call, so a later real run is unchanged."""
    import sys
    if "bitsandbytes" in sys.modules:
        return
    compile_now = torch.compile

    def compile_on_first_call(fn=None, **options):
        if fn is None:
            return lambda f: compile_on_first_call(f, **options)
        compiled = []

        def call(*args, **kwargs):
            if not compiled:
                compiled.append(compile_now(fn, **options))
            return compiled[0](*args, **kwargs)
        return call
    torch.compile = compile_on_first_call
    try:
        import bitsandbytes  # noqa: F401
    finally:
        torch.compile = compile_now


def _lever_row(config, settings: RunSettings, name: str, budget: int, start: int) -> dict:
    """One lever's row: the longest sequence at batch 1 within `budget` and the categories there."""
    planner = Planner(config, settings)
    longest = planner.longest_seq(budget, start=start)
    e = planner.estimate(1, longest) if longest else None
    return {"lever": name, "settings": planner.settings, "longest_seq": longest,
            "bytes": e.bytes() if e else None, "host": (e.host or 0) if e else None,
            "peak_at": e.peak_at if e else None}


def _call(jobs):
    """Jobs run one after another in one worker (its fake-op cache warm for the next one)."""
    return [fn(*args) for fn, args in jobs]


def plan(config, budget: int, settings: RunSettings = RunSettings(), *, seq: int = 2048, effective_batch: int = 16,
         configurations=("full", "lora", "lora-ckpt", "qlora", "qlora-ckpt"), world_size: int = 1,
         levers: Optional[dict] = None) -> dict:
    """Per configuration: the largest batch at `seq`, the longest sequence at batch 1, the peak at
    batch 1 (and per FSDP rank for world_size > 1); and a recommendation for settings.mode. With
    `levers` ({name: RunSettings fields}, e.g. LEVERS): per lever, the longest sequence at batch 1.

    Configurations (and levers) are traced side by side, one process per core (each trace is
    single-threaded Python): the lever searches, which take longest, first, then each mode with and
    without checkpointing in the same worker (they trace the same ops on the same shapes: the second
    replays most of them from memprofile.trace.FakeOps)."""
    import time
    t0 = time.perf_counter()
    config = load_config(config)
    mode = settings.mode
    confs = list(dict.fromkeys(list(configurations) + [mode, mode + "-ckpt"]))
    modes = {}
    for c in sorted(confs, key=lambda c: (not c.endswith("-ckpt"), c)):   # -ckpt first: it takes longest
        modes.setdefault(c.split("-")[0], []).append(
            (_row, (config, settings.with_configuration(c), budget, seq, effective_batch, world_size,
                    c.split("-")[0] == mode)))
    base = replace(settings, checkpointing=True)
    lever_jobs = [[(_lever_row, (config, replace(base, **fields), name, budget, seq))]
                  for name, fields in (levers or {}).items() if fields]    # {} is the -ckpt row's own answer
    jobs = lever_jobs + sorted(modes.values(), key=len, reverse=True)
    workers = _workers(sum(map(len, jobs)))
    while len(jobs) < workers:        # fewer groups than cores (e.g. --configs qlora-ckpt): split one
        i = next(i for i, group in enumerate(jobs) if len(group) > 1)
        jobs[i:i + 1] = [[job] for job in jobs[i]]
    if workers > 1:
        import gc
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        _import_before_fork(config, settings)
        gc.freeze()  # the parent's objects stay out of the workers' collections: no copy-on-write of the heap
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                done = [r for rows in pool.map(_call, jobs) for r in rows]
        finally:
            gc.unfreeze()
    else:
        done = [r for job in jobs for r in _call(job)]
    by_conf = {r["configuration"]: r for r in done if "configuration" in r}
    by_lever = {r["lever"]: r for r in done if "lever" in r}
    own = by_conf[mode + "-ckpt"]
    lever_out = []
    for name, fields in (levers or {}).items():
        if fields:
            lever_out.append(by_lever[name])
        else:   # no lever: the checkpointed row of the mode planned for
            lever_out.append({"lever": name, "settings": settings.with_configuration(mode + "-ckpt"),
                              "longest_seq": own["longest_seq"], **own["at_longest"]})
    rec = recommend([by_conf[c]["option"] for c in (mode, mode + "-ckpt")])
    moe = any(getattr(config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    return {"model": getattr(config, "_name_or_path", "") or config.model_type, "model_type": config.model_type,
            "budget": budget, "seq": seq, "effective_batch": effective_batch, "world_size": world_size,
            "assumed": settings, "rows": [by_conf[c] for c in configurations], "recommendation": rec, "moe": bool(moe),
            "levers": lever_out, "seconds": time.perf_counter() - t0, "workers": workers}


LEVERS = {"defaults": {}, "offload": {"offload_activations": True}, "tiled MLP": {"mlp_tile": 1024},
          "offload + tiled MLP": {"offload_activations": True, "mlp_tile": 1024}}
"""The long-context levers `qlora plan --levers` tabulates (none is on in qlora train's defaults; the
MLP tiles are tile_mlps' defaults: 1,024 tokens, above 4,096)."""


def format_levers(rows: list[dict], budget: int) -> str:
    """The lever rows as a markdown table: longest context at batch 1 and its breakdown."""
    from memprofile.report import human
    lines = [f"longest context at batch 1 within {human(budget)}, per long-context lever (checkpointing on; "
             "qlora train's defaults use none of these levers):", "",
             "| levers | longest seq | peak | weights | grads + optimizer | activations (on device) | host (offloaded) | peak at |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["bytes"]
        if b is None:
            lines.append(f"| {r['lever']} | does not fit | | | | | | |")
            continue
        w = b["weights_quantized"] + b["weights_frozen"] + b["weights_trainable"]
        lines.append(f"| {r['lever']} | {r['longest_seq']} | {human(b['peak'])} | {human(w)} | "
                     f"{human(b['gradients'] + b['optimizer'])} | {human(b['activations'])} | {human(r['host'])} | "
                     f"{r['peak_at']} |")
    return "\n".join(lines)


def format_plan(result: dict) -> str:
    """The plan as the CLI prints it: assumptions, one table row per configuration, the advice."""
    from memprofile.report import human
    s: RunSettings = result["assumed"]
    lines = [f"{result['model_type']}: budget {human(result['budget'])} per device, seq {result['seq']}, "
             f"{s.device}; predicted by tracing the model on fake tensors "
             f"({result['seconds']:.1f} s)",
             f"assumed (qlora train's defaults unless given): {s.describe().split(': ', 1)[1]}"]
    if result["moe"]:
        lines.append("mixture of experts: the grouped_mm experts kernel processes all tokens x top_k in one "
                     "buffer, so balanced and worst-case routing take the same memory")
    lines += ["", "| configuration | peak at batch 1 | largest batch at seq | longest seq at batch 1 | "
                  "weights | grads + optimizer | activations (batch 1) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        b = r["bytes"]
        w = b["weights_quantized"] + b["weights_frozen"] + b["weights_trainable"]
        longest = "-" if r["longest_seq"] is None else (str(r["longest_seq"]) if r["longest_seq"] else "does not fit")
        lines.append(f"| {r['configuration']} | {human(r['peak_batch1'])} | "
                     f"{r['largest_batch'] or 'does not fit'} | {longest} | {human(w)} | "
                     f"{human(b['gradients'] + b['optimizer'])} | {human(b['activations'])} |")
    if result["world_size"] > 1:
        n = result["world_size"]
        lines += ["", f"FSDP over {n} ranks (a formula, not a trace: weights, gradients and optimizer state / {n}, "
                      "+ the largest block's unsharded parameters all-gathered, activations unchanged):", "",
                  "| configuration | per-rank peak at batch 1 | sharded state | all-gather buffer |", "|---|---|---|---|"]
        for r in result["rows"]:
            f = r["fsdp"]
            state = sum(f[k] for k in ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer"))
            lines.append(f"| {r['configuration']} | {human(f['peak'])} | {human(state)} | {human(f['all_gather'])} |")
    rec = result["recommendation"]
    lines.append("")
    if rec is None:
        lines.append(f"recommendation: {s.mode} does not fit in {human(result['budget'])} at seq {result['seq']}, "
                     "even at batch 1 with checkpointing; shorten --seq or use more memory")
    else:
        eff = rec["micro_batch"] * rec["grad_accum"]
        lines.append(f"recommendation for {s.mode} (effective batch {result['effective_batch']}): "
                     f"train.batch_size={rec['micro_batch']} train.grad_accum={rec['grad_accum']} "
                     f"gradient_checkpointing={'true' if rec['checkpointing'] else 'false'} "
                     f"(predicted peak {human(rec['peak'])}"
                     + (f"; {eff} examples per step" if eff != result["effective_batch"] else "") + ")")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ qlora train
def settings_of(model, train_config) -> RunSettings:
    """The RunSettings of a model built for training: mode from its layers (4-bit / LoRA / all or
    some parameters trainable), LoRA from model.qlora_config, checkpointing as it is on, the
    optimizer and offload (qlora train offloads on CUDA only) from the TrainConfig, MLP tiles as
    qlora.tiled_mlp set them. The loss is assumed chunked (qlora train's causal-LM loss)."""
    from qlora.checkpointing import is_checkpointing
    from qlora.lora import LoRALayer
    modules = list(model.modules())
    lora = getattr(model, "qlora_config", None)
    if any(type(m).__name__ in ("Linear4bit", "LinearNF4") for m in modules):
        mode = "qlora"
    elif any(isinstance(m, LoRALayer) for m in modules):
        mode = "lora"
    else:
        mode = "full" if all(p.requires_grad for p in model.parameters()) else "head"
    task = {"ForSequenceClassification": "seq-cls", "ForImageClassification": "image-cls"}
    name = type(model).__name__
    from qlora.tiled_mlp import TiledMLP
    tiled = next((m.__dict__["forward"] for m in modules if isinstance(m.__dict__.get("forward"), TiledMLP)), None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fields = dict(mode=mode, checkpointing=is_checkpointing(model), optimizer=train_config.optimizer,
                  device=device, offload_activations=bool(train_config.offload_activations) and device == "cuda",
                  mlp_tile=tiled.tile if tiled else 0, mlp_tile_min_tokens=tiled.min_tokens if tiled else 4096,
                  task=next((t for suffix, t in task.items() if name.endswith(suffix)), "causal-lm"),
                  compute_dtype=dtype_name(next(p.dtype for p in model.parameters() if p.is_floating_point())))
    from qlora.checkpointing import _hf_blocks
    chosen = [getattr(b, "gradient_checkpointing", False) for b in _hf_blocks(model)]
    if fields["checkpointing"] and chosen and not all(chosen):   # a subset (counted as the first k)
        fields["checkpoint_blocks"] = sum(chosen)
    if lora is not None:
        fields.update(lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                      target_modules=lora.target_modules if isinstance(lora.target_modules, str)
                      else tuple(lora.target_modules))
    return RunSettings(**fields)


def fit_to_budget(model, train_set, collate, train_config, budget: int):
    """(train_config with batch_size and grad_accum chosen so that batch_size * grad_accum examples
    per step fit in `budget` bytes, the predicted peak at that micro-batch, checkpoint_blocks). The
    sequence length is that of a collated batch of the configured size. With checkpointing on, the
    micro-batch is chosen with every block checkpointed, then `checkpoint_blocks` is the fewest
    (the first k) that still fit at it (each block left out skips its recompute): None when all are
    needed (or checkpointing is off); the peak is the one with k blocks."""
    from dataclasses import replace as dc_replace
    settings = settings_of(model, train_config)
    sample = collate([train_set[i] for i in range(min(len(train_set), train_config.batch_size))])
    x = sample.get("input_ids", sample.get("pixel_values"))
    seq = int(x.shape[-1])
    planner = Planner(model.config, settings)
    effective = train_config.batch_size * train_config.grad_accum
    largest = planner.largest_batch(budget, seq, max_batch=effective)
    if largest == 0:
        raise QLoRAError(f"train.memory_budget: even batch 1 at length {seq} is predicted to need "
                         f"{planner.estimate(1, seq).peak / 2**30:.2f} GiB ({settings.describe()}); raise the budget, "
                         "shorten max_length, or turn gradient checkpointing on")
    accum = math.ceil(effective / largest)
    micro = math.ceil(effective / accum)
    blocks = fewest_checkpointed_blocks(planner, budget, micro, seq) if settings.checkpointing else None
    peak = planner.with_checkpoint_blocks(blocks).estimate(micro, seq).peak
    return dc_replace(train_config, batch_size=micro, grad_accum=accum), peak, blocks


def fewest_checkpointed_blocks(planner: Planner, budget: int, batch: int, seq: int) -> Optional[int]:
    """The fewest first blocks k to checkpoint so that (batch, seq) is predicted to fit `budget`
    (None: every block is needed, or `planner` already checkpoints a subset). Every 0 < k < L shares
    the same three traces; k = 0 is the run without checkpointing."""
    if planner.settings.checkpoint_blocks is not None:
        return planner.settings.checkpoint_blocks
    for k in range(planner.layers):      # the peak falls as k grows: the first that fits
        if planner.with_checkpoint_blocks(k).fits(budget, batch, seq):
            return k
    return None


def check_prediction(measured: int, predicted: int, tolerance: float = 0.10) -> Optional[str]:
    """A warning line when the first step's measured peak is more than `tolerance` from the plan."""
    if not measured or not predicted or abs(measured - predicted) <= tolerance * measured:
        return None
    return (f"memory: the first step peaked at {measured / 2**30:.2f} GiB, the plan predicted "
            f"{predicted / 2**30:.2f} GiB ({(predicted - measured) / measured:+.0%}); the plan assumes the "
            "chunked loss and full-length batches")
