"""`qlora export --requantize nf4|fp4`: the merged weights re-quantized to 4-bit, as transformers saves them.

After merging W' = dequant(quant(W)) + s·B·A in fp32, each layer that was 4-bit in training is
quantized again (``qlora.quant.chunked``, in pieces, bit-exact with bitsandbytes; from W' cast to the export dtype, with the
adapter's blocksize and double quantization) and written in bitsandbytes' serialized form, per
layer ``X``: ``X.weight`` (packed uint8 codes), ``X.weight.absmax``, ``X.weight.quant_map``,
(with double quantization) ``X.weight.nested_absmax`` and ``X.weight.nested_quant_map``, and
``X.weight.quant_state.bitsandbytes__nf4`` (the small JSON dict of shape, dtype, blocksize, ...
as uint8, from ``QuantState.as_dict(packed=True)``). config.json carries a matching
``quantization_config``, so stock ``AutoModelForCausalLM.from_pretrained(out)`` loads it (with
bitsandbytes installed). The error this adds, ||W' - dequant(requant(W'))||_F, is measured per layer.

Every output shape must be known before the first byte is written (the shard headers come first):
the packed JSON's length depends on one float (the nested absmax mean) whose text length varies,
so its tensor is planned at the longest length it can take and padded with spaces, which JSON
ignores.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from qlora.arch.heads import OUTPUT_HEAD_NAMES
from qlora.arch.names import matches_suffix
from qlora.errors import QLoRAError
from qlora.quant.bnb_fixes import import_bnb
from qlora.quant.chunked import dequantize_4bit_chunked, quantize_4bit_chunked
from qlora.quant.settings import check_blocksize, check_double_quant, check_quant_type
from qlora.util.dtypes import dtype_name

CHOICES = ("none", "nf4", "fp4")
_NESTED_BLOCKSIZE = 256      # bitsandbytes quantizes the absmax in blocks of 256 (double quantization)
_LONGEST_FLOAT_TEXT = 24     # len(repr(float)) is at most 24, e.g. '-2.2250738585072014e-308'


def check_requantize(value) -> str | None:
    """'nf4' / 'fp4' -> that string; None / 'none' -> None (a plain float export)."""
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, str) and value.lower() in CHOICES:
        return value.lower()
    raise QLoRAError(f"--requantize {value!r} is not supported; accepted: none (default: a plain bf16/fp16/fp32 "
                     "model), nf4 or fp4 (4-bit bitsandbytes weights, loadable by transformers)")


@dataclass
class RequantizedLayer:
    """One re-quantized weight: the error the 4-bit rounding of the merged weight W' adds."""
    name: str
    weight_norm: float      # ||W'||_F
    error_norm: float       # ||W' - dequant(requant(W'))||_F
    update_norm: float      # ||s·B·A||_F (0.0: a 4-bit layer without adapter)

    @property
    def relative_error(self) -> float:
        return self.error_norm / max(self.weight_norm, 1e-30)

    @property
    def ratio_to_update(self) -> float | None:
        return self.error_norm / self.update_norm if self.update_norm > 0 else None

    def as_dict(self) -> dict:
        return {"name": self.name, "weight_norm": self.weight_norm, "error_norm": self.error_norm,
                "relative_error": self.relative_error, "update_norm": self.update_norm,
                "ratio_to_update": self.ratio_to_update}


@dataclass
class Requantizer:
    """Which layers to re-quantize and how; writes each one and records its error in `layers`."""
    quant_type: str
    blocksize: int
    double_quant: bool
    dtype: torch.dtype                  # quantized from (W' cast to it) and bnb_4bit_compute_dtype
    modules: set[str]                   # module paths, e.g. "model.layers.0.mlp.up_proj"
    layers: list[RequantizedLayer] = field(default_factory=list)

    @classmethod
    def create(cls, quant_type: str, settings: dict, dtype: torch.dtype, modules) -> "Requantizer":
        if not modules:
            raise QLoRAError("--requantize re-quantizes the layers that were 4-bit in training, and there were none "
                             "(a plain LoRA model; its adapter_config.json lists no qlora.quantized_modules): export "
                             "without --requantize, then load the result with qlora.load_4bit to have it in 4-bit")
        return cls(check_quant_type(quant_type), check_blocksize(int(settings.get("blocksize", 64))),
                   check_double_quant(bool(settings.get("double_quant", True))), dtype, set(modules))

    def wants(self, name: str) -> bool:
        return name.endswith(".weight") and name.removesuffix(".weight") in self.modules

    def _state_key(self) -> str:
        return f"quant_state.bitsandbytes__{self.quant_type}"

    def specs(self, path: str, shape: tuple) -> dict[str, tuple[tuple, torch.dtype]]:
        """The tensors that store the 4-bit weight of `path`, in write order: name -> (shape, dtype)."""
        n = math.prod(shape)
        blocks = math.ceil(n / self.blocksize)
        w = path + ".weight"
        out = {w: (((n + 1) // 2, 1), torch.uint8),
               w + ".absmax": ((blocks,), torch.uint8 if self.double_quant else torch.float32),
               w + ".quant_map": ((16,), torch.float32)}
        if self.double_quant:
            out[w + ".nested_absmax"] = ((math.ceil(blocks / _NESTED_BLOCKSIZE),), torch.float32)
            out[w + ".nested_quant_map"] = ((256,), torch.float32)
        out[f"{w}.{self._state_key()}"] = ((self._packed_state_length(shape),), torch.uint8)
        return out

    def expand(self, specs: dict) -> dict:
        """Output specs with each re-quantized `X.weight` replaced by its 4-bit tensors (same place)."""
        out = {}
        for name, (shape, dtype) in specs.items():
            out.update(self.specs(name.removesuffix(".weight"), shape) if self.wants(name) else {name: (shape, dtype)})
        return out

    def _packed_state_length(self, shape: tuple) -> int:
        """Longest the packed JSON of QuantState.as_dict(packed=True) can be for this layer."""
        F = import_bnb().functional
        empty = torch.empty(0)
        nested = F.QuantState(empty, code=empty, blocksize=_NESTED_BLOCKSIZE, dtype=torch.float32) \
            if self.double_quant else None
        state = F.QuantState(empty, shape=torch.Size(shape), code=empty, blocksize=self.blocksize,
                             quant_type=self.quant_type, dtype=self.dtype,
                             offset=torch.tensor(0.0) if nested else None, state2=nested)
        packed = state.as_dict(packed=True)[self._state_key()]
        return packed.numel() + (_LONGEST_FLOAT_TEXT - len("0.0") if nested else 0)

    def write(self, writer, path: str, merged: torch.Tensor, update_norm: float) -> RequantizedLayer:
        """Quantize the fp32 merged weight of `path`, write its tensors, and record the added error."""
        # In pieces (bit-exact with bitsandbytes' whole-tensor quantize_4bit; no 3.4x-layer scratch)
        packed, state = quantize_4bit_chunked(merged.to(self.dtype), quant_type=self.quant_type,
                                              blocksize=self.blocksize, double_quant=self.double_quant)
        back = dequantize_4bit_chunked(packed, state).float()
        layer = RequantizedLayer(path, torch.linalg.vector_norm(merged).item(),
                                 torch.linalg.vector_norm(back.sub_(merged)).item(), update_norm)
        del back
        stored = {"": packed, **{"." + k: v for k, v in state.as_dict(packed=True).items()}}
        for name, (shape, _) in self.specs(path, tuple(state.shape)).items():
            tensor = stored[name.removeprefix(path + ".weight")]
            if name.endswith(self._state_key()):      # pad the JSON to its planned length
                tensor = torch.cat([tensor, torch.full((shape[0] - tensor.numel(),), ord(" "), dtype=torch.uint8)])
            writer.write(name, tensor)
        self.layers.append(layer)
        return layer

    def quantization_config(self, out_specs: dict) -> dict:
        """config.json's quantization_config. transformers makes every nn.Linear not listed in
        llm_int8_skip_modules 4-bit: listed are the module paths of every 2-D float weight that is
        not re-quantized, and the output heads (possibly tied: no weight of their own)."""
        kept = {name.removesuffix(".weight") for name, (shape, dtype) in out_specs.items()
                if name.endswith(".weight") and len(shape) == 2 and dtype.is_floating_point and not self.wants(name)}
        kept |= {h for h in OUTPUT_HEAD_NAMES if not any(matches_suffix(m, [h]) for m in self.modules)}
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": self.quant_type, "bnb_4bit_use_double_quant": self.double_quant,
                "bnb_4bit_compute_dtype": dtype_name(self.dtype), "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": sorted(re.escape(m) for m in kept)}

    def report(self) -> dict:
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant,
                "quantized_from_dtype": dtype_name(self.dtype), "layers": [l.as_dict() for l in self.layers]}

    def summary(self) -> list[str]:
        if not self.layers:
            return []
        worst = max(self.layers, key=lambda l: l.relative_error)
        mean = sum(l.relative_error for l in self.layers) / len(self.layers)
        lines = [f"  requantized {len(self.layers)} layers to {self.quant_type} (blocksize {self.blocksize}, "
                 f"double quant {self.double_quant}): added error ||W'-dq(q(W'))||/||W'|| mean {mean:.3g}, "
                 f"worst {worst.relative_error:.3g} ({worst.name})"]
        adapted = [l for l in self.layers if l.ratio_to_update is not None]
        if adapted:
            top = max(adapted, key=lambda l: l.ratio_to_update)
            lines.append(f"  added error / LoRA update ||s·B·A||_F: mean "
                         f"{sum(l.ratio_to_update for l in adapted) / len(adapted):.3g}, worst {top.ratio_to_update:.3g} "
                         f"({top.name})")
        return lines
