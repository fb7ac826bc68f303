"""Test-local tiny models and a minimal LoRA / 4-bit toolkit, so memprofile's tests do not depend
on qlora (memprofile must not import it, and its tests should not need it either).

    model, config, make_batch = tiny_model("llama")          # bf16, 2 layers
    configure(model, "qlora-ckpt", arch="llama", rank=8)      # freeze, quantize, add LoRA, checkpoint
    batch = make_batch(batch=2, seq=32)

    traced("llama", "qlora-ckpt", batch=2, seq=32)            # the same step, predicted (memprofile.trace)

Conventions: LoRA on every Linear (or GPT-2 Conv1D) except the task head; 4-bit NF4 (blocksize
64, double quant) on the same modules; the head is trained alongside the adapters for
classification tasks only.
"""
from __future__ import annotations

import torch
from torch import nn

ARCHES = ("llama", "gpt2", "bert", "vit")
HEAD = {"llama": "lm_head", "gpt2": "lm_head", "bert": "classifier", "vit": "classifier"}
TRAIN_HEAD_WITH_ADAPTERS = {"llama": False, "gpt2": False, "bert": True, "vit": True}


def tiny_config(arch: str, layers: int = 2, image_size: int = 32):
    from transformers import BertConfig, GPT2Config, LlamaConfig, ViTConfig

    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                           max_position_embeddings=256)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=512, n_positions=256,
                          bos_token_id=0, eos_token_id=0)
    if arch == "bert":
        return BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=128, vocab_size=512, max_position_embeddings=256,
                          num_labels=3)
    if arch == "vit":
        return ViTConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=128, image_size=image_size, patch_size=8, num_labels=10)
    raise ValueError(arch)


def model_from_config(arch: str, config, dtype=torch.bfloat16, init: bool = True):
    """The model with seeded random weights; init=False skips the initialisation (under fake
    tensors: ViT's trunc_normal_ reads values) and ties the weights as init would."""
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

    cls = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM,
           "bert": AutoModelForSequenceClassification, "vit": AutoModelForImageClassification}[arch]
    torch.manual_seed(0)
    if init:
        return cls.from_config(config, dtype=dtype)
    from transformers.initialization import no_init_weights
    with no_init_weights():
        model = cls.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def make_batch_fn(arch: str, config, dtype=torch.bfloat16):
    def make_batch(batch: int, seq: int):
        g = torch.Generator().manual_seed(0)
        if arch == "vit":
            # for ViT, seq is the image side in pixels: (seq / patch)^2 + 1 tokens
            assert seq == config.image_size, "build the ViT with image_size=seq"
            return {"pixel_values": torch.randn(batch, 3, seq, seq, generator=g).to(dtype),
                    "labels": torch.randint(0, config.num_labels, (batch,), generator=g)}
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)  # values unused when fake
        if arch == "bert":
            return {"input_ids": ids, "labels": torch.randint(0, config.num_labels, (batch,), generator=g)}
        return {"input_ids": ids, "labels": ids.clone()}

    return make_batch


def traced(arch: str, configuration: str, batch: int, seq: int, layers: int = 2, rank: int = 8,
           dtype=torch.bfloat16):
    """memprofile.trace's prediction of the step tiny_model + configure + make_batch measure."""
    from memprofile.trace import trace_step

    config = tiny_config(arch, layers, image_size=seq if arch == "vit" else 32)
    make_batch = make_batch_fn(arch, config, dtype)
    build = lambda: configure(model_from_config(arch, config, dtype, init=False), configuration, arch, rank, dtype)  # noqa: E731
    return trace_step(build, lambda: make_batch(batch, seq))


def tiny_model(arch: str, dtype=torch.bfloat16, layers: int = 2, image_size: int = 32):
    """(model, config, make_batch); for ViT, `image_size` fixes the only `seq` make_batch takes."""
    config = tiny_config(arch, layers, image_size)
    model = model_from_config(arch, config, dtype)
    return model, config, make_batch_fn(arch, config, dtype)


# ----------------------------------------------------------------------------- LoRA
class LoraLinear(nn.Module):
    """y = base(x) + B(A(x)) * alpha/r; base frozen, A and B trainable (B starts at zero).
    Computed like peft's lora.Linear: the sum in the wider dtype, then cast back."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int,
                 alpha: float | None = None, dtype=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        dtype = dtype or next(p for p in base.parameters() if p.dtype.is_floating_point).dtype
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = (alpha or 2 * r) / r

    def forward(self, x):
        result = self.base(x)
        dtype = result.dtype
        result = result + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling
        return result.to(dtype)


def _linear_dims(m: nn.Module):
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, Conv1D):
        return m.weight.shape[0], m.weight.shape[1]
    import bitsandbytes as bnb

    if isinstance(m, bnb.nn.Linear4bit):
        return m.in_features, m.out_features
    return None


def linear_names(model: nn.Module, exclude=()) -> list[str]:
    def excluded(n):  # the module itself or anything inside it (RoBERTa's classifier.dense)
        return any(n == e or n.endswith("." + e) or n.startswith(e + ".") or f".{e}." in n
                   for e in exclude)

    return [n for n, m in model.named_modules() if _linear_dims(m) is not None and not excluded(n)]


def _set_module(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_lora(model: nn.Module, names: list[str], r: int, dtype=None):
    for n in names:
        m = model.get_submodule(n)
        fin, fout = _linear_dims(m)
        _set_module(model, n, LoraLinear(m, fin, fout, r, dtype=dtype))


def quantize(model: nn.Module, names: list[str], compute_dtype=torch.bfloat16):
    """Replace each named Linear/Conv1D by an NF4 bnb.nn.Linear4bit (blocksize 64, double quant)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    for n in names:
        m = model.get_submodule(n)
        w = m.weight.data.t() if isinstance(m, Conv1D) else m.weight.data
        fout, fin = w.shape
        q = bnb.nn.Linear4bit(fin, fout, bias=m.bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
        p = bnb.nn.Params4bit(w.contiguous(), requires_grad=False, quant_type="nf4",
                              compress_statistics=True, blocksize=64, module=q)
        q.weight = p._quantize("cpu")  # Params4bit.to("cpu") would not quantize: already on cpu
        assert q.weight.bnb_quantized and q.weight.dtype == torch.uint8
        if m.bias is not None:
            q.bias = nn.Parameter(m.bias.data.clone(), requires_grad=False)
        _set_module(model, n, q)


def configure(model: nn.Module, configuration: str, arch: str, rank: int = 8, dtype=torch.bfloat16):
    """Apply one of full/head/lora/lora-ckpt/qlora/qlora-ckpt, the estimator's default way."""
    base, _, ckpt = configuration.partition("-")
    head = HEAD[arch]
    if base == "full":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        targets = linear_names(model, exclude=(head,))
        if base == "qlora":
            quantize(model, targets, compute_dtype=dtype)
        if base in ("lora", "qlora"):
            add_lora(model, targets, rank, dtype=dtype)
        if base == "head" or TRAIN_HEAD_WITH_ADAPTERS[arch]:
            model.get_submodule(head).requires_grad_(True)
    if ckpt == "ckpt":
        model.gradient_checkpointing_enable()
    return model
