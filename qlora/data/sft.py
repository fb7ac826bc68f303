"""Supervised fine-tuning data: chat / instruction rows -> token ids with the loss on the answers.

    rows = read_rows("my.jsonl")                          # qlora.data.rows: files, folders, Hub data sets
    fmt = detect_format(rows, "auto")                     # messages | prompt_completion | alpaca | text
    encode = Encoder(tokenizer, train_on="completions", processor=None)   # an image-text model's processor
    examples, stats = encode_rows(rows, fmt, encode, max_length=512)      # [{"input_ids", "labels", ...}], counts
    packed = pack(examples, max_length=512)               # rows of <= 512 tokens, position ids restart
    batch = collate(examples[:8], pad_id)                 # input_ids, labels, attention_mask (+ the processor's)

Formats, detected from the columns (first row) or forced with `format=`:

| format | columns | what is learned (train_on=completions) |
|---|---|---|
| messages | `messages`: [{role, content}, ...] | every assistant turn, rendered by the tokenizer's chat template |
|  | (+ `images`; content may be a list of text / image parts) | the same, the images through the processor |
| prompt_completion | `prompt`, `completion` (prompt may be a list of messages) | the completion |
| alpaca | `instruction`, optional `input`, `output` | the output (as a chat when the tokenizer has a template) |
| text | `text` | every token |

Assistant spans are found without any template-specific markers: the conversation is rendered whole
and up to each assistant turn (`add_generation_prompt=True` for its start, the turn included for its
end), the prefixes' character lengths mark the span, and the tokenizer's offset mapping turns
characters into tokens. A template whose earlier text changes when later turns are added is refused.
Labels are -100 except on learned tokens; the first token of every example is never a target (no
token precedes it), which also keeps a packed row from predicting across an example boundary.

Images (qlora.data.images): with an image-text model's processor, every chat is rendered by the
processor's template (text contents as one text part each), and a row with image parts goes through the
processor, which expands each image into its tokens and gives its tensors (pixel_values, ...); the labels
found on the template's text move onto the processor's tokens. A row that max_length would cut inside
or before its image tokens is dropped and counted; rows without images train in the same run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qlora.data import images
from qlora.data.rows import IGNORE, Counts, Row, chat_messages, field_value, match_format, text_of
from qlora.errors import QLoRAError
from qlora.util.checks import must_be_int

FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
           "alpaca": ("instruction", "output"), "text": ("text",)}
ACCEPTED = ("messages (a list of {role, content}) | prompt + completion | instruction + output (+ input, "
            "Alpaca) | text")
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


def detect_format(rows: list[Row], fmt: str = "auto") -> str:
    """The SFT format of these rows (qlora.data.rows.match_format over FORMATS)."""
    return match_format(rows, fmt, FORMATS, ACCEPTED)


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
    """Parsed rows -> {"input_ids", "labels", "prompt", "reference"} (before truncation); rows with images also
    get "pictures" (their sources, for the processor's tensors of a batch), "media_end" and "prompt_ids"
    (qlora.data.images.expand)."""

    def __init__(self, tokenizer, *, train_on: str = "completions", processor=None):
        if train_on not in ("completions", "all"):
            raise QLoRAError(f"train_on={train_on!r}; use completions (the answers only) or all")
        if not getattr(tokenizer, "is_fast", False):
            raise QLoRAError("the SFT loader needs a fast tokenizer (tokenizer.json) for its offset mapping")
        self.tokenizer, self.train_on, self.processor = tokenizer, train_on, processor
        self.chat = getattr(processor or tokenizer, "chat_template", None) is not None

    def render(self, messages, generation_prompt: bool = False) -> str:
        if self.processor is not None:
            return self.processor.apply_chat_template(images.as_parts(messages), tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def __call__(self, row: Row, parsed: Parsed) -> dict:
        pictures = []
        if images.mentions_images(row):
            images.check_processor(row, self.processor, chat=bool(parsed.messages))
            messages, pictures = images.row_images(row, parsed.messages)       # their sources
            parsed = Parsed(messages=messages, learn_from=parsed.learn_from)
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
        ex = {"input_ids": ids, "labels": labels, "prompt": prompt, "reference": reference, "where": row.where}
        if not pictures:
            return ex
        prompt_tokens = sum(start < len(prompt) for start, _ in enc["offset_mapping"])
        return {**ex, **images.expand(self.processor, row, text, pictures, ids, labels, prompt_tokens)}

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
        return text, spans, prompt, text_of(messages[last]["content"])


@dataclass
class Stats(Counts):
    tokens: int = 0
    """Tokens of the kept examples."""
    learned_tokens: int = 0
    """Of those, the tokens with a label (the loss is on them)."""

    images: int = 0
    """Examples with images (their images are never cut: a cut that would reach them drops the example)."""

    LINE = ("{name}: {rows:,} rows -> {kept:,} examples ({images:,} with images), {tokens:,} tokens ({learned_tokens:,} "
            "learned); {cut:,} cut to max_length={max_length}, {dropped:,} dropped (nothing left to learn after the "
            "cut, or an image cut)")


def encode_rows(rows: list[Row], fmt: str, encoder: Encoder, max_length: int) -> tuple[list[dict], Stats]:
    """Encode and truncate every row; an example whose learned tokens are all cut away, or whose cut would reach its
    image tokens, is a counted skip."""
    if need := must_be_int(max_length, 2):
        raise QLoRAError(f"max_length={max_length!r}: must be {need}")
    stats, out = Stats(rows=len(rows)), []
    for row in rows:
        ex = encoder(row, parse_row(row, fmt, encoder.chat))
        if len(ex["input_ids"]) > max_length:
            if ex.get("media_end", 0) > max_length:
                stats.dropped += 1
                continue
            stats.cut += 1
            ex["input_ids"], ex["labels"] = ex["input_ids"][:max_length], ex["labels"][:max_length]
        learned = sum(t != IGNORE for t in ex["labels"])
        if learned == 0:
            stats.dropped += 1
            continue
        stats.kept += 1
        stats.images += "pictures" in ex
        stats.tokens += len(ex["input_ids"])
        stats.learned_tokens += learned
        out.append(ex)
    return out, stats


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples, in order, into rows of at most `max_length` tokens (an example is never
    split: each was truncated to max_length already). position_ids restart at 0 for every example,
    which is how transformers detects packed rows (masking_utils.find_packed_sequence_indices): with
    no attention_mask the causal mask becomes block-diagonal, one block per example. Examples with images
    are refused (their image tensors and position ids stay per example)."""
    if any("pictures" in ex for ex in examples):
        raise QLoRAError("packing=true cannot pack examples with images (their image tensors and positions are per "
                         "example); set packing=false")
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
    "example" (positions 0, 1, ...) with labels -100, so nothing attends to it or learns from it.
    Examples with images add the processor's tensors (qlora.data.images.collate_inputs)."""
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
    return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra,
            **images.collate_inputs(examples, width)}
