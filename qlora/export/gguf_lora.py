"""A LoRA adapter as llama.cpp's LoRA GGUF (`--adapter-only`): the adapter alone, applied by llama.cpp at load time.

    qlora export --base BASE --adapter ADAPTER --out adapter.gguf --format gguf --adapter-only [--dtype f16|bf16]
    export_lora_gguf(base, adapter, out)          # llama-cli -m base.gguf --lora adapter.gguf; Ollama: ADAPTER

The format of llama.cpp's convert_lora_to_gguf.py (our code): general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and per adapted weight `<llama.cpp name>.lora_a` (A, [r, in]) and `.lora_b` (B, [out, r]);
llama.cpp adds alpha / r · B·A to the weight. B's rows are the weight's rows, so they get the weight's layout
change (Llama's q/k permutation, qlora.export.gguf_names); A is unchanged. The base's architecture and config
come from the base folder. Only linear layers with one scaling for all (llama.cpp has one alpha per file);
experts, embeddings and modules_to_save are refused in one line. Note the adapter was trained against the NF4
base dequant(quant(W)); llama.cpp adds it to whatever base GGUF it loads (merge instead, `qlora export
--format gguf`, for the exact trained model). Run: pytest tests/qlora/export/test_gguf.py -k adapter_only.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from qlora.errors import QLoRAError
from qlora.export.from_files import MergedBase
from qlora.export.gguf import encode_rows, tensor_bytes, torch_placeholder
from qlora.export.gguf_names import arch_spec
from qlora.util.staging import make_public, publish, staging_folder

ADAPTER_DTYPES = ("f16", "bf16")


def export_lora_gguf(base, adapter, out, *, dtype: str = "f16", force: bool = False) -> dict:
    """Write `adapter` (trained on `base`) as a llama.cpp LoRA GGUF at `out`; returns {name: shape} written."""
    import gguf  # lazy: gguf is needed only to write GGUF files

    if dtype not in ADAPTER_DTYPES:
        raise QLoRAError(f"--adapter-only writes the LoRA matrices in {' or '.join(ADAPTER_DTYPES)}, not {dtype!r}")
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise QLoRAError(f"--out {out}: a GGUF export writes one file; name it *.gguf")
    if out.exists() and not force:
        raise QLoRAError(f"{out} already exists; pass --force (force=True) to replace it, or choose another --out")
    if adapter is None:
        raise QLoRAError("--adapter-only needs --adapter (the adapter to write)")
    src = MergedBase(base, adapter)
    config = src.layout.model.config
    spec = arch_spec(config)
    alpha = lora_alpha(src)
    tensors = lora_tensors(src, spec, config)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    tmp = staging_folder(out)
    try:
        writer = gguf.GGUFWriter(tmp / out.name, spec.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(adapter).name)
        for name, t in tensors:
            writer.add_tensor_info(name, tuple(t.shape), torch_placeholder(), tensor_bytes(tuple(t.shape), qtype),
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        for _, t in tensors:                  # small matrices ([r, in], [out, r]): each written whole
            writer.tensors[0].pop(next(iter(writer.tensors[0])))
            writer.write_padding(fout, fout.tell())
            data = encode_rows(t.contiguous(), qtype)
            data.tofile(fout)
            writer.write_padding(fout, data.nbytes)
        writer.close()
        make_public(tmp / out.name)
        publish(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: tuple(t.shape) for name, t in tensors}


def lora_alpha(src: MergedBase) -> float:
    """llama.cpp's one alpha (scale = alpha / r) giving every adapted layer its PEFT scaling."""
    alphas = {round(src.config.scaling_for(path) * a.shape[0], 6) for path, (a, _, _) in src.updates.items()}
    if len(alphas) != 1:
        raise QLoRAError(f"the adapter's layers have different scalings (alpha/r: {sorted(alphas)}); llama.cpp's LoRA "
                         "GGUF has one alpha per file. Merge instead (qlora export --format gguf without --adapter-only)")
    return float(alphas.pop())


def lora_tensors(src: MergedBase, spec, config) -> list[tuple[str, torch.Tensor]]:
    """[(`<gguf weight name>.lora_a`, A [r, in]), (`....lora_b`, B [out, r] in the weight's GGUF row order)]."""
    if src.experts is not None or src.saved:
        what = "experts matrices" if src.experts is not None else f"modules_to_save ({sorted(src.saved)[0]!r})"
        raise QLoRAError(f"--adapter-only writes LoRA on linear layers; this adapter also has {what}. Merge instead "
                         "(qlora export --format gguf without --adapter-only)")
    out = []
    for path in sorted(src.updates):
        a, b, kind = src.updates[path]
        if kind != "linear":
            raise QLoRAError(f"--adapter-only writes LoRA on linear layers; {path!r} is a {kind} LoRA. Merge instead")
        (name, b_rows), = spec.tensors(path + ".weight", b.float(), config)      # B's rows are the weight's rows
        out += [(name + ".lora_a", a.float()), (name + ".lora_b", b_rows)]
    return out
