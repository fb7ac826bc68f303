"""The SFT data loader: your chat / instruction files -> token ids with the loss on the answers.

    rows = read_rows("my.jsonl")                          # [Row(where="my.jsonl:3", data={...})]
    fmt = detect_format(rows, "auto")                     # messages | prompt_completion | alpaca | text
    encode = Encoder(tokenizer, max_length=512, train_on="completions")
    examples, stats = encode_rows(rows, fmt, encode)      # [{"input_ids", "labels", ...}], cut/dropped counts
    packed = pack(examples, max_length=512)               # rows of <= 512 tokens, position ids restart

Sources: a .jsonl / .json / .csv / .parquet file, a folder of them, or a `datasets` Hub name.
Formats, detected from the columns (first row) or forced with `format=`:

| format | columns | what is learned (train_on=completions) |
|---|---|---|
| messages | `messages`: [{role, content}, ...] | every assistant turn, rendered by the tokenizer's chat template |
| prompt_completion | `prompt`, `completion` (prompt may be a list of messages) | the completion |
| alpaca | `instruction`, optional `input`, `output` | the output (as a chat when the tokenizer has a template) |
| text | `text` | every token |

Assistant spans are found without any template-specific markers: the conversation is rendered whole
and up to each assistant turn (`add_generation_prompt=True` for its start, the turn included for its
end), the prefixes' character lengths mark the span, and the tokenizer's offset mapping turns
characters into tokens. A template whose earlier text changes when later turns are added is refused.
Labels are -100 except on learned tokens; the first token of every example is never a target (no
token precedes it), which also keeps a packed row from predicting across an example boundary.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora.errors import QLoRAError

IGNORE = -100
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
           "alpaca": ("instruction", "output"), "text": ("text",)}
ROLES = ("system", "user", "assistant", "tool")
ACCEPTED = ("messages (a list of {role, content}) | prompt + completion | instruction + output (+ input, "
            "Alpaca) | text")
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


@dataclass
class Row:
    where: str
    """file:line (JSONL), file row N (others) or hub[split] row N: named in every error."""
    data: dict


# ---------------------------------------------------------------- reading

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
        from datasets import load_dataset
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
            rows.append(Row(f"{path}:{n}", value))
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
        return [Row(f"{path} row {i + 1}", v) for i, v in enumerate(value)]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [Row(f"{path} row {i + 1}", dict(r)) for i, r in enumerate(csv.DictReader(f))]
    import pyarrow.parquet as pq
    return [Row(f"{path} row {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]


def detect_format(rows: list[Row], fmt: str = "auto") -> str:
    """The format of these rows: `fmt` checked against the columns, or the first that fits them."""
    columns = sorted(rows[0].data)
    source = rows[0].where.rsplit(":", 1)[0].split(" row ")[0]
    if fmt == "auto":
        for name, needed in FORMATS.items():
            if set(needed) <= set(columns):
                return name
        raise QLoRAError(f"{source}: columns {columns} fit no format; accepted: {ACCEPTED} (or set format=)")
    if fmt not in FORMATS:
        raise QLoRAError(f"format={fmt!r}; use auto or one of {', '.join(FORMATS)}")
    missing = [c for c in FORMATS[fmt] if c not in columns]
    if missing:
        raise QLoRAError(f"{source}: format={fmt} needs the column(s) {missing}; columns found: {columns}")
    return fmt


# ---------------------------------------------------------------- one row -> a conversation or text pieces

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
    if not isinstance(value, list) or not value:
        raise QLoRAError(f"{row.where}: {what} must be a non-empty list of {{role, content}}; got {value!r:.80}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise QLoRAError(f"{row.where}: {what}[{j}] must be {{\"role\": ..., \"content\": ...}}; got {m!r:.80}")
        if m["role"] not in ROLES:
            raise QLoRAError(f"{row.where}: {what}[{j}] has role {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise QLoRAError(f"{row.where}: {what}[{j}] content must be text; got {type(m['content']).__name__}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise QLoRAError(f"{row.where}: {what}[{j}] is an empty assistant turn; fill it or drop the row")
        out.append({"role": m["role"], "content": m["content"]})
    return out


@dataclass
class Parsed:
    """A row as a conversation (messages, learned turns = assistant turns from index `learn_from`) or
    as text pieces [(text, learned)]."""
    messages: list = field(default_factory=list)
    learn_from: int = 0
    pieces: list = field(default_factory=list)


def parse_row(row: Row, fmt: str, chat: bool) -> Parsed:
    """`chat`: the tokenizer has a chat template (Alpaca rows then become a user/assistant chat)."""
    if fmt == "messages":
        messages = chat_messages(row, field_value(row, "messages"), "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise QLoRAError(f"{row.where}: the conversation has no assistant turn to learn from")
        return Parsed(messages=messages)
    if fmt == "prompt_completion":
        prompt, completion = field_value(row, "prompt"), field_value(row, "completion")
        if isinstance(prompt, list):
            turns = (chat_messages(row, completion, "completion") if isinstance(completion, list) else
                     chat_messages(row, [{"role": "assistant", "content": completion}], "completion"))
            return Parsed(messages=chat_messages(row, prompt, "prompt") + turns, learn_from=len(prompt))
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise QLoRAError(f"{row.where}: prompt and completion must both be text (or prompt a list of messages)")
        if not completion.strip():
            raise QLoRAError(f"{row.where}: the completion is empty; fill it or drop the row")
        return Parsed(pieces=[(prompt, False), (completion, True)])
    if fmt == "alpaca":
        instruction, output = field_value(row, "instruction"), field_value(row, "output")
        extra = field_value(row, "input", optional=True) or ""
        if not str(output).strip():
            raise QLoRAError(f"{row.where}: the output is empty; fill it or drop the row")
        if chat:
            user = f"{instruction}\n\n{extra}" if str(extra).strip() else str(instruction)
            return Parsed(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": str(output)}])
        prompt = ALPACA_PROMPT.format(context=", paired with an input that provides further context" if extra else "",
                                      instruction=instruction, input=f"### Input:\n{extra}\n\n" if extra else "")
        return Parsed(pieces=[(prompt, False), (str(output), True)])
    text = field_value(row, "text")
    if not isinstance(text, str) or not text.strip():
        raise QLoRAError(f"{row.where}: the text is empty")
    return Parsed(pieces=[(text, True)])


# ---------------------------------------------------------------- tokens and labels

class Encoder:
    """Parsed rows -> {"input_ids", "labels", "prompt", "reference"} (before truncation)."""

    def __init__(self, tokenizer, *, train_on: str = "completions"):
        if train_on not in ("completions", "all"):
            raise QLoRAError(f"train_on={train_on!r}; use completions (the answers only) or all")
        if not getattr(tokenizer, "is_fast", False):
            raise QLoRAError("the SFT loader needs a fast tokenizer (tokenizer.json) for its offset mapping")
        self.tokenizer, self.train_on = tokenizer, train_on
        self.chat = getattr(tokenizer, "chat_template", None) is not None

    def render(self, messages, generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def __call__(self, row: Row, parsed: Parsed) -> dict:
        if parsed.messages:
            if not self.chat:
                raise QLoRAError(f"{row.where}: chat messages need a tokenizer with a chat template; this one has "
                                 "none (use prompt/completion text, or a chat model's tokenizer)")
            text, spans, prompt, reference = self._chat(row, parsed)
            special = False
        else:
            text = "".join(p for p, _ in parsed.pieces)
            spans, at = [], 0
            for piece, learned in parsed.pieces:
                if learned:
                    spans.append((at, at + len(piece)))
                at += len(piece)
            prompt = "".join(p for p, learned in parsed.pieces if not learned)
            reference = "".join(p for p, learned in parsed.pieces if learned)
            special = True          # the tokenizer's own BOS etc. (a chat template writes its own)
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True,
                             return_special_tokens_mask=True)
        ids = list(enc["input_ids"])
        labels = [t if not added and any(a <= start < b for a, b in spans) else IGNORE
                  for t, (start, _), added in zip(ids, enc["offset_mapping"], enc["special_tokens_mask"])]
        eos = self.tokenizer.eos_token_id
        if not parsed.messages and eos is not None and ids[-1] != eos:
            ids.append(eos)                         # plain text ends where the model should stop
            labels.append(eos if parsed.pieces[-1][1] else IGNORE)
        if self.train_on == "all":
            labels = list(ids)
        labels[0] = IGNORE                          # never predicted: nothing comes before it
        if not prompt and not parsed.messages:      # text format: the first quarter prompts the sample
            k = max(1, len(ids) // 4)
            prompt, reference = self.tokenizer.decode(ids[:k], skip_special_tokens=True), \
                self.tokenizer.decode(ids[k:], skip_special_tokens=True)
        return {"input_ids": ids, "labels": labels, "prompt": prompt, "reference": reference, "where": row.where}

    def _chat(self, row: Row, parsed: Parsed):
        messages = parsed.messages
        text = self.render(messages)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant" or k < parsed.learn_from:
                continue
            start, upto = self.render(messages[:k], generation_prompt=True), self.render(messages[:k + 1])
            if not (text.startswith(start) and text.startswith(upto)):
                raise QLoRAError(f"{row.where}: this chat template renders earlier turns differently once later ones "
                                 "follow, so the assistant turns cannot be located; use train_on=all")
            spans.append((len(start), len(upto.rstrip())))   # the turn and its end token, not the newline after
        if not spans:
            raise QLoRAError(f"{row.where}: no assistant turn to learn from after the prompt")
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        prompt = self.render(messages[:last], generation_prompt=True)
        return text, spans, prompt, messages[last]["content"]


@dataclass
class Stats:
    rows: int = 0
    kept: int = 0
    cut: int = 0
    """Examples longer than max_length, truncated."""
    dropped: int = 0
    """Examples with no learned token left after truncation (skipped)."""
    tokens: int = 0
    learned_tokens: int = 0

    def line(self, name: str, max_length: int) -> str:
        return (f"{name}: {self.rows:,} rows -> {self.kept:,} examples, {self.tokens:,} tokens "
                f"({self.learned_tokens:,} learned); {self.cut:,} cut to max_length={max_length}, "
                f"{self.dropped:,} dropped (nothing left to learn after the cut)")


def encode_rows(rows: list[Row], fmt: str, encoder: Encoder, max_length: int) -> tuple[list[dict], Stats]:
    """Encode and truncate every row; an example whose learned tokens are all cut away is a counted skip."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise QLoRAError(f"max_length={max_length!r}: must be an integer >= 2")
    stats, out = Stats(rows=len(rows)), []
    for row in rows:
        ex = encoder(row, parse_row(row, fmt, encoder.chat))
        if len(ex["input_ids"]) > max_length:
            stats.cut += 1
            ex["input_ids"], ex["labels"] = ex["input_ids"][:max_length], ex["labels"][:max_length]
        learned = sum(t != IGNORE for t in ex["labels"])
        if learned == 0:
            stats.dropped += 1
            continue
        stats.kept += 1
        stats.tokens += len(ex["input_ids"])
        stats.learned_tokens += learned
        out.append(ex)
    return out, stats


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples, in order, into rows of at most `max_length` tokens (an example is never
    split: each was truncated to max_length already). position_ids restart at 0 for every example,
    which is how transformers detects packed rows (masking_utils.find_packed_sequence_indices): with
    no attention_mask the causal mask becomes block-diagonal, one block per example."""
    rows, current = [], None
    for ex in examples:
        n = len(ex["input_ids"])
        if current is None or len(current["input_ids"]) + n > max_length:
            current = {"input_ids": [], "labels": [], "position_ids": [], "lengths": []}
            rows.append(current)
        current["input_ids"] += ex["input_ids"]
        current["labels"] += ex["labels"]
        current["position_ids"] += list(range(n))
        current["lengths"].append(n)
    return rows


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded tensors. Unpacked: input_ids, labels, attention_mask [B, S]. Packed (examples carry
    position_ids): input_ids, labels, position_ids and no attention_mask; the padding is its own
    "example" (positions 0, 1, ...) with labels -100, so nothing attends to it or learns from it."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    packed = "position_ids" in examples[0]
    extra = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"])
        if packed:
            extra[i, :n] = torch.tensor(e["position_ids"])
            extra[i, n:] = torch.arange(width - n)
        else:
            extra[i, :n] = 1
    return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}
