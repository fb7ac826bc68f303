"""Dequantize-and-merge export into a plain folder stock transformers loads, streamed and verified.

    merge.py       export_adapter (from files);  live.py  export_merged (from an in-memory model)
    verify.py      the export against the unmerged model, and the live 4-bit one
    requantize.py  the merged layers re-quantized to 4-bit (--requantize)
    checkpoint.py  reading the base checkpoint one tensor at a time;  writer.py  the sharded safetensors writer
"""
from qlora.export.common import ExportResult, report_dict, summary
from qlora.export.live import export_merged
from qlora.export.merge import export_adapter

__all__ = ["ExportResult", "export_adapter", "export_merged", "report_dict", "summary"]
