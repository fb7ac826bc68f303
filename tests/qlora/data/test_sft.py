"""Tests of qlora.data (rows, sft): reading files and folders, formats, labels, truncation, packing.

    .venv/bin/python -m pytest -q tests/qlora/data/test_sft.py

SmolLM2-135M-Instruct's real tokenizer and chat template (from the converted cache folder when there
is one, else read from the GGUF alone, ~10 s of CPU) for formats and masking; the masking reference
is independent of the loader's method: it finds `<|im_start|>assistant\\n` ... `<|im_end|>` by token
ids. Packing: a packed batch's loss equals the token-weighted mean of the per-example losses (fp32,
1e-5), for the chunked loss and the model's own loss, and differs without restarting position ids
(so the test can fail).
"""
import json
from pathlib import Path

import pytest
import torch

from qlora.data import sft as sft_data
from qlora.data.rows import Row, read_rows
from qlora.data.sft import IGNORE, Encoder, collate, detect_format, encode_rows, pack
from qlora.errors import QLoRAError

CHAT = [{"role": "user", "content": "What does 'cat' mean?"}, {"role": "assistant", "content": "A small feline."},
        {"role": "user", "content": "And 'dog'?"}, {"role": "assistant", "content": "A domestic canine."}]

pytestmark = pytest.mark.usefixtures("single_thread")


def learned_text(tok, ex) -> list[str]:
    return [tok.decode([t]) for t, y in zip(ex["input_ids"], ex["labels"]) if y != IGNORE]


def reference_assistant_mask(tok, ids: list[int]) -> list[bool]:
    """Independent reference: tokens after `<|im_start|>assistant\\n` up to and including `<|im_end|>`."""
    head = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    mask, inside = [False] * len(ids), False
    for i in range(len(ids)):
        if ids[i - len(head) + 1:i + 1] == head and i >= len(head) - 1:
            inside = True
            continue
        if inside:
            mask[i] = True
            if ids[i] == end:
                inside = False
    return mask


# ---------------------------------------------------------------- masking with the real template

@pytest.mark.parametrize("turns", [2, 4])
def test_labels_are_exactly_the_assistant_turns(tok, turns):
    row = Row("chat.jsonl:1", {"messages": CHAT[:turns]})
    ex = Encoder(tok)(row, sft_data.parse_row(row, "messages", True))
    want = reference_assistant_mask(tok, ex["input_ids"])
    assert sum(want) > 0
    assert [y != IGNORE for y in ex["labels"]] == want
    assert all(y == t for t, y in zip(ex["input_ids"], ex["labels"]) if y != IGNORE)
    text = "".join(learned_text(tok, ex))
    assert text == "".join(f"{m['content']}<|im_end|>" for m in CHAT[:turns] if m["role"] == "assistant")
    # the text is SmolLM2's own rendering, default system prompt included
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CHAT[:turns], tokenize=False)


def test_prompt_as_messages_learns_only_the_completion(tok):
    row = Row("x.jsonl:1", {"prompt": CHAT[:3], "completion": [CHAT[3]]})
    ex = Encoder(tok)(row, sft_data.parse_row(row, "prompt_completion", True))
    assert "".join(learned_text(tok, ex)) == "A domestic canine.<|im_end|>"
    row = Row("x.jsonl:2", {"prompt": CHAT[:3], "completion": "A domestic canine."})     # completion as text
    assert "".join(learned_text(tok, Encoder(tok)(row, sft_data.parse_row(row, "prompt_completion", True)))) \
        == "A domestic canine.<|im_end|>"


def test_train_on_all_learns_every_token_but_the_first(tok):
    row = Row("x:1", {"messages": CHAT})
    ex = Encoder(tok, train_on="all")(row, sft_data.parse_row(row, "messages", True))
    assert ex["labels"][0] == IGNORE and ex["labels"][1:] == ex["input_ids"][1:]


# ---------------------------------------------------------------- formats x file types

FORMAT_ROWS = {
    "messages": ({"messages": CHAT[:2]}, "A small feline.<|im_end|>"),
    "prompt_completion": ({"prompt": "Q: cat? A:", "completion": " A small feline."}, " A small feline.<|im_end|>"),
    "alpaca": ({"instruction": "Define the word.", "input": "cat", "output": "A small feline."},
               "A small feline.<|im_end|>"),
    "text": ({"text": "The cat sat."}, None),
}


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        import csv
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_each_format_from_each_file_type(tmp_path, tok, fmt, suffix):
    row, learned = FORMAT_ROWS[fmt]
    path = write(tmp_path / f"data{suffix}", [row, row])
    rows = read_rows(str(path))
    assert len(rows) == 2 and rows[1].where.startswith(str(path))
    assert detect_format(rows) == fmt
    examples, stats = encode_rows(rows, fmt, Encoder(tok), max_length=256)
    assert stats.kept == 2 and stats.cut == 0 and stats.dropped == 0
    got = "".join(learned_text(tok, examples[0]))
    if learned is not None:
        assert got == learned
    else:       # text: every token but the first, then EOS
        assert got == tok.decode(examples[0]["input_ids"][1:])


def test_folder_of_files_is_read_in_order(tmp_path, tok):
    write(tmp_path / "b.jsonl", [FORMAT_ROWS["messages"][0]])
    write(tmp_path / "a.parquet", [FORMAT_ROWS["messages"][0]] * 2)
    rows = read_rows(str(tmp_path))
    assert [r.where.split("/")[-1] for r in rows] == ["a.parquet row 1", "a.parquet row 2", "b.jsonl:1"]


# ---------------------------------------------------------------- truncation, bad data

def test_truncation_counts_cut_and_dropped(tok):
    long_answer = {"messages": [CHAT[0], {"role": "assistant", "content": "word " * 200}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, CHAT[1]]}
    rows = [Row(f"x:{i}", r) for i, r in enumerate([long_answer, long_prompt, {"messages": CHAT[:2]}])]
    examples, stats = encode_rows(rows, "messages", Encoder(tok), max_length=64)
    # long_answer: cut, its answer partly kept; long_prompt: cut, answer cut away entirely -> dropped
    assert (stats.rows, stats.kept, stats.cut, stats.dropped) == (3, 2, 2, 1)
    assert all(len(e["input_ids"]) <= 64 for e in examples)
    assert "cut to max_length=64" in stats.line("train", 64) and "1 dropped" in stats.line("train", 64)


@pytest.mark.parametrize("content, match", [
    ("", "data .* has no rows"),
    ("{\"foo\": 1, \"bar\": 2}\n", r"columns \['bar', 'foo'\] fit no format; accepted: messages"),
    ("{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}]}\n", r"bad\.jsonl:1: messages\[0\] has role 'wizard'"),
    ("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \" \"}]}\n",
     r"bad\.jsonl:1: messages\[1\] is an empty assistant turn"),
    ("{\"messages\": []}\nnot json\n", r"bad\.jsonl:2: not valid JSON"),
])
def test_bad_data_is_one_line_naming_file_and_row(tmp_path, tok, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(QLoRAError, match=match) as err:
        rows = read_rows(str(path))
        encode_rows(rows, detect_format(rows), Encoder(tok), max_length=64)
    assert "\n" not in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(QLoRAError, match="data file .*nope.jsonl not found"):
        read_rows(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------- packing

def test_packed_loss_equals_token_weighted_mean_of_example_losses(tiny_llama):
    import qlora
    model = tiny_llama(attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, answer in ((9, 4), (5, 2), (12, 7), (7, 3)):
        ids = torch.randint(1, 96, (n,), generator=g).tolist()
        labels = [IGNORE] * (n - answer) + ids[n - answer:]
        examples.append({"input_ids": ids, "labels": labels})
    rows = pack(examples, max_length=20)
    assert [r["lengths"] for r in rows] == [[9, 5], [12, 7]]
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch and batch["position_ids"][0].tolist()[:14] == list(range(9)) + list(range(5))

    def one(ex, fn):
        b = collate([ex], pad_id=0)
        return fn(b).double(), sum(y != IGNORE for y in ex["labels"][1:])
    for name, fn in {"chunked": lambda b: qlora.causal_lm_loss(model, b["input_ids"], b["labels"], b.get("attention_mask"),
                                                                position_ids=b.get("position_ids"), chunk_size=5),
                     "model": lambda b: model(**b, use_cache=False).loss}.items():
        with torch.no_grad():
            parts = [one(ex, fn) for ex in examples]
            want = sum(loss * n for loss, n in parts) / sum(n for _, n in parts)
            got = fn(batch).double()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)
    # block-diagonal: the second example's logits in the packed row are its logits alone; with positions
    # that do not restart (the control) it attends to the first example and they differ
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]])).logits[0]
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0, 9:14]
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits[0, 9:14]
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert (plain - alone).abs().max() > 1e-3
