"""The GRPO step as the planner models it (qlora/plan/grpo.py): its generation against the recipe's sampler.

    .venv/bin/python -m pytest tests/qlora/plan/test_grpo_plan.py -q

The whole step (generation, reference, training) is checked against a measured step in test_planner.py; there the
training step is the peak, so the generation is checked here on its own: the most memory the recipe's Sampler
(model.generate with its KV cache, B x G rows of exactly T new tokens) allocates above what was live before it,
measured by torch's profiler (allocator events, exact on CPU), against the same of the traced stand-in (prefill,
the cache grown through its own update, one decode step) on fake tensors.
"""
import pytest
import torch

from benchmarks.memory_sweep import TINY
from memprofile.fake import fake_tensors, new_fake_mode
from memprofile.peak import CpuPeakTracker
from memprofile.tracker import StorageTracker
from qlora.plan import RunSettings, build, load_config
from qlora.plan.build import REAL_FUNCTIONS, fake_batch, make_batch
from qlora.plan.grpo import _sampled, _traced_generation

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("arch,batch,vocab", [("llama", 2, 512), ("llama", 1, 512), ("gpt_oss", 2, 512),
                                              ("llama", 2, 49152)])
def test_traced_generation_allocates_what_the_sampler_does(arch, batch, vocab):
    """gpt_oss: a sliding window of 16 tokens; vocab 49152 (SmolLM2's): the sampling loop's [rows, vocab] tensors
    are most of it (four are alive at its peak: this step's logits and their fp32 copy, the last step's copy and
    probabilities)."""
    G, P, T = 4, 12, 40
    config = load_config({**TINY[arch], "num_key_value_heads": 4, "vocab_size": vocab})   # a cache as large as it gets
    settings = RunSettings(device="cpu", task="grpo", num_generations=G, prompt_length=P)
    torch.manual_seed(0)
    model = build(config, settings)
    x = make_batch(config, "grpo", batch, T, prompt_length=P)
    model.eval()
    with torch.no_grad():
        _sampled(model, x["prompt_ids"], x["prompt_mask"], G, T)       # warm-up: lazy buffers, rotary caches
        tracker = CpuPeakTracker()
        tracker.start()
        ids, _, comp = _sampled(model, x["prompt_ids"], x["prompt_mask"], G, T)
        tracker.stop()
    assert ids.shape == (batch * G, P + T) and int(comp.sum()) == batch * G * T     # no row stopped early
    measured = tracker.max_increase()

    mode = new_fake_mode()
    with fake_tensors(mode, REAL_FUNCTIONS):
        fake = build(config, settings, init=False)
        fake.eval()
        f = fake_batch(config, "grpo", batch, T, settings.dtype, prompt_length=P)
        mask = None if f["prompt_mask"] is None else f["prompt_mask"].repeat_interleave(G, 0)
        with torch.no_grad():
            _traced_generation(fake, f["prompt_ids"].repeat_interleave(G, 0), mask, T)   # warm-up, as above
            tracker = StorageTracker()
            tracker.start()
            _traced_generation(fake, f["prompt_ids"].repeat_interleave(G, 0), mask, T)
            tracker.stop()
    predicted = tracker.max_increase()
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
