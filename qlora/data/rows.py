"""Reading rows of data: files, folders and Hub data sets, the format of their columns, seeded splits.

    rows = read_rows("my.jsonl")                       # [Row(where="my.jsonl:3", data={...})]
    rows = read_rows("chats/")                         # every .jsonl/.json/.csv/.parquet below it, sorted
    rows = read_rows("HuggingFaceH4/ultrachat_200k", split="train_sft")   # a Hub data set
    fmt = match_format(rows, "auto", {"text": ("text",)}, "text")   # the first format whose columns they have
    train, held_out = read_splits("my.jsonl", eval_fraction=0.05, seed=0)

Every row keeps where it came from (file:line, file row N, name[split] row N): every error names it.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch

from qlora.errors import QLoRAError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100
"""The label of a token the loss is not on."""


@dataclass
class Row:
    where: str
    """file:line (JSONL), file row N (others) or hub[split] row N: named in every error."""
    data: dict
    folder: Optional[Path] = None
    """The folder of the data file it came from: relative image paths start there (None: a Hub data set)."""


@dataclass
class Counts:
    """What encoding did to the rows: the counts every loader keeps (each adds its own)."""
    rows: int = 0
    """Rows read."""
    kept: int = 0
    """Examples that train (or evaluate)."""
    cut: int = 0
    """Examples longer than max_length, truncated."""
    dropped: int = 0
    """Examples left with nothing to learn after the cut (skipped)."""

    LINE: ClassVar[str] = "{name}: {rows:,} rows -> {kept:,} kept; {cut:,} cut to max_length={max_length}, {dropped:,} dropped"
    """The one-line report, formatted with the counts, `name` and `max_length`."""

    def line(self, name: str, max_length: int) -> str:
        return self.LINE.format(name=name, max_length=max_length, **dataclasses.asdict(self))


def looks_local(spec: str) -> bool:
    return spec.endswith(SUFFIXES) or spec.startswith(("/", "./", "../", "~"))


def read_rows(spec: str, split: str = "train") -> list[Row]:
    """Every row of a file, of every data file in a folder (sorted, recursive), or of a Hub data set."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise QLoRAError(f"data folder {spec} holds no {', '.join(SUFFIXES)} files")
    elif path.is_file():
        if path.suffix not in SUFFIXES:
            raise QLoRAError(f"data file {spec}: unknown type {path.suffix!r}; use {', '.join(SUFFIXES)}")
        files = [path]
    elif looks_local(spec):
        raise QLoRAError(f"data file {spec} not found")
    else:
        return _hub_rows(spec, split)
    rows = [row for f in files for row in _file_rows(f)]
    if not rows:
        raise QLoRAError(f"data {spec} has no rows (empty file{'s' if len(files) > 1 else ''})")
    return rows


def _hub_rows(name: str, split: str) -> list[Row]:
    try:
        from datasets import load_dataset  # lazy: datasets costs ~0.5 s, only Hub data sets need it
        ds = load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 -- offline, unknown name, unknown split: one line, not a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise QLoRAError(f"data={name!r} is not a local file or folder, and the Hub data set could not be "
                         f"loaded (split {split!r}): {first}") from None
    return [Row(f"{name}[{split}] row {i + 1}", dict(r)) for i, r in enumerate(ds)]


def _file_rows(path: Path) -> list[Row]:
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise QLoRAError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(value, dict):
                raise QLoRAError(f"{path}:{n}: each line must be a JSON object with named columns; got "
                                 f"{type(value).__name__}")
            rows.append(Row(f"{path}:{n}", value, path.parent))
        return rows
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise QLoRAError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
            n = len(next(iter(value.values())))       # a dict of columns {col: [values]}
            value = [{k: v[i] for k, v in value.items()} for i in range(n)]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise QLoRAError(f"{path}: give a JSON list of objects (one per example) or a dict of columns")
        return [Row(f"{path} row {i + 1}", v, path.parent) for i, v in enumerate(value)]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [Row(f"{path} row {i + 1}", dict(r), path.parent) for i, r in enumerate(csv.DictReader(f))]
    import pyarrow.parquet as pq  # lazy: pyarrow (with datasets) only for .parquet files
    return [Row(f"{path} row {i + 1}", r, path.parent) for i, r in enumerate(pq.read_table(path).to_pylist())]


def match_format(rows: list[Row], fmt: str, formats: dict[str, tuple], accepted: str) -> str:
    """The format of these rows: `fmt` checked against the columns of the first row, or ("auto") the first of
    `formats` ({name: needed columns}) that they have. `accepted` describes the formats in the error."""
    columns = sorted(rows[0].data)
    source = rows[0].where.rsplit(":", 1)[0].split(" row ")[0]
    if fmt == "auto":
        for name, needed in formats.items():
            if set(needed) <= set(columns):
                return name
        closest = max(formats, key=lambda name: len(set(formats[name]) & set(columns)))
        missing = [c for c in formats[closest] if c not in columns]
        hint = f" (closest: {closest}, which needs {missing})" if len(missing) < len(formats[closest]) else ""
        raise QLoRAError(f"{source}: columns {columns} fit no format{hint}; accepted: {accepted} (or set format=)")
    if fmt not in formats:
        raise QLoRAError(f"format={fmt!r}; use auto or one of {', '.join(formats)}")
    missing = [c for c in formats[fmt] if c not in columns]
    if missing:
        raise QLoRAError(f"{source}: format={fmt} needs the column(s) {missing}; columns found: {columns}")
    return fmt


def field_value(row: Row, name: str, optional: bool = False):
    value = row.data.get(name)
    if value is None and not optional:
        raise QLoRAError(f"{row.where}: no {name!r} value (columns: {sorted(row.data)})")
    if isinstance(value, str) and value.lstrip().startswith("[") and name in ("messages", "prompt", "completion"):
        try:                          # CSV cells hold messages as JSON text
            parsed = json.loads(value)
            if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed):
                return parsed
        except json.JSONDecodeError:
            pass
    return value


def chat_messages(row: Row, value, what: str) -> list[dict]:
    """The row's messages, checked: roles, text content, no empty assistant turn. A content given as a list of
    parts ({"type": "text", "text": ...} / {"type": "image", ...}) stays a list when it holds an image (each image
    part keeps its own source: path, url or image), else becomes its joined text."""
    if not isinstance(value, list) or not value:
        raise QLoRAError(f"{row.where}: {what} must be a non-empty list of {{role, content}}; got {value!r:.80}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise QLoRAError(f"{row.where}: {what}[{j}] must be {{\"role\": ..., \"content\": ...}}; got {m!r:.80}")
        if m["role"] not in ROLES:
            raise QLoRAError(f"{row.where}: {what}[{j}] has role {m['role']!r}; allowed: {', '.join(ROLES)}")
        content = m["content"]
        if isinstance(content, list):
            content = _parts(row, content, f"{what}[{j}]")
        elif not isinstance(content, str):
            raise QLoRAError(f"{row.where}: {what}[{j}] content must be text or a list of parts; got "
                             f"{type(content).__name__}")
        if m["role"] == "assistant" and not text_of(content).strip():
            raise QLoRAError(f"{row.where}: {what}[{j}] is an empty assistant turn; fill it or drop the row")
        out.append({"role": m["role"], "content": content})
    return out


IMAGE_SOURCES = ("path", "url", "image")
"""The keys an image part may name its picture with (else the row's `images` column gives it)."""


def _parts(row: Row, parts: list, what: str):
    out = []
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            out.append({"type": "image", **{key: part[key] for key in IMAGE_SOURCES if part.get(key) is not None}})
        else:
            raise QLoRAError(f"{row.where}: {what} content[{k}] must be {{\"type\": \"text\", \"text\": ...}} or "
                             f"{{\"type\": \"image\", ...}}; got {part!r:.80}")
    return out if any(p["type"] == "image" for p in out) else "".join(p["text"] for p in out)


def text_of(content) -> str:
    """A message content's text: the text itself, or its text parts joined."""
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def subset(items: list, size: Optional[int], seed: int = 0) -> list:
    """A seeded random subset of `size` items, in their original order (all of them when size is None)."""
    if size is None or size >= len(items):
        return items
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:size]
    return [items[i] for i in sorted(order.tolist())]


def split_validation(items: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(fit, validation): a seeded random `fraction` of `items` held out for model selection."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(items) * fraction))
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def read_splits(data: str, eval_data: Optional[str] = None, *, split: str = "train", eval_fraction: float = 0.0,
                seed: int = 0, train_size: Optional[int] = None, eval_size: Optional[int] = None) -> tuple[list, list]:
    """(training rows, evaluation rows). Evaluation: `eval_data` (a file or folder, or a split name of the Hub
    data set `data`), else a seeded `eval_fraction` of `data`, else none; then seeded subsets of each."""
    rows = read_rows(data, split)
    if eval_data is not None:
        local = Path(eval_data).expanduser().exists() or looks_local(eval_data)
        hub = not Path(data).expanduser().exists()
        eval_rows = read_rows(data, eval_data) if hub and not local else read_rows(eval_data)
    elif eval_fraction > 0:
        rows, eval_rows = split_validation(rows, eval_fraction, seed)
        if not rows:
            raise QLoRAError(f"data {data} has {len(eval_rows)} row(s): holding out eval_fraction={eval_fraction} "
                             "leaves none to train on; add rows, or set eval_fraction=0 (or give eval_data)")
    else:
        eval_rows = []
    return subset(rows, train_size, seed), subset(eval_rows, eval_size, seed)
