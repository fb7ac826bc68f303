"""Tests of qlora.data.preference: preference pairs -> TRL's ids, batches and truncation.

    .venv/bin/python -m pytest -q tests/qlora/data/test_preference.py

Independent references: TRL 1.16's own tokenization (DPOTrainer._prepare_dataset) and collator
(DataCollatorForPreference) on the same rows with SmolLM2-135M-Instruct's real tokenizer and chat template.
"""
import types
from pathlib import Path

import pytest
import torch

from qlora.data import preference as dpo_data
from qlora.data.rows import read_rows
from qlora.errors import QLoRAError
from tests.qlora.data.test_sft import write

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "recipes/configs/dpo.yaml"
USER = [{"role": "user", "content": "What does 'cat' mean?"}]
GOOD, BAD = "A small domesticated feline.", "A large body of salt water."
ROWS = {
    "conversational": {"prompt": USER, "chosen": [{"role": "assistant", "content": GOOD}],
                       "rejected": [{"role": "assistant", "content": BAD}]},
    "conversational, implicit prompt": {"chosen": USER + [{"role": "assistant", "content": GOOD}],
                                        "rejected": USER + [{"role": "assistant", "content": BAD}]},
    "multi-turn": {"prompt": USER + [{"role": "assistant", "content": "A pet."}, {"role": "user", "content": "More?"}],
                   "chosen": [{"role": "assistant", "content": GOOD}], "rejected": [{"role": "assistant", "content": BAD}]},
    "text": {"prompt": "Q: What does 'cat' mean?\nA:", "chosen": " " + GOOD, "rejected": " " + BAD},
    "text, implicit prompt": {"chosen": "Q: What does 'cat' mean?\nA: " + GOOD,
                              "rejected": "Q: What does 'cat' mean?\nA: " + BAD},
}

pytestmark = [pytest.mark.usefixtures("single_thread"),   # PEFT reads the deprecated is_gradient_checkpointing
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def trl_tokenized(tok, rows: list[dict], max_length=None, truncation_mode="keep_start") -> list[dict]:
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOTrainer
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode=truncation_mode)
    ds = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), Dataset.from_list(rows), tok, args, "t")
    return [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in ds]


def ours(tok, rows: list[dict], tmp_path, **kw) -> tuple[list[dict], dpo_data.Stats]:
    parsed = read_rows(str(write(tmp_path / "pairs.jsonl", rows)))
    return dpo_data.encode_pairs(parsed, dpo_data.detect_format(parsed), tok, **{"max_length": 512, **kw})


@pytest.mark.parametrize("kind", list(ROWS))
def test_token_ids_equal_trls(tok, tmp_path, kind):
    rows = [ROWS[kind], {**ROWS[kind]}]
    got, stats = ours(tok, rows, tmp_path)
    want = trl_tokenized(tok, rows)
    assert [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in got] == want
    assert stats.kept == 2
    assert "feline" in tok.decode(got[0]["chosen_ids"]) and "feline" not in tok.decode(got[0]["prompt_ids"])


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_batches_equal_trls_collator_and_truncation(tok, tmp_path, mode):
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    rows = [ROWS["conversational"], ROWS["text"], ROWS["multi-turn"]]
    examples, stats = ours(tok, rows, tmp_path, max_length=40, truncation_mode=mode)
    trl_examples = [ex for row in rows for ex in trl_tokenized(tok, [row], max_length=40, truncation_mode=mode)]
    assert [ex["prompt_ids"] for ex in examples] == [ex["prompt_ids"] for ex in trl_examples]   # none dropped
    want = DataCollatorForPreference(pad_token_id=2, max_length=40, truncation_mode=mode)(trl_examples)
    got = dpo_data.collate(examples, 2, 40, mode)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(got[key], want[key]), key
    assert got["input_ids"].shape[1] == 40 and stats.cut >= 1


def test_max_prompt_length_keeps_the_prompts_end_and_a_full_prompt_is_dropped(tok, tmp_path):
    examples, stats = ours(tok, [ROWS["multi-turn"]], tmp_path, max_prompt_length=8)
    full, _ = ours(tok, [ROWS["multi-turn"]], tmp_path)
    assert examples[0]["prompt_ids"] == full[0]["prompt_ids"][-8:] and stats.prompt_cut == 1
    kept, stats = ours(tok, [ROWS["multi-turn"], ROWS["text"]], tmp_path, max_length=len(full[0]["prompt_ids"]))
    assert stats.dropped == 1 and len(kept) == 1      # TRL drops it too (keep_start)
    assert len(trl_tokenized(tok, [ROWS["multi-turn"]], max_length=len(full[0]["prompt_ids"]))) == 0


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "Q", "chosen": "A"}], r"pairs\.jsonl: columns \['chosen', 'prompt'\] fit no format \(closest: "
                                       r"preference, which needs \['rejected'\]\)"),
    ([ROWS["text"], {"prompt": "Q", "chosen": "A"}], r"pairs\.jsonl:2: no 'rejected' value"),
    ([{**ROWS["text"], "chosen": "  "}], r"pairs\.jsonl:1: the chosen response is empty"),
    ([{**ROWS["conversational"], "rejected": [{"role": "assistant", "content": ""}]}],
     r"pairs\.jsonl:1: .*rejected\[0\] is an empty assistant turn"),
    ([{**ROWS["text"], "rejected": ROWS["text"]["chosen"]}] * 2, r"every pair in .*pairs\.jsonl has chosen = rejected"),
    ([{"chosen": "yes", "rejected": "no"}], r"pairs\.jsonl:1: chosen and rejected share no beginning"),
    ([{"prompt": "Q", "chosen": ["x"], "rejected": "y"}], r"pairs\.jsonl:1: prompt, chosen and rejected must all be text"),
])
def test_bad_rows_are_one_line(tok, tmp_path, rows, match):
    with pytest.raises(QLoRAError, match=match) as err:
        ours(tok, rows, tmp_path)
    assert "\n" not in str(err.value)


def test_a_pair_with_identical_responses_is_skipped_and_counted(tok, tmp_path):
    examples, stats = ours(tok, [ROWS["text"], {**ROWS["text"], "rejected": ROWS["text"]["chosen"]}], tmp_path)
    assert len(examples) == 1 and stats.identical == 1
