"""Tests of qlora.data.rows: the format matcher, seeded subsets and splits, evaluation data.

    .venv/bin/python -m pytest -q tests/qlora/data/test_rows.py
"""
import json

import pytest

from qlora.data.rows import Row, match_format, read_splits, split_validation, subset
from qlora.errors import QLoRAError

FORMATS = {"pairs": ("prompt", "chosen", "rejected"), "text": ("text",)}


def rows_of(*dicts):
    return [Row(f"f.jsonl:{i + 1}", d) for i, d in enumerate(dicts)]


def test_match_format_picks_the_first_that_fits_and_names_the_closest():
    assert match_format(rows_of({"text": "x", "prompt": "p"}), "auto", FORMATS, "...") == "text"
    with pytest.raises(QLoRAError, match=r"f\.jsonl: columns \['chosen', 'prompt'\] fit no format \(closest: pairs, "
                                         r"which needs \['rejected'\]\); accepted: A \| B"):
        match_format(rows_of({"prompt": "p", "chosen": "c"}), "auto", FORMATS, "A | B")
    with pytest.raises(QLoRAError, match=r"columns \['foo'\] fit no format; accepted"):       # nothing in common
        match_format(rows_of({"foo": 1}), "auto", FORMATS, "A | B")
    with pytest.raises(QLoRAError, match="format=text needs the column"):
        match_format(rows_of({"prompt": "p"}), "text", FORMATS, "A | B")
    with pytest.raises(QLoRAError, match="format='csv'; use auto or one of pairs, text"):
        match_format(rows_of({"text": "t"}), "csv", FORMATS, "A | B")


def test_subset_and_split_are_seeded_disjoint_and_keep_the_order():
    items = list(range(100))
    assert subset(items, None) == items and subset(items, 500) == items
    a, b = subset(items, 10, seed=1), subset(items, 10, seed=1)
    assert a == b == sorted(a) and len(set(a)) == 10 and a != subset(items, 10, seed=2)
    fit, val = split_validation(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(fit + val) == items and not set(fit) & set(val) and fit == sorted(fit)


def test_read_splits_holds_out_a_fraction_or_reads_the_eval_file(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(40)))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(5)))
    train, held = read_splits(str(data), eval_fraction=0.25, seed=0)
    assert (len(train), len(held)) == (30, 10) and not {r.data["text"] for r in train} & {r.data["text"] for r in held}
    train, held = read_splits(str(data), str(dev), train_size=8, eval_size=3, seed=0)
    assert len(train) == 8 and [r.data["text"][0] for r in held] == ["d"] * 3
    assert read_splits(str(data))[1] == []


def test_a_file_too_small_to_hold_out_from_is_one_line(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": "only"}) + "\n")
    with pytest.raises(QLoRAError, match="has 1 row.*leaves none to train on; add rows, or set eval_fraction=0"):
        read_splits(str(data), eval_fraction=0.05)
