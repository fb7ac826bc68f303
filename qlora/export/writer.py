"""Write safetensors shards one tensor at a time, so memory never holds more than one tensor.

safetensors' own `save_file` needs every tensor of a file in memory at once. The format is
simple enough to stream: an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw bytes in that order. Knowing every output
shape and dtype up front (from the input's metadata), we write the header first and then each
tensor as it is produced.

    plan = plan_shards({"a.weight": ((4, 8), torch.bfloat16), ...}, max_shard_bytes=2 << 30)
    with ShardedWriter(folder, plan) as w:
        for name in plan.order:
            w.write(name, tensor)        # in plan.order, each exactly once
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora.errors import QLoRAError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
"""torch dtype -> its name in a safetensors header (the one table; base_checkpoint reads it backwards)."""


@dataclass
class ShardPlan:
    """Which tensor goes into which file, in write order."""
    files: list[list[str]] = field(default_factory=list)   # per file: tensor names in order
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)

    @property
    def order(self) -> list[str]:
        return [name for names in self.files for name in names]

    def file_names(self) -> list[str]:
        n = len(self.files)
        if n == 1:
            return ["model.safetensors"]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def total_bytes(self) -> int:
        return sum(_nbytes(*spec) for spec in self.specs.values())


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> ShardPlan:
    """Greedy, in the given order, like transformers: start a new file when the next tensor would
    push the current one past `max_shard_bytes` (a tensor larger than that gets a file of its own)."""
    plan = ShardPlan(specs=dict(specs))
    current, size = [], 0
    for name, (shape, dtype) in specs.items():
        nbytes = _nbytes(shape, dtype)
        if current and size + nbytes > max_shard_bytes:
            plan.files.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not plan.files:
        plan.files.append(current)
    return plan


class ShardedWriter:
    """Streams tensors into the files of a ShardPlan and writes model.safetensors.index.json."""

    def __init__(self, folder, plan: ShardPlan):
        self.folder = Path(folder)
        self.plan = plan
        self._names = plan.file_names()
        self._file_of = {n: i for i, names in enumerate(plan.files) for n in names}
        self._expected = iter(plan.order)
        self._open_index = -1
        self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._fh:
            self._fh.close()
        if exc_type is None:
            self._finish()

    def _start_file(self, index: int) -> None:
        if self._fh:
            self._fh.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in self.plan.files[index]:
            shape, dtype = self.plan.specs[name]
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)                  # the format pads the header to 8 bytes
        self._fh = open(self.folder / self._names[index], "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._open_index = index

    def write_stream(self, name: str, chunks) -> None:
        """Write tensor `name` from an iterable of flat pieces (in order, the planned dtype), so a large
        tensor never has to sit in memory whole."""
        self._write_pieces(name, chunks)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shape, dtype = self.plan.specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise QLoRAError(f"internal: {name} is {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        self._write_pieces(name, [tensor])

    def _write_pieces(self, name: str, pieces) -> None:
        expected = next(self._expected, None)
        if name != expected:
            raise QLoRAError(f"internal: tensor {name!r} written out of plan order (expected {expected!r})")
        shape, dtype = self.plan.specs[name]
        index = self._file_of[name]
        if index != self._open_index:
            self._start_file(index)
        written = 0
        for piece in pieces:
            if piece.dtype != dtype:
                raise QLoRAError(f"internal: a piece of {name} is {piece.dtype}, planned {dtype}")
            data = piece.detach().to("cpu").contiguous().reshape(-1)
            # the array's own buffer: .tobytes() would copy the tensor once more (the peak, for the largest)
            self._fh.write(data.view(torch.uint8).numpy() if data.numel() else b"")
            written += data.numel()
        if written != math.prod(shape):
            raise QLoRAError(f"internal: {name} got {written} elements, planned {math.prod(shape)}")

    def _finish(self) -> None:
        if next(self._expected, None) is not None:
            raise QLoRAError("internal: not every planned tensor was written")
        if len(self._names) > 1:
            index = {"metadata": {"total_size": self.plan.total_bytes()},
                     "weight_map": {n: self._names[i] for n, i in self._file_of.items()}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
