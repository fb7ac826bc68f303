"""The composition at the peak (issue 33) on three architectures and the six configurations: measured on CPU it
adds up to the measured peak exactly; the planner's (fake tensors, extrapolated from a few blocks) adds up to
the predicted peak and equals the measured one per category within the planner's category bound.

    .venv/bin/python -m pytest -q tests/qlora/plan/test_at_peak.py      (~1 min)
"""
import pytest

from memprofile.composition import AT_PEAK
from qlora.levers.modes import CONFIGURATIONS
from qlora.plan.sweep import sweep

CATEGORY_BOUND = 0.02    # of the peak: docs/memory.md, "qlora plan" (the same bound as the maxima's)
# 48 tokens: a block's saved input outweighs its adapters' gradients, as in real models (Llama-8B at 2,048 tokens:
# 16 MiB against ~2 MiB), so a checkpointed backward peaks in its first block. At 16 tokens these tiny blocks
# tie (their backward peaks within 0.06 % of each other) and the moment can fall on another block, trading a
# block's gradients for its saved input: the sums stay equal, not the categories.


@pytest.fixture
def folders(tmp_path, tiny_llama, tiny_gpt2):
    from transformers import BertConfig, BertForSequenceClassification
    llama, gpt2, bert = tmp_path / "llama", tmp_path / "gpt2", tmp_path / "bert"
    tiny_llama(num_hidden_layers=4).save_pretrained(llama)     # 4 blocks: the planner extrapolates from 2 and 3
    tiny_gpt2().save_pretrained(gpt2)
    BertForSequenceClassification(BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    return {"llama": (llama, "causal-lm"), "gpt2": (gpt2, "causal-lm"), "bert": (bert, "seq-cls")}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_at_peak_adds_up_and_the_planner_predicts_it(folders, arch):
    folder, task = folders[arch]
    rows = sweep(str(folder), task=task, configurations=CONFIGURATIONS, batches=(2,), seqs=(48,), ranks=(4,),
                 compute_dtype="float32", progress=False)
    assert [r["config"] for r in rows] == list(CONFIGURATIONS)
    for r in rows:
        at, pred = r["at_peak"], r["predicted_at_peak"]
        assert set(at) == set(pred) == set(AT_PEAK), r["config"]
        assert sum(at.values()) == r["bytes"]["peak"], (arch, r["config"])              # exact: the allocator's peak
        assert sum(pred.values()) == r["predicted_bytes"]["peak"], (arch, r["config"])
        for c in AT_PEAK:
            assert abs(at[c] - pred[c]) <= CATEGORY_BOUND * r["bytes"]["peak"], (arch, r["config"], c, at[c], pred[c])
        phase = lambda s: s.split(":")[0].replace(" (extrapolated)", "")  # noqa: E731 (the phase and block)
        assert phase(r["peak_phase"]) == phase(r["predicted_peak_phase"]), (arch, r["config"])
        if r["config"].startswith("qlora"):
            assert at["weights_quantized"] > 0
        if r["config"] == "full":
            assert at["weights_frozen"] < at["weights_trainable"]
