"""GGUF export: base folder (+ adapter) -> one llama.cpp / Ollama `.gguf` file of the merged model, streamed.

    qlora export --base BASE [--adapter ADAPTER] --out model.gguf --format gguf --dtype f16|bf16|q8_0
                 [--dtype q4_k_m|q5_k_m|q6_k]         # K-quants: through llama.cpp's quantizer (llama-cpp-python)
    export_gguf(base, adapter, out, dtype="f16")       # the function behind it; adapter=None: the base as is

The merged tensors come from qlora.export.from_files.MergedBase, the stream the folder export writes (the same
merge, one converted group at a time); qlora.export.gguf_names gives each its llama.cpp name and layout,
qlora.export.gguf_vocab the tokenizer and chat template. The tensor table is planned from the checkpoint's
headers (meta tensors), then the data written one tensor at a time in row pieces: memory is about one tensor
(fp32) above the imports. f16/bf16/q8_0 are written here (q8_0 with gguf-py's quantizer); 1-D tensors (norms,
biases) and the MoE router stay F32, as llama.cpp writes them. K-quants: an f16 file is written to a temporary
name and quantized by llama_cpp.llama_model_quantize. Everything goes into `.NAME.tmp-PID/` beside `out` and is
renamed at the end, with an Ollama Modelfile beside it (qlora.export.modelfile); then the file is read back and
checked (qlora.export.gguf_verify). Run: pytest tests/qlora/export/test_gguf.py.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlora.errors import QLoRAError
from qlora.export.from_files import MergedBase
from qlora.export.gguf_names import ArchSpec, arch_spec
from qlora.export.gguf_vocab import write_tokenizer
from qlora.export.result import ExportResult
from qlora.util.staging import make_public, publish, staging_folder

WRITTEN = ("f16", "bf16", "q8_0")                 # written by this module
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")           # written by llama.cpp's quantizer from an f16 file
GGUF_DTYPES = WRITTEN + K_QUANTS
PIECE_BYTES = 16 << 20                            # fp32 rows converted and written at a time
INSTALL_LLAMA_CPP = ("pip install llama-cpp-python  (a source build of llama.cpp: several minutes to tens of "
                     "minutes on a few cores; see docs/export.md#gguf)")


def check_gguf_dtype(dtype: str) -> str:
    """The dtype name, lower case; one line naming the choices otherwise; K-quants without llama_cpp refused."""
    name = str(dtype).lower().replace("-", "_")
    name = {"float16": "f16", "fp16": "f16", "bfloat16": "bf16"}.get(name, name)
    if name not in GGUF_DTYPES:
        raise QLoRAError(f"--dtype {dtype!r} is not a GGUF type qlora writes; use one of {', '.join(GGUF_DTYPES)}")
    if name in K_QUANTS and importlib.util.find_spec("llama_cpp") is None:
        raise QLoRAError(f"GGUF type {name} is a K-quant, made by llama.cpp's quantizer, and llama_cpp is not installed: "
                         f"{INSTALL_LLAMA_CPP}; or export --dtype q8_0 / f16. Nothing was written.")
    return name


def export_gguf(base, adapter, out, *, dtype: str = "f16", merge_onto: str = "dequantized", force: bool = False,
                verify: bool = True, modelfile: bool = True, progress: bool = True) -> ExportResult:
    """Merge `adapter` (None: none) into the base folder `base` and write one GGUF file `out`."""
    name = check_gguf_dtype(dtype)
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise QLoRAError(f"--out {out}: a GGUF export writes one file; name it *.gguf")
    if out.exists() and not force:
        raise QLoRAError(f"{out} already exists; pass --force (force=True) to replace it, or choose another --out")
    if out.is_dir():
        raise QLoRAError(f"{out} is a folder; choose a file name for the GGUF export")
    beside = out.with_name(modelfile_name(out))
    if modelfile and beside.exists() and not force:
        raise QLoRAError(f"{beside} already exists (the Modelfile written beside the GGUF); pass --force to replace "
                         "it, or choose another --out")
    src = MergedBase(base, adapter, merge_onto=merge_onto)
    config = src.layout.model.config
    spec = arch_spec(config)
    result = ExportResult(out=out, dtype=name, merge_onto=merge_onto)
    src.layers = result.layers
    tmp = staging_folder(out)             # .NAME.tmp-PID/ beside out: the file, the Modelfile, a K-quant's f16
    try:
        written = tmp / out.name
        f16_first = name in K_QUANTS
        result.warnings += write_gguf(src, spec, written.with_suffix(".f16.gguf") if f16_first else written,
                                      "f16" if f16_first else name, progress)
        if f16_first:
            result.warnings += quantize_with_llama_cpp(written.with_suffix(".f16.gguf"), written, name)
        if modelfile:
            from qlora.export.modelfile import write_modelfile  # lazy: only with the Modelfile
            result.warnings += write_modelfile(tmp / modelfile_name(out), out.name, src.folder)
        if verify:
            from qlora.export.gguf_verify import verify_gguf  # lazy: loads transformers' GGUF reader
            result.verification = verify_gguf(written, src, name)
        make_public(written)
        publish(written, out)
        if modelfile:
            publish(tmp / modelfile_name(out), beside)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def modelfile_name(out: Path) -> str:
    """`model.gguf` -> `model.Modelfile` (beside it: `ollama create NAME -f model.Modelfile`)."""
    return Path(out).stem + ".Modelfile"


def write_gguf(src: MergedBase, spec: ArchSpec, path: Path, dtype: str, progress: bool = True) -> list[str]:
    """Write the merged model to `path` in `dtype` (f16 | bf16 | q8_0); returns warnings."""
    import gguf  # lazy: gguf is needed only to write GGUF files

    config = src.layout.model.config
    plan = plan_tensors(src, spec, dtype)                 # [(group, [(gguf name, shape, ggml type)])]
    writer = gguf.GGUFWriter(path, spec.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(src.folder.name)
    spec.write_hparams(writer, config)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    warnings = write_tokenizer(writer, src.folder, config.vocab_size)
    for _, tensors in plan:
        for gname, shape, qtype in tensors:
            writer.add_tensor_info(gname, shape, torch_placeholder(), tensor_bytes(shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for group, tensors in tqdm(plan, desc="gguf", unit="group", disable=not progress):
            types = {g: q for g, _, q in tensors}
            if group is None:                             # tensors of no model tensor (rope_freqs)
                for gname, gt in spec.extra_tensors(config):
                    write_tensor(writer, gt, types[gname])
                continue
            made = src.group_tensors(group)               # one group, merged (fp32 where merged)
            for name, t in made.items():
                for gname, gt in spec.tensors(name, t, config):
                    write_tensor(writer, gt, types[gname])
            del made
    finally:
        writer.close()
    return warnings


def plan_tensors(src: MergedBase, spec: ArchSpec, dtype: str) -> list:
    """Every GGUF tensor in write order, from meta tensors: [(group, [(name, shape, ggml type)])]."""
    config = src.layout.model.config
    plan = []
    for group in src.layout.groups:
        tensors = []
        for name, shape in group.shapes.items():
            meta = torch.empty(shape, device="meta")
            for gname, t in spec.tensors(name, meta, config):
                tensors.append((gname, tuple(t.shape), ggml_type(gname, tuple(t.shape), dtype)))
        plan.append((group, tensors))
    extra = spec.extra_tensors(config)
    if extra:
        plan.insert(0, (None, [(n, tuple(t.shape), ggml_type(n, tuple(t.shape), dtype)) for n, t in extra]))
    if src.new_heads:
        raise QLoRAError(f"the adapter saves {sorted(src.new_heads)[0]!r}, which the base checkpoint does not "
                         "have; GGUF export writes causal LMs of the base's layout. Nothing was written.")
    return plan


def ggml_type(name: str, shape: tuple, dtype: str):
    """llama.cpp's choice for one tensor: F32 for 1-D tensors and the MoE router, F16 where a q8_0 row does
    not split into 32-value blocks, else `dtype`."""
    import gguf  # lazy: gguf is needed only to write GGUF files
    q = gguf.GGMLQuantizationType
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return q.F32
    if dtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]:
        return q.F16
    return {"f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[dtype]


def tensor_bytes(shape: tuple, qtype) -> int:
    import gguf  # lazy: gguf is needed only to write GGUF files
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for s in shape:
        n *= s
    return n // block * size


def torch_placeholder():
    """GGUFWriter.add_tensor_info wants a numpy dtype; with raw_dtype given, any non-uint8 one keeps the
    shape as given (logical elements, not bytes)."""
    import numpy as np  # lazy: with gguf
    return np.dtype(np.float32)


def encode_rows(rows: torch.Tensor, qtype):
    """One piece [n, last] of a tensor as the file's bytes (numpy): f32/f16/bf16 cast, q8_0 by gguf-py."""
    import gguf  # lazy: gguf is needed only to write GGUF files
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return rows.float().numpy()
    if qtype == q.F16:
        return rows.to(torch.float16).numpy()
    if qtype == q.BF16:
        return rows.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(rows.float().numpy(), qtype)


def write_tensor(writer, t: torch.Tensor, qtype) -> None:
    """Append one tensor's data in row pieces (~PIECE_BYTES of fp32 each), in the tensor table's order."""
    fout = writer.fout[0]
    info = writer.tensors[0].pop(next(iter(writer.tensors[0])))    # the table's next entry: this tensor
    rows = t.detach().reshape(-1, t.shape[-1]) if t.dim() > 1 else t.detach().reshape(1, -1)
    step = max(1, PIECE_BYTES // (4 * rows.shape[1]))
    writer.write_padding(fout, fout.tell())
    written = 0
    for i in range(0, rows.shape[0], step):
        data = encode_rows(rows[i:i + step].contiguous(), qtype)
        data.tofile(fout)
        written += data.nbytes
    if written != info.nbytes:
        raise QLoRAError(f"internal: wrote {written} bytes for a tensor planned as {info.nbytes}")
    writer.write_padding(fout, written)


def quantize_with_llama_cpp(f16: Path, out: Path, dtype: str) -> list[str]:
    """llama.cpp's own K-quant of an f16 GGUF (llama_model_quantize, as its llama-quantize tool); its log (written
    by C to the process's stderr) is kept out of the terminal and summed up in the returned warning lines."""
    import llama_cpp  # lazy: optional, only for K-quants

    ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
             "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K}[dtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    with tempfile.TemporaryFile(mode="w+b") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    if rc != 0:
        last = [line for line in text.splitlines() if line.strip()][-1:] or [""]
        raise QLoRAError(f"llama.cpp's quantizer failed ({rc}) on {f16} -> {dtype}: {last[0].strip()}; "
                         "nothing was written")
    f16.unlink()
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback quantization", text)
    kinds = sorted(set(re.findall(r"falling back to\s+(\w+)", text)))
    if not fallback:
        return []
    return [f"llama.cpp's {dtype}: {fallback.group(1)} of {fallback.group(2)} tensors have rows that do not split "
            f"into its 256-value K-quant blocks and were written as {' / '.join(kinds) or 'a fallback type'} "
            "(as llama-quantize does)"]
