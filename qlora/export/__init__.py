"""Dequantize-and-merge export into a plain folder stock transformers loads, or one GGUF file; streamed, verified.

    from_files.py  export_adapter: a base checkpoint + an adapter folder -> merged folder, one tensor at a time
    from_model.py  export_merged: an in-memory (4-bit) model with adapters -> merged folder
    experts.py     fused experts matrices of a checkpoint, merged one matrix at a time
    result.py      ExportResult, the staging folder, the summary lines
    verify.py      the export against the unmerged model, and the live 4-bit one
    requantize.py  the merged layers re-quantized to 4-bit (--requantize)
    checkpoint.py  reading the base checkpoint one tensor at a time;  writer.py  the sharded safetensors writer
    layout.py      ModelLayout: a checkpoint read through transformers' conversion mapping (and reverted), by group
    gguf.py        export_gguf: the same merged stream (from_files.MergedBase) -> one llama.cpp/Ollama .gguf file
    gguf_names.py  llama.cpp's architecture keys, tensor names and layouts per model type
    gguf_vocab.py  the tokenizer and chat template as GGUF keys;  modelfile.py  the Ollama Modelfile beside the file
    gguf_lora.py   export_lora_gguf: the adapter alone as llama.cpp's LoRA GGUF (--adapter-only)
    gguf_verify.py the GGUF file read back (transformers' GGUF loader, llama.cpp if installed) against the merged model
"""
from qlora.export.from_files import export_adapter
from qlora.export.from_model import export_merged
from qlora.export.gguf import export_gguf
from qlora.export.result import ExportResult, report_dict, summary

__all__ = ["ExportResult", "export_adapter", "export_gguf", "export_merged", "report_dict", "summary"]
