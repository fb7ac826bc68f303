"""Plan a training run's memory from a config.json alone: the model `qlora train` would build,
traced on fake tensors (memprofile.trace), no weights and no device.

    from qlora.plan import RunSettings, Planner
    p = Planner("docs/configs/llama-3.1-8b.json", RunSettings())    # qlora train's defaults
    p.estimate(batch=1, seq=2048).bytes()        # the seven categories, predicted
    p.largest_batch(24 * 2**30, seq=2048)        # micro-batch that fits
    p.longest_seq(24 * 2**30)                    # longest sequence at batch 1

    qlora plan --model docs/configs/llama-3.1-8b.json --memory 24GiB --seq 2048 --effective-batch 16

The model is built as training builds it: transformers `AutoModelFor*.from_config`, then
`qlora.levers.modes.build_for_mode` (qlora: `qlora.quantize_model`, NF4 + double quantization; LoRA via
`qlora.add_lora`; `-ckpt`: non-reentrant checkpointing of every block), the loss qlora trains with
(chunked head + cross-entropy, `qlora.objectives.losses.causal_lm_loss`, or the model's own) and the optimizer
(torch AdamW, bitsandbytes AdamW8bit; paged AdamW8bit is traced as AdamW8bit: its state is
resident until the driver pages it out). Defaults are `qlora train`'s (COMMON decisions):
RunSettings' field defaults.

Repeated blocks: traced with `2 * period` and `3 * period` blocks and extrapolated (memprofile.extrapolate);
the smaller model is the larger one's first blocks (`first_blocks`), so each is built and quantized once.
Mixture of experts: every routing has the same routed rows (tokens x top_k). Full fine-tuning runs
transformers' grouped_mm (one buffer of them); lora/qlora run qlora.quant.experts' grouped matmuls, which
dequantize a layer's matrix at once (or fixed groups of experts, traced with balanced routing: on fake
tensors the routing is unknown), the same bytes for any routing; so are the activations. A model whose
step depends on tensor values (an "eager" expert loop, `.item()`) gets a one-line QLoRAError.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from memprofile.extrapolate import extrapolate, extrapolate_increments
from memprofile.fake import (
    TraceError,
    constant,
    constants_up_to,
    fake_tensors,
    new_fake_mode,
    on_constants,
    outside_trace,
)
from memprofile.trace import trace_built
from qlora.arch.multimodal import in_towers, language_model_path, text_config_of, tower_paths
from qlora.errors import QLoRAError
from qlora.plan.build import (
    REAL_FUNCTIONS,
    build,
    fake_batch,
    first_blocks,
    layer_period,
    load_config,
    loss_fn,
    num_layers,
    optimizer,
    replacements,
    text_config,
    value_checks_off,
    with_layers,
)
from qlora.plan.images import (
    default_image_size,
    forward_inputs,
    image_inputs,
    image_tokens,
    known_numel,
    with_images,
)
from qlora.plan.settings import RunSettings

KNOWN_NUMEL = 1 << 20
"""With images, op outputs of up to this many elements computed from known values stay known (memprofile.fake)."""


class Planner:
    """Predicted memory of one training step of `config` under `settings`, at any batch and seq.

    The fake models (period and 2*period blocks) are built once and stepped at each shape asked
    for; results are cached."""

    def __init__(self, config, settings: RunSettings = RunSettings()):
        self.config = load_config(config)
        self.layers = num_layers(self.config)
        self.period = layer_period(self.config)
        self.settings = settings = normalized_blocks(settings, self.layers)
        self._models: dict = {}
        self._cache: dict = {}
        self._parts = self._mixed_parts()
        size = settings.image_size or default_image_size(self.config)
        self._pixels = image_inputs(self.config, size) if settings.images else None   # one image, the processor's
        self._image_tokens = None
        self._pixels_known = False     # the pixels' values are constants of the trace (see _with_known_pixels)

    def _fake_model(self, n: int, seq: int):
        """(fake mode, model with n blocks, its optimizer: one per model, its state does not depend
        on the shape). The 2p-block model is the 3p-block one's first blocks (`first_blocks`: built
        and quantized once) with the 3p one's optimizer (the blocks left out get no gradient, so
        their state is neither counted nor stepped)."""
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
            for m in model.modules() if self.settings.images else ():
                if callable(getattr(m, "get_rope_index", None)):     # M-RoPE positions from known values
                    m.get_rope_index = on_constants(m.get_rope_index)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = optimizer(self.settings)(params) if params else None
        self._models[key] = (mode, model, opt)
        return self._models[key]

    def _traced(self, fn, what: str):
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

    def _with_known_pixels(self, fn):
        """fn(), and once more with the pixels' values known when it fails without them (a tower that picks images
        by their values: SmolVLM's padding check; Gemma 4's pick by a mask of its patches' positions beyond
        KNOWN_NUMEL). Known pixels cost the planner real memory and time (a batch of 896-px images is gigabytes of
        constants), so only the towers that need them pay."""
        try:
            return fn()
        except QLoRAError:
            if self._pixels is None or self._pixels_known:
                raise
            self._pixels_known = True
            return fn()

    def _step(self, n: int, batch: int, seq: int):
        return self._with_known_pixels(lambda: self._traced_step(n, batch, seq))

    def _traced_step(self, n: int, batch: int, seq: int):
        mode, model, opt = self._fake_model(n, seq)
        with fake_tensors(mode, REAL_FUNCTIONS, replacements(self.settings)), value_checks_off(), \
                self._known_values(2 * batch * self.settings.images):        # (a preference batch: 2 rows each)
            self._count_image_tokens(model)
            return self._traced(lambda: trace_built(
                model, lambda: self._batch(model, batch, seq), loss_fn=loss_fn(self.settings), optimizer=opt,
                host_is_device=self.settings.device == "cpu"), "the training step")

    def _batch(self, model, batch: int, seq: int) -> dict:
        make = lambda: fake_batch(self.config, self.settings.task, batch, seq, self.settings.dtype,  # noqa: E731
                                  self.settings.prompt_length)
        if self._pixels is None:
            return make()
        pixels = {k: v for k, v in self._pixels.items() if not v.is_floating_point()}
        with outside_trace():      # the integer tensors as values (token ids, image grids): shapes follow from them
            real = with_images(model, make(), pixels, self._image_tokens, self.settings.images)
        out = {k: constant(v) if isinstance(v, torch.Tensor) else v for k, v in real.items()}
        rows = real["input_ids"].shape[0] * self.settings.images
        floats = {k: v for k, v in self._pixels.items() if v.is_floating_point()}
        return {**out, **forward_inputs(model, floats, rows, known=self._pixels_known)}

    def _known_values(self, images: int = 1):
        """With `images` images: the processor's tensors (pixels, patch grids, masks) and the token ids are constants
        of the trace and stay constants through the ops on them alone (memprofile.fake.constants_up_to), up to the
        pixels' size: shapes and picks that follow from their values are traced as they run; M-RoPE position ids
        (transformers' `get_rope_index`, the Qwen-VL families') are computed for real from them (on_constants)."""
        if self._pixels is None:
            return contextlib.nullcontext()
        return constants_up_to(max(KNOWN_NUMEL, known_numel(self._pixels, images) if self._pixels_known else 0))

    def _count_image_tokens(self, model) -> None:
        """Inside the fake mode of `model` and _known_values: the tokens of one image, the model's own count
        (qlora.plan.images)."""
        if self._pixels is not None and self._image_tokens is None:
            self._image_tokens = self._traced(lambda: image_tokens(model, self._pixels, self._pixels_known),
                                              "the vision tower")

    def image_tokens(self) -> Optional[int]:
        """Tokens of one image (None without images); QLoRAError when the tower cannot be traced."""
        mode, model, _ = self._fake_model(min(self.layers, 2 * self.period), 1)

        def count():
            with fake_tensors(mode, REAL_FUNCTIONS, replacements(self.settings)), value_checks_off(), \
                    self._known_values():
                self._count_image_tokens(model)
            return self._image_tokens
        return self._with_known_pixels(count)

    def tower_bytes(self) -> int:
        """Bytes of the towers' weights (vision / audio encoder, projector: qlora.arch.multimodal), 0 for a text
        model: in weights_frozen (compute dtype) or weights_quantized (quantize_vision); the same at any depth."""
        if text_config_of(self.config) is None:
            return 0
        _, model, _ = self._fake_model(min(self.layers, 2 * self.period), 1)
        towers = tower_paths(model)
        return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                   if in_towers(name.rsplit(".", 1)[0], towers))

    def estimate(self, batch: int, seq: int):
        """memprofile StepMemory (predicted) of one steady-state step at (batch, seq)."""
        if (batch, seq) not in self._cache:
            p, L = self.period, self.layers
            if self._parts is not None:   # the first k of L blocks checkpointed
                result = self._estimate_mixed(batch, seq)
            elif L <= 3 * p:
                result = self._step(L, batch, seq)
            else:  # from the 2nd block on, each adds the same bytes (the 1st differs: measured)
                under = language_model_path(self._fake_model(3 * p, seq)[1])   # where the blocks differ
                result = extrapolate(self._step(2 * p, batch, seq), self._step(3 * p, batch, seq), 2 * p, 3 * p, L,
                                     under)
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
        """Checkpointed and uncheckpointed blocks as two increments (memprofile.extrapolate.extrapolate_increments):
        base (p + p) + (k - p)/p x one more checkpointed unit + (L - k - p)/p x one more plain unit. The
        recompute inside backward is its own phase (apply_levers), so the peak is the larger of the
        backward through the plain blocks (linear in both counts) and the recomputes."""
        base, more_ckpt, more_plain = (part.estimate(batch, seq) for part in self._parts)
        k, p, L = self.settings.checkpoint_blocks, self.period, self.layers
        return extrapolate_increments(base, [(more_ckpt, (k - p) / p), (more_plain, (L - k - p) / p)])

    def with_checkpoint_blocks(self, k: Optional[int]) -> "Planner":
        """The planner of the same run with the first k blocks checkpointed (None: all), sharing this
        one's traces where it can (every 0 < k < L uses the same three traced models)."""
        if k == self.settings.checkpoint_blocks:
            return self
        cache = self.__dict__.setdefault("_siblings", {})
        key = normalized_blocks(replace(self.settings, checkpointing=True, checkpoint_blocks=k), self.layers)
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
        `step`; with images, the shortest multiple that holds their tokens), up to the model's
        max_position_embeddings (grpo: less the prompt: seq is the completion length).

        Each probe is an estimate (two traces), so the search guesses: the peak is close to a
        function of the tokens, batch x seq (plus attention's seq^2 terms where a kernel keeps
        them), so every estimate made so far, at any batch, is a point; a parabola through the
        three nearest the budget gives the length to probe, which is kept when it fits and one
        `step` more does not. Without a point above the budget the length grows 4x; after two
        guesses that did not settle it, the bracket is halved."""
        limit = max_seq or getattr(text_config(self.config), "max_position_embeddings", None) or 1 << 20
        if self.settings.task == "grpo" and not max_seq:      # seq is the completion, after the prompt
            limit -= self.settings.prompt_length
        limit = max(step, limit // step * step)
        fits = lambda s: self.estimate(batch, s).peak <= budget  # noqa: E731
        images = self.settings.images * (self.image_tokens() or 0)
        first = (images // step + 1) * step          # the shortest that holds the images' tokens and one more
        s = min(max(start // step * step, first), max(limit, first))
        if fits(s):
            lo, hi = s, None
        elif s == first or self._state_bytes(batch, s) > budget or not fits(first):
            return 0                       # weights, gradients and optimizer state alone do not fit
        else:
            lo, hi = first, s
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


def normalized_blocks(settings: RunSettings, layers: int) -> RunSettings:
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
    xs, ys = zip(*points)
    coef = np.polyfit(xs, ys, min(2, len(xs) - 1))
    roots = [r.real for r in np.roots(np.concatenate([coef[:-1], [coef[-1] - level]])) if abs(r.imag) < 1e-9]
    inside = [r for r in roots if min(xs) <= r <= max(xs) * 1.0001]
    return max(inside) if inside else None


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
