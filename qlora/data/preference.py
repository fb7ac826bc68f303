"""Preference data: pairs of responses -> TRL's token layout (prompt, chosen and rejected ids).

    rows = read_rows("pairs.jsonl")                          # qlora.data.rows: files, folders, Hub data sets
    fmt = detect_format(rows)                                # preference | implicit_prompt
    examples, stats = encode_pairs(rows, fmt, tokenizer, max_length=512, max_prompt_length=None, processor=None)
    batch = collate(examples[:4], pad_id, max_length=512)    # input_ids, attention_mask, completion_mask [8, L]

| format | columns | the prompt |
|---|---|---|
| preference | `prompt`, `chosen`, `rejected`: three texts, or a list of messages and two of (assistant) messages | given |
| implicit_prompt | `chosen`, `rejected`: two whole conversations (or texts) | their shared beginning (TRL's extract_prompt) |

Tokenization is TRL 1.16's (DPOTrainer._prepare_dataset), so a data set gives the same ids here as there: a
conversation is rendered by the tokenizer's chat template, the prompt with the generation prompt, prompt +
chosen and prompt + rejected whole; texts get the tokenizer's special tokens and an EOS after each response.
The response starts where the tokenized prompt and prompt + response first differ (a template may render the
prompt's end differently once a response follows).
Truncation: with `max_prompt_length`, a longer prompt keeps its last max_prompt_length tokens (TRL < 1.0's
rule; TRL 1.16 has no such key). Then each of the two sequences longer than `max_length` is cut as TRL 1.16's
collator cuts it: truncation_mode=keep_start drops the end of the response, keep_end the start of the prompt.
A pair whose prompt alone fills max_length (keep_start) has nothing left to score and is dropped, as in TRL.

Images (qlora.data.images): with an image-text model's processor, a conversational prompt may hold image parts
(or the row an `images` column), as in SFT; every conversation is rendered by the processor's template, the
prompt with its pictures goes through the processor (its image tokens and tensors), the responses are the
template's text tokens. A pair whose prompt would lose its start (max_prompt_length, keep_end) is dropped
when it has images; the batch carries the processor's tensors of each pair twice (chosen rows, rejected rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora.data import images
from qlora.data.rows import IGNORE, Counts, Row, chat_messages, field_value, match_format, text_of
from qlora.errors import QLoRAError

FORMATS = {"preference": ("prompt", "chosen", "rejected"), "implicit_prompt": ("chosen", "rejected")}
ACCEPTED = ("prompt + chosen + rejected (texts, or chat messages) | chosen + rejected (whole conversations or "
            "texts that share their beginning)")
TRUNCATION_MODES = ("keep_start", "keep_end")


def detect_format(rows: list[Row], fmt: str = "auto") -> str:
    """The preference format of these rows (qlora.data.rows.match_format over FORMATS)."""
    return match_format(rows, fmt, FORMATS, ACCEPTED)


@dataclass
class Pair:
    prompt: object
    """Text, or a list of messages."""
    chosen: object
    rejected: object

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def shared_prompt(chosen, rejected):
    """(prompt, chosen rest, rejected rest): the longest shared beginning of two conversations (whole messages)
    or two texts (characters, a space before the first difference left to the responses), as TRL's
    extract_prompt splits them."""
    n = _common_prefix(chosen, rejected)
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def parse_pair(row: Row, fmt: str) -> Pair:
    chosen, rejected = field_value(row, "chosen"), field_value(row, "rejected")
    if fmt == "implicit_prompt":
        if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
            raise QLoRAError(f"{row.where}: chosen and rejected must both be texts or both conversations")
        if isinstance(chosen, list):
            chosen, rejected = chat_messages(row, chosen, "chosen"), chat_messages(row, rejected, "rejected")
        prompt, chosen, rejected = shared_prompt(chosen, rejected)
        if not prompt:
            raise QLoRAError(f"{row.where}: chosen and rejected share no beginning to use as the prompt; give a "
                             "`prompt` column (format=preference)")
    else:
        prompt = field_value(row, "prompt")
    if isinstance(prompt, list):
        prompt = chat_messages(row, prompt, "prompt")
        chosen, rejected = (chat_messages(row, v if isinstance(v, list) else [{"role": "assistant", "content": v}], name)
                            for name, v in (("chosen", chosen), ("rejected", rejected)))
    elif not all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        raise QLoRAError(f"{row.where}: prompt, chosen and rejected must all be text, or the prompt a list of "
                         "messages (and the responses messages or text)")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        text = value if isinstance(value, str) else "".join(text_of(m["content"]) for m in value)
        if not text.strip():
            raise QLoRAError(f"{row.where}: the {name} response is empty; fill it or drop the row")
    return Pair(prompt, chosen, rejected)


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(tokenizer, pair: Pair, processor=None, pictures: tuple = (), row: Row | None = None) -> dict:
    """{"prompt_ids", "chosen_ids", "rejected_ids", "prompt" (text), "reference" (the chosen text)}; with
    `pictures` (the sources of the prompt's) also the prompt's "pictures" and "media_end" (qlora.data.images)."""
    if pair.conversational:
        template = processor if processor is not None else tokenizer
        if getattr(template, "chat_template", None) is None:
            raise QLoRAError("chat messages need a tokenizer with a chat template; this one has none (give texts)")

        def render(messages, **kw):
            return template.apply_chat_template(images.as_parts(messages) if processor is not None else messages,
                                                tokenize=False, **kw)

        def ids(messages, **kw):
            return list(tokenizer(render(messages, **kw), add_special_tokens=False)["input_ids"])
        prompt_ids = ids(pair.prompt, add_generation_prompt=True)
        with_chosen, with_rejected = ids(pair.prompt + pair.chosen), ids(pair.prompt + pair.rejected)
        prompt_text = render(pair.prompt, add_generation_prompt=True)
        reference = "".join(text_of(m["content"]) for m in pair.chosen)
    else:
        eos = tokenizer.eos_token or ""
        chosen, rejected = (r if r.endswith(eos) else r + eos for r in (pair.chosen, pair.rejected))
        prompt_ids = list(tokenizer(pair.prompt)["input_ids"])
        with_chosen = list(tokenizer(pair.prompt + chosen)["input_ids"])
        with_rejected = list(tokenizer(pair.prompt + rejected)["input_ids"])
        prompt_text, reference = pair.prompt, pair.chosen
    n = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    ex = {"prompt_ids": prompt_ids[:n], "chosen_ids": with_chosen[n:], "rejected_ids": with_rejected[n:],
          "prompt": prompt_text, "reference": reference}
    if not pictures:
        return ex
    # the prompt through the processor; its last len(prompt_ids) - n tokens (text the responses render otherwise) go
    media = images.expand(processor, row, prompt_text, list(pictures), prompt_ids, [IGNORE] * len(prompt_ids),
                          len(prompt_ids))
    keep = len(media["input_ids"]) - (len(prompt_ids) - n)
    return {**ex, "prompt_ids": media["input_ids"][:keep], "pictures": media["pictures"], "media_end": media["media_end"]}


@dataclass
class Stats(Counts):
    """Pairs: cut = a sequence longer than max_length (cut by the collator); dropped = the prompt alone fills
    max_length (keep_start): nothing left to score."""
    prompt_cut: int = 0
    """Prompts longer than max_prompt_length (their start cut)."""
    identical: int = 0
    """Pairs whose chosen and rejected tokens are the same (no preference to learn): skipped."""

    LINE = ("{name}: {rows:,} pairs -> {kept:,} kept; {prompt_cut:,} prompts cut to max_prompt_length, {cut:,} pairs "
            "cut to max_length={max_length}, {dropped:,} dropped (prompt fills max_length, or its images would be "
            "cut), {identical:,} skipped (chosen = rejected)")


def encode_pairs(rows: list[Row], fmt: str, tokenizer, *, max_length: int, max_prompt_length=None,
                 truncation_mode: str = "keep_start", processor=None) -> tuple[list[dict], Stats]:
    """Every row parsed and tokenized; prompts cut to max_prompt_length; pairs the collator would leave with
    nothing to score dropped, pairs with identical responses skipped (all of them identical: an error).
    `processor`: an image-text model's, for rows with images (qlora.data.images)."""
    if truncation_mode not in TRUNCATION_MODES:
        raise QLoRAError(f"truncation_mode={truncation_mode!r}; use {' or '.join(TRUNCATION_MODES)}")
    stats, out = Stats(rows=len(rows)), []
    for row in rows:
        pair, pictures = parse_pair(row, fmt), []
        if images.mentions_images(row):
            images.check_processor(row, processor, chat=pair.conversational)
            if any(isinstance(m["content"], list) for m in pair.chosen + pair.rejected):
                raise QLoRAError(f"{row.where}: image parts belong in the prompt, not in chosen / rejected")
            prompt, pictures = images.row_images(row, pair.prompt)
            pair = Pair(prompt, pair.chosen, pair.rejected)
        ex = encode_pair(tokenizer, pair, processor, pictures, row)
        ex["where"] = row.where
        if ex["chosen_ids"] == ex["rejected_ids"]:
            stats.identical += 1
            continue
        longest = len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
        if pictures and ((max_prompt_length and len(ex["prompt_ids"]) > max_prompt_length)
                         or (truncation_mode == "keep_end" and longest > max_length)):
            stats.dropped += 1                       # the prompt's start, and so its images, would be cut
            continue
        if max_prompt_length and len(ex["prompt_ids"]) > max_prompt_length:
            stats.prompt_cut += 1
            ex["prompt_ids"] = ex["prompt_ids"][-max_prompt_length:]
        longest = len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
        if truncation_mode == "keep_start" and len(ex["prompt_ids"]) >= max_length:
            stats.dropped += 1
            continue
        stats.cut += longest > max_length
        stats.kept += 1
        out.append(ex)
    if rows and stats.identical == len(rows):
        raise QLoRAError(f"every pair in {rows[0].where.rsplit(':', 1)[0].split(' row ')[0]} has chosen = rejected: "
                         "there is no preference to learn (check the columns)")
    return out, stats


def sequences(ex: dict, max_length: int, truncation_mode: str = "keep_start"):
    """[(ids, completion mask) for chosen, for rejected]: prompt + response, cut to max_length."""
    cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
    p = ex["prompt_ids"]
    return [((p + r)[cut], ([0] * len(p) + [1] * len(r))[cut]) for r in (ex["chosen_ids"], ex["rejected_ids"])]


def collate(examples: list[dict], pad_id: int, max_length: int, truncation_mode: str = "keep_start") -> dict:
    """TRL's batch: input_ids, attention_mask, completion_mask [2B, L] right-padded (the chosen rows, then the
    rejected rows); ref_logps [2B] when the examples carry precomputed reference log-probs; the processor's
    tensors of pairs with images (qlora.data.images.collate_inputs, each pair's for its two rows)."""
    pairs = [sequences(ex, max_length, truncation_mode) for ex in examples]
    rows = [pair[0] for pair in pairs] + [pair[1] for pair in pairs]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (seq, mask) in enumerate(rows):
        ids[i, :len(seq)], attention[i, :len(seq)], completion[i, :len(seq)] = torch.tensor(seq), 1, torch.tensor(mask)
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
             **images.collate_inputs([{"input_ids": ex["prompt_ids"], "pictures": ex.get("pictures")}
                                      for ex in examples + examples], width)}
    if "ref_logps" in examples[0]:
        batch["ref_logps"] = torch.tensor([ex["ref_logps"][0] for ex in examples] +
                                          [ex["ref_logps"][1] for ex in examples], dtype=torch.float32)
    return batch
