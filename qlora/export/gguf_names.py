"""What llama.cpp calls a model: its architecture name, hyperparameter keys and tensor names, per model type.

    spec = arch_spec(config)                       # or QLoRAError naming the model type and what is supported
    spec.write_hparams(writer, config)             # llama.context_length, llama.attention.head_count, ...
    for gguf_name, t in spec.tensors(name, t):     # one model tensor -> its GGUF tensor(s), llama.cpp's layout
        ...

Learned from llama.cpp's convert_hf_to_gguf.py (our own code): tensor names come from gguf-py's TensorNameMap
(the table llama.cpp converts with, and transformers' GGUF loader reads back with); what this file adds is what
convert_hf_to_gguf.py does to the values. Llama/Mistral: q and k rows permuted (LlamaModel.permute: llama.cpp's
rope rotates adjacent pairs, transformers' rotates halves); Gemma 2/3: RMSNorm weights stored as 1 + w (the
model multiplies by 1 + w, llama.cpp by the stored value); Qwen3-MoE: transformers' fused experts gate_up_proj
[E, 2I, H] split into ffn_gate_exps and ffn_up_exps [E, I, H]; rope scaling: linear and YaRN as metadata, Llama
3's as a tensor of per-pair frequency factors (rope_freqs.weight). Run: pytest tests/qlora/export/test_gguf.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlora.errors import QLoRAError


@dataclass(frozen=True)
class ArchSpec:
    model_type: str           # transformers' config.model_type
    arch: str                 # gguf-py's MODEL_ARCH member name (LLAMA, QWEN2, ...)
    permute_qk: bool = False  # Llama rope: q/k rows reordered from halves to adjacent pairs
    norm_plus_one: bool = False   # Gemma: norm weights stored as 1 + w
    experts: bool = False     # stacked experts matrices (ffn_*_exps)

    @property
    def gguf_arch(self):
        import gguf  # lazy: gguf is needed only to write GGUF files
        return getattr(gguf.MODEL_ARCH, self.arch)

    @property
    def name(self) -> str:
        """llama.cpp's architecture string (general.architecture, the hparam key prefix)."""
        import gguf  # lazy: gguf is needed only to write GGUF files
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def tensors(self, name: str, t: torch.Tensor, config) -> list[tuple[str, torch.Tensor]]:
        """GGUF (name, tensor) pairs for model tensor `name` (empty: not written, e.g. a tied head).
        Works on meta tensors too (shapes only), which is how the file's tensor table is planned."""
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and tied(config)):
            return []
        stem, _, suffix = name.rpartition(".")
        if self.experts and stem.endswith(".mlp.experts") and suffix == "gate_up_proj":
            block = _block(stem)
            half = t.shape[1] // 2                 # [E, 2I, H]: gate rows first, then up (transformers' fusion)
            return [(f"blk.{block}.ffn_gate_exps.weight", t[:, :half]), (f"blk.{block}.ffn_up_exps.weight",
                                                                          t[:, half:])]
        if self.experts and stem.endswith(".mlp.experts") and suffix == "down_proj":
            return [(f"blk.{_block(stem)}.ffn_down_exps.weight", t)]     # [E, H, I]
        gguf_stem = self.name_map(config).get_name(stem)
        if gguf_stem is None:
            raise QLoRAError(f"tensor {name!r} has no llama.cpp name for architecture {self.name!r} (gguf-py's "
                             "TensorNameMap); this checkpoint cannot be written as GGUF yet. Nothing was written.")
        if self.permute_qk and suffix == "weight" and stem.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config.num_attention_heads if stem.endswith("q_proj") else config.num_key_value_heads
            t = permute_rope(t, heads)
        if self.norm_plus_one and suffix == "weight" and stem.endswith("norm"):
            t = t.float() + 1                      # fp32: 1 + w rounds once, at the output dtype
        return [(f"{gguf_stem}.{suffix}", t)]

    def extra_tensors(self, config) -> list[tuple[str, torch.Tensor]]:
        """GGUF tensors that are no model tensor: Llama 3's rope frequency factors (`rope_freqs.weight`)."""
        if rope_scaling(config) != "llama3":
            return []
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return [("rope_freqs.weight", llama3_rope_factors(rope_parameters(config), head_dim))]

    def name_map(self, config):
        import gguf  # lazy: gguf is needed only to write GGUF files
        return gguf.get_tensor_name_map(self.gguf_arch, config.num_hidden_layers)

    def write_hparams(self, writer, config) -> None:
        """The `{arch}.*` keys llama.cpp reads for this model (convert_hf_to_gguf.py's set_gguf_parameters)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        theta = rope_theta(config)
        if theta is not None:
            writer.add_rope_freq_base(theta)
        if head_dim != config.hidden_size // config.num_attention_heads or self.model_type in GEMMAS + QWEN3S:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        rotary = int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0))
        writer.add_rope_dimension_count(rotary)
        scaling, params = rope_scaling(config), rope_parameters(config)
        if scaling in ("linear", "yarn"):
            import gguf  # lazy: gguf is needed only to write GGUF files
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if scaling == "linear" else gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(params["factor"])
            if scaling == "yarn":
                writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        if self.experts:
            writer.add_expert_count(config.num_experts)
            writer.add_expert_used_count(config.num_experts_per_tok)
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if self.model_type in GEMMAS and getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
        if self.model_type == "gemma3_text" and getattr(config, "layer_types", None):
            # which layers slide (llama.cpp assumes every sixth full otherwise)
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
        if self.model_type == "gemma2":
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if self.model_type == "phi3" and getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)


GEMMAS = ("gemma2", "gemma3_text")
QWEN3S = ("qwen3", "qwen3_moe")
SPECS = {s.model_type: s for s in (
    ArchSpec("llama", "LLAMA", permute_qk=True),
    ArchSpec("mistral", "LLAMA", permute_qk=True),      # llama.cpp writes Mistral as a Llama
    ArchSpec("qwen2", "QWEN2"),
    ArchSpec("qwen3", "QWEN3"),
    ArchSpec("qwen3_moe", "QWEN3MOE", experts=True),
    ArchSpec("gemma2", "GEMMA2", norm_plus_one=True),
    ArchSpec("gemma3_text", "GEMMA3", norm_plus_one=True),
    ArchSpec("phi3", "PHI3"),
)}


def arch_spec(config) -> ArchSpec:
    """The spec of a transformers config, or one line naming the model type and what is supported."""
    spec = SPECS.get(config.model_type)
    if spec is None:
        raise QLoRAError(f"GGUF export does not support model type {config.model_type!r} yet; supported: "
                         f"{', '.join(sorted(SPECS))}. Export a folder instead (--format folder). Nothing was written.")
    scaling, params = rope_scaling(config), rope_parameters(config)
    written = {"default": (), "linear": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    kept = {"rope_type", "rope_theta", "type", *written.get(scaling, ())} | (
        {"beta_fast", "beta_slow", "truncate"} if scaling == "yarn" else set())   # checked below: llama.cpp's values
    if scaling not in (None, "default") and (scaling not in written or (scaling == "llama3" and spec.arch != "LLAMA")
                                or set(params) - kept or params.get("beta_fast", 32) != 32
                                or params.get("beta_slow", 1) != 1 or params.get("truncate", True) is not True):
        raise QLoRAError(f"GGUF export does not write rope scaling {scaling!r} with {dict(params)} (model type "
                         f"{config.model_type}) yet; it writes linear, yarn (llama.cpp's defaults) and llama3 "
                         "(Llama). Export a folder instead. Nothing was written.")
    if spec.model_type == "gemma2" and getattr(config, "query_pre_attn_scalar", None) not in (
            None, getattr(config, "head_dim", None)):
        raise QLoRAError(f"Gemma 2 with query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim "
                         f"{config.head_dim}: llama.cpp infers the attention scale from the model size, which this "
                         "export cannot check; export a folder instead. Nothing was written.")
    if spec.experts and (getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1
                         or not getattr(config, "norm_topk_prob", True)):
        raise QLoRAError("GGUF export of Qwen3-MoE needs every layer sparse (decoder_sparse_step 1, no "
                         "mlp_only_layers) and norm_topk_prob true, as llama.cpp computes it. Nothing was written.")
    return spec


def rope_parameters(config) -> dict:
    """transformers 5's rope_parameters (per layer type for Gemma 3: the full-attention layers')."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        params = params["full_attention"]
    return params


def llama3_rope_factors(params: dict, head_dim: int) -> torch.Tensor:
    """Llama 3.1's rope scaling as llama.cpp reads it: one factor per rotated pair (rope_freqs.weight, [head_dim /
    2] fp32) by which it divides that pair's frequency. Wavelengths shorter than original / high_freq_factor keep
    theirs (1), longer than original / low_freq_factor are divided by `factor`, and in between the division is
    smoothed linearly in original / wavelength (Meta's formula, as transformers' `_compute_llama3_parameters`)."""
    theta, factor = params.get("rope_theta", 10000.0), params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen < original / high, 1.0, torch.where(wavelen > original / low, factor, factors))
    return factors.float()


def rope_theta(config):
    return getattr(config, "rope_theta", None) or rope_parameters(config).get("rope_theta")


def rope_scaling(config):
    scaling = getattr(config, "rope_scaling", None) or {}
    return rope_parameters(config).get("rope_type") or scaling.get("rope_type") or scaling.get("type")


def tied(config) -> bool:
    """Whether the output head is the token embedding (llama.cpp then has no `output.weight`)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows [heads·d, in] from transformers' rotate-half order to llama.cpp's interleaved pairs:
    per head, rows (0..d/2, d/2..d) -> (0, d/2, 1, d/2+1, ...). transformers' GGUF loader undoes exactly this."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _block(stem: str) -> int:
    """The layer index in `model.layers.N....`."""
    parts = stem.split(".")
    return int(parts[parts.index("layers") + 1])
