"""memprofile.measure on tiny models: each category checked against an independent count."""
import copy
import time

import pytest
import torch
from torch import nn

from memprofile.measure import StepMemory, measure_step, measure_step_or_oom
from memprofile.oom import call_or_oom, is_out_of_memory
from memprofile.peak import CpuPeakTracker
from memprofile.tensors import CATEGORIES, param_counts, param_dtypes, weight_bytes
from tests.memprofile.mp_models import configure, quantize, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")


def _llama(conf, layers=2, dtype=torch.bfloat16):
    model, config, make_batch = tiny_model("llama", dtype, layers=layers)
    configure(model, conf, "llama", dtype=dtype)
    return model, make_batch


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("conf", ["full", "lora"])
def test_gradients_and_adamw_state_follow_the_trainable_parameters(conf):
    model, make_batch = _llama(conf)
    r = measure_step(model, make_batch(2, 16), timed_steps=0)
    params = _trainable(model)
    trainable = sum(p.numel() * p.element_size() for p in params)
    assert r.weights_trainable == trainable
    assert r.gradients == trainable
    # AdamW: exp_avg and exp_avg_sq shaped and typed like each parameter + a 4-byte fp32 step
    assert r.optimizer == 2 * trainable + 4 * len(params)
    assert r.trainable_params == sum(p.numel() for p in params)
    assert r.peak_method == "cpu-profiler-allocator-events"
    assert set(r.bytes()) == set(CATEGORIES)


def _linear4bit_bytes(model) -> int:
    """Packed weights + every quant-state tensor, walked by hand for each Linear4bit."""
    import bitsandbytes as bnb

    total = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w, qs = m.weight, m.weight.quant_state
            parts = [w, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
            total += sum(t.numel() * t.element_size() for t in parts)
    return total


def quantized_bytes(n: int, blocksize: int = 64) -> int:
    """Closed form of a double-quantized NF4 Params4bit of n weights: packed codes, uint8 absmax
    per block, 16 fp32 levels, fp32 offset, fp32 absmax per 256 blocks, 256-entry fp32 code."""
    blocks = -(-n // blocksize)
    return (n + 1) // 2 + blocks + 16 * 4 + 4 + -(-blocks // 256) * 4 + 256 * 4


def test_quantized_weights_are_packed_bytes_plus_quant_state():
    model, make_batch = _llama("qlora")
    r = measure_step(model, make_batch(1, 8), timed_steps=0)
    assert r.weights_quantized == _linear4bit_bytes(model) > 0
    # the closed form agrees layer by layer
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert r.weights_quantized == sum(quantized_bytes(m.in_features * m.out_features) for m in layers)
    # 4-bit parameters count as the weights they stand for
    assert r.total_params == sum(m.in_features * m.out_features for m in layers) + sum(
        p.numel() for p in model.parameters() if p.dtype != torch.uint8)


def test_4bit_weights_take_about_4_13_of_16_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.ReLU(), nn.Linear(512, 512, bias=False)).to(torch.bfloat16)
    bf16 = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize(model, ["0", "2"], compute_dtype=torch.bfloat16)
    head = nn.Linear(512, 4, dtype=torch.bfloat16)
    net = nn.Sequential(model, head)
    r = measure_step(net, torch.randn(4, 512, dtype=torch.bfloat16), timed_steps=0, warmup_steps=0)
    ratio = r.weights_quantized / bf16
    # 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks = 4.127 bits, plus the code tables
    assert ratio == pytest.approx(4.13 / 16, rel=0.02), ratio


def test_checkpointing_lowers_activations():
    plain, make_batch = _llama("lora", layers=4)
    ckpt, _ = _llama("lora-ckpt", layers=4)
    batch = make_batch(2, 32)
    a = measure_step(plain, batch, timed_steps=0).activations
    b = measure_step(ckpt, batch, timed_steps=0).activations
    assert b < 0.6 * a, (a, b)


def _independent_saved_bytes(model, batch) -> int:
    """A separate saved_tensors_hooks pass: keep the saved tensors themselves, then sum the
    distinct storages that are not the model's own or the batch's."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    own |= {t.untyped_storage().data_ptr() for t in batch.values()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        loss = model(**batch).loss
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    total = sum(n for ptr, n in storages.items() if ptr not in own)
    del loss
    return total


@pytest.mark.parametrize("conf", ["full", "lora", "head"])
def test_activations_match_an_independent_hook_count(conf):
    model, make_batch = _llama(conf)
    batch = make_batch(2, 24)
    model.train()
    expected = _independent_saved_bytes(model, batch)
    r = measure_step(model, batch, timed_steps=0)
    assert r.activations == expected > 0


class _LiveStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """Independent CPU counter: every storage an op returns is tracked through a weak
    reference; after each op, the live total is summed. Sees op boundaries only (not scratch
    inside kernels), so it can only be <= the allocator-event peak."""

    def __init__(self, existing):
        super().__init__()
        self.live = {}
        for t in existing:
            self._add(t)
        self.peak = self._total()

    def _add(self, t):
        from torch.multiprocessing.reductions import StorageWeakRef

        st = t.untyped_storage()
        k = st.data_ptr()
        if k and (k not in self.live or self.live[k][0].expired()):
            self.live[k] = (StorageWeakRef(st), st.nbytes())

    def _total(self):
        return sum(n for w, n in self.live.values() if not w.expired())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._add(t)
        self.peak = max(self.peak, self._total())
        return out


def test_cpu_peak_agrees_with_an_independent_counter_and_bounds():
    model, make_batch = _llama("lora")
    batch = make_batch(2, 32)
    params = _trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-5)
    r = measure_step(model, batch, optimizer=opt, timed_steps=0)   # warm-up + measured step
    existing = list(model.parameters()) + list(model.buffers()) + list(batch.values())
    existing += [v for st in opt.state.values() for v in st.values()]
    counter = _LiveStorages(existing)
    with counter:
        loss = model(**batch).loss
        loss.backward()
        del loss
        opt.step()
    opt.zero_grad(set_to_none=True)
    assert counter.peak <= r.peak <= counter.peak * 1.02, (counter.peak, r.peak)
    weights = r.weights_frozen + r.weights_trainable + r.weights_quantized
    assert r.peak >= weights + r.gradients + r.optimizer
    assert r.peak >= weights + r.optimizer + r.activations


def test_profiler_running_sum_ends_at_the_gradients():
    # after a forward+backward, what is still allocated is exactly the new .grad tensors
    model, make_batch = _llama("full")
    batch = make_batch(2, 16)
    model.train()
    tracker = CpuPeakTracker()
    tracker.start()
    loss = model(**batch).loss
    loss.backward()
    del loss
    tracker.stop()
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters())
    assert tracker.net_increase() == grads
    assert tracker.max_increase() > grads


def test_out_of_memory_is_recorded_not_raised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert call_or_oom(lambda: 3) == (3, None)
    with pytest.raises(ValueError):
        call_or_oom(lambda: (_ for _ in ()).throw(ValueError("no")))

    model, make_batch = _llama("lora")

    def boom(output, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    r = measure_step_or_oom(model, make_batch(1, 8), loss_fn=boom)
    assert isinstance(r, StepMemory) and r.fits is False
    assert r.peak is None and r.weights_frozen > 0 and "OutOfMemoryError" in r.error
    assert all(p.grad is None for p in model.parameters())


def test_measuring_a_1m_parameter_model_costs_well_under_a_second_more_than_its_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 512), nn.GELU(), nn.Linear(512, 1024))  # ~1.05M params
    x = torch.randn(64, 1024)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        model(x).float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    step()
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = measure_step(model, x, optimizer=opt, warmup_steps=0, timed_steps=0)
    measured = time.perf_counter() - t0
    assert measured - plain < 0.5, (measured, plain)
    assert r.activations > 0 and r.step_seconds > 0


class _SaveWrapper(nn.Module):
    """The shape of qlora's ModulesToSave and PEFT's ModulesToSaveWrapper: a frozen original beside the
    trained copy that forward uses."""

    def __init__(self, module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        for p in module.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.modules_to_save(x)


def test_param_counts_count_a_saved_modules_copy_not_its_original():
    """memprofile.tensors.param_counts, the one (trainable, total) count (qlora.count_parameters is it):
    a modules_to_save wrapper's frozen original is not counted, its trained copy is; a tensor the original
    shares with another module (a tied head) is counted there, once. Weight bytes still hold the original."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))       # embedding [10, 4], head [10, 4] + bias 10
    model[1].weight = model[0].weight                                  # tied
    assert param_counts(model) == (50, 50)
    model[1] = _SaveWrapper(model[1])
    # the embedding (frozen with the original it is tied to) + the head's trained copy (weight and bias)
    assert param_counts(model) == (50, 40 + 50)
    assert sum(param_dtypes(model).values()) == 90
    assert sum(weight_bytes(model).values()) == 4 * (40 + 10 + 50)     # the original's bias is memory all the same
    untied = nn.Sequential(nn.Embedding(10, 4), _SaveWrapper(nn.Linear(4, 10)))
    assert param_counts(untied) == (40 + 50, 40 + 50)


def test_a_saved_storage_at_a_dead_ones_address_counts_its_own_size(monkeypatch):
    """Storages are keyed by address (a fake one's by its StorageImpl): when a saved storage dies and the allocator
    puts a new one there, the new one counts with its own size. (The counter kept the dead one's, so the planner's
    activations depended on where the allocator put things: 105,728 instead of 132,096 bytes for a tiny Mistral 3.)
    All keys are made equal here, which is what address reuse looks like to the counter."""
    import memprofile.measure as measure

    monkeypatch.setattr(measure, "storage_key", lambda t: ("cpu", None, 1))
    counter = measure._SavedTensorCounter(exclude=set())
    first = counter.pack(torch.empty(10))
    assert counter.live_bytes() == 40
    del first                                   # freed: its address is free for the next storage
    second = counter.pack(torch.empty(1000))
    assert counter.live_bytes() == 4000
    also = counter.pack(second[:10])            # a view of a live saved storage: still one storage
    assert counter.live_bytes() == 4000 and also is not None
