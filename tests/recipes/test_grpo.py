"""qlora train grpo: the sampler, the log-probs, the reference, the rewards, and a tiny run end to end.

    .venv/bin/python -m pytest -q tests/recipes/test_grpo.py      (~30 s)

References: transformers' own generate without the KV cache, log_softmax of the model's full logits, the model
before its adapters were added, and hand-computed rewards.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import qlora
from qlora.errors import QLoRAError
from qlora.objectives.grpo import completion_logps
from qlora.objectives.rollout import Sampler
from qlora_recipes.grpo_rewards import exact_answer, load_rewards, score

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = [[5, 9, 12], [7, 3]]


def test_greedy_sampling_with_the_cache_equals_generation_without_it(tiny_llama):
    model = tiny_llama()
    roll = Sampler(model, eos_id=11, pad_id=0, max_new_tokens=6, greedy=True)(PROMPTS, n=2)
    assert roll.input_ids.shape[0] == 4 and roll.completions[0] == roll.completions[1]   # a prompt's rows adjacent
    for r, prompt in enumerate(p for p in PROMPTS for _ in range(2)):
        ids = torch.tensor([prompt])
        want = model.generate(input_ids=ids, do_sample=False, use_cache=False, max_new_tokens=6, pad_token_id=0,
                              eos_token_id=11)[0, len(prompt):].tolist()
        if 11 in want:
            want = want[:want.index(11) + 1]
        assert roll.completions[r] == want
        assert roll.completion_mask[r].sum() == len(want) and bool(roll.clipped[r]) == (11 not in want)


def test_completion_logps_are_the_models_log_softmax_at_completion_tokens(tiny_llama):
    model = tiny_llama()
    roll = Sampler(model, eos_id=11, pad_id=0, max_new_tokens=5, temperature=1.0)(PROMPTS, n=2)
    got = completion_logps(model, roll.input_ids, roll.attention_mask, roll.completion_mask, chunk_size=3)
    with torch.no_grad():
        logits = model(input_ids=roll.input_ids, attention_mask=roll.attention_mask).logits
    want = logits[:, :-1].log_softmax(-1).gather(-1, roll.input_ids[:, 1:, None]).squeeze(-1)
    mask = roll.completion_mask[:, 1:].bool()
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)
    assert (got[~mask] == 0).all()


def test_the_reference_is_the_base_without_adapters(tiny_llama):
    plain = tiny_llama()
    model = qlora.add_lora(tiny_llama(), qlora.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    roll = Sampler(plain, eos_id=11, pad_id=0, max_new_tokens=5)(PROMPTS, n=2)
    args = (roll.input_ids, roll.attention_mask, roll.completion_mask)
    with torch.no_grad(), qlora.disable_adapters(model):
        ref = completion_logps(model, *args)
    with torch.no_grad():
        torch.testing.assert_close(ref, completion_logps(plain, *args), rtol=1e-6, atol=1e-6)
        assert (completion_logps(model, *args) - ref).abs().max() > 1e-4     # the adapters do change it


def test_rewards_get_the_columns_as_trl_passes_them(tmp_path):
    seen = {}
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, completion_ids, answer, source, **kw):\n"
        "    SEEN.update(prompts=prompts, answer=answer, source=source, ids=completion_ids, kw=kw)\n"
        "    return [None if 'skip' in c else -len(c) for c in completions]\n"
        "SEEN = {}\n")
    fns = load_rewards(["exact_answer", f"{tmp_path}/my_rewards.py:brevity"])
    assert [n for n, _ in fns] == ["exact_answer", "brevity"]
    table = score(fns, ["q1", "q1", "q2"], ["it is 12", "skip", "forty"], [[1], [2], [3]],
                  {"answer": ["12", "12", "40"], "source": ["a", "a", "b"]})
    seen = fns[1][1].__globals__["SEEN"]
    assert seen["answer"] == ["12", "12", "40"] and seen["source"] == ["a", "a", "b"] and seen["ids"] == [[1], [2], [3]]
    assert table[0] == [1.0, -8.0] and table[1][0] == 0.0 and table[1][1] != table[1][1] and table[2] == [0.0, -5.0]
    assert exact_answer(["q"], ["The answer is 1,234."], answer=["1234"]) == [1.0]


@pytest.mark.parametrize("spec, said", [("nowhere.py:f", "no file nowhere.py"), ("json:nothing", "has no function"),
                                        ("no_such_module_x:f", "cannot import module"), ("plain", "use a built-in")])
def test_a_reward_that_does_not_resolve_is_one_line(spec, said):
    with pytest.raises(QLoRAError, match=said):
        load_rewards([spec])


@pytest.mark.parametrize("body, said", [("raise KeyError('x')", "raised KeyError"),
                                        ("return [1.0]", "returned 1 values for 2 completions"),
                                        ("return ['a', 1.0]", "returned 'a' for row 0")])
def test_a_reward_that_misbehaves_is_one_line(tmp_path, body, said):
    (tmp_path / "bad.py").write_text(f"def f(prompts, completions, **kw):\n    {body}\n")
    fns = load_rewards([f"{tmp_path}/bad.py:f"])
    with pytest.raises(QLoRAError, match=said):
        score(fns, ["p", "p"], ["a", "b"], [[1], [2]], {})


def test_grpo_runs_end_to_end_and_logs_trls_names(tmp_path, tiny_chat_model):
    from qlora.cli import main
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "answer": str(a + 1)} for a in range(12)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = main(["train", "grpo", f"model={tiny_chat_model}", f"data={data}", f"out_dir={out}", "eval_fraction=0.25",
                 "train.batch_size=2", "train.max_steps=2", "train.progress=false", "num_generations=3",
                 "max_completion_length=4", "lora.r=4", "mode=lora", "beta=0.04", "samples_every=1",
                 "rewards=[exact_answer,length]", "train.eval_every=null"])
    assert code == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in logged if "loss" in r)
    for name in ("reward", "reward_std", "rewards/exact_answer/mean", "rewards/length/mean", "frac_reward_zero_std",
                 "completions/mean_length", "completions/clipped_ratio", "kl", "clip_ratio/low_mean",
                 "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert name in step, name
    assert 1 <= step["completions/mean_length"] <= 4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and len(samples) == 2 * 2 * 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "reward" in summary["eval_before"]



def test_memory_budget_plans_the_grpo_step(tmp_path, tiny_chat_model, capsys):
    """train.memory_budget plans B prompts x num_generations rows (task grpo: generation, then training on them):
    the micro-batch it picks is the planner's largest number of prompts that fits, not of rows; the first step is
    within 10 % of the plan (no warning), also with 6 MiB of uncollected garbage and 6 MiB of other live tensors
    in the process (both counted as live before the step: 39.6 MiB measured against 33.9 MiB planned in a full
    suite run, whose earlier tests leave tensors behind)."""
    import gc
    import warnings

    from qlora.cli import main
    rows = [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(8)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "grpo", f"model={tiny_chat_model}", f"data={data}", "eval_fraction=0", "train.batch_size=4",
            "train.max_steps=1", "train.progress=false", "num_generations=3", "max_completion_length=4", "mode=lora"]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(6):
            garbage = [torch.zeros(1 << 18)]          # 1 MiB in a reference cycle
            garbage.append(garbage)
        del garbage
        held = torch.zeros(6 << 18)                   # 6 MiB the run does not own
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            assert main([*args, f"out_dir={tmp_path / 'a'}", "train.memory_budget=4GiB"]) == 0
    finally:
        if was_enabled:
            gc.enable()
    assert not [w for w in said if "memory:" in str(w.message)], [str(w.message) for w in said]
    assert held.numel() == 6 << 18
    said = capsys.readouterr().out
    assert "memory_budget 4GiB: batch_size=4 grad_accum=1" in said, said
    predicted = float(said.split("predicted peak ")[1].split(" GiB")[0]) * 2**30
    assert main([*args, f"out_dir={tmp_path / 'b'}", f"train.memory_budget={int(predicted * 0.9)}"]) == 0
    said = capsys.readouterr().out
    assert "batch_size=2 grad_accum=2" in said or "batch_size=3 grad_accum=2" in said, said
    assert main([*args, f"out_dir={tmp_path / 'c'}", "train.memory_budget=1MiB"]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "error" in line]        # (stderr also holds the loading bar)
    assert len(said) == 1 and "lower num_generations" in said[0] and not (tmp_path / "c").exists()


def test_grad_accum_and_num_iterations_from_the_command_line(tmp_path, tiny_chat_model):
    """qlora train grpo train.grad_accum=2 num_iterations=2: the first step samples both of its micro-batches
    (samples.jsonl: 2 x 2 prompts x 2 completions at step 1), the second trains on them again (nothing sampled)."""
    from qlora.cli import main
    rows = [{"prompt": f"What is {a} + 2?", "answer": str(a + 2)} for a in range(8)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "grpo", f"model={tiny_chat_model}", f"data={data}", f"out_dir={out}", "eval_fraction=0",
                 "train.batch_size=2", "train.grad_accum=2", "train.max_steps=2", "train.progress=false",
                 "num_generations=2", "num_iterations=2", "max_completion_length=4", "mode=lora", "samples_every=1",
                 "train.log_every=1"]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 8
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]


def test_num_iterations_reuses_each_sampled_batch_against_its_sampling_policy(tiny_llama, monkeypatch):
    """num_iterations=2: a rollout on steps 1 and 3 only (step 2's prompts unused), its reference and old
    log-probs computed once with no grad; step 1's ratio is 1 (old = current), step 2's loss is the clipped loss
    of the moved policy against the old log-probs (not against itself)."""
    import qlora_recipes.grpo as grpo
    from qlora.objectives.grpo import completion_logps, policy_loss
    from qlora.train.config import TrainConfig

    cfg = grpo.GRPOConfig(num_iterations=2, num_generations=2, max_completion_length=4, beta=0.04, samples_every=0,
                          train=TrainConfig(batch_size=2))
    torch.manual_seed(0)
    model = qlora.add_lora(tiny_llama(), qlora.LoraConfig(r=4, target_modules="all-linear"))
    rewards = iter(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 3.0, 0.0]]))

    def scorer(examples, completions, n):
        return next(rewards), {}, ["text"] * len(completions)
    rollouts, sample = [], grpo.sample_rollout
    monkeypatch.setattr(grpo, "sample_rollout", lambda *a: rollouts.append(sample(*a)) or rollouts[-1])
    prepare, loss_fn = grpo.make_loss(cfg, SimpleNamespace(eos_token_id=11), 0, scorer)
    batches = [{"examples": [{"prompt": "p", "prompt_ids": ids, "columns": {}} for ids in PROMPTS]} for _ in range(3)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for call, batch in enumerate(batches):
        prepare(model, [batch])
        loss = loss_fn(model, batch)
        assert len(rollouts) == (1 if call < 2 else 2)
        r = rollouts[-1]
        with torch.no_grad():
            logps = completion_logps(model, r.ids, r.attn, r.comp)
        args = dict(loss_type=cfg.loss_type, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                    ref_logps=r.ref, max_completion_length=cfg.max_completion_length)
        torch.testing.assert_close(loss.detach(), policy_loss(logps, r.old, r.advantages, r.comp[:, 1:], **args)[0])
        losses.append((loss.detach(), policy_loss(logps, None, r.advantages, r.comp[:, 1:], **args)[0]))
        if call != 1:                                      # the old log-probs are the sampling policy's
            torch.testing.assert_close(r.old, logps, rtol=0, atol=1e-6)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert rollouts[0].examples is batches[0]["examples"] and rollouts[1].examples is batches[2]["examples"]
    assert (losses[1][0] - losses[1][1]).abs() > 1e-6     # step 2: the ratio is against the old policy, not 1
    assert rollouts[0].ref is not None and not rollouts[0].ref.requires_grad and not rollouts[0].old.requires_grad
    with pytest.raises(QLoRAError, match="num_iterations=0"):
        grpo.GRPOConfig(num_iterations=0)


def test_grad_accum_normalises_the_step_as_one_batch(tiny_llama, monkeypatch):
    """train.grad_accum=2: prepare_step samples both micro-batches before the first forward; the advantages with
    scale_rewards=batch use the std of the whole step, and the dapo losses (each divided by grad_accum, as the loop
    does) give the gradient of TRL's loss of the whole step: sum over all completion tokens / their count."""
    import qlora_recipes.grpo as grpo
    from qlora.objectives.grpo import group_advantages, policy_loss
    from qlora.train.config import TrainConfig

    cfg = grpo.GRPOConfig(num_generations=2, max_completion_length=6, samples_every=0, scale_rewards="batch",
                          loss_type="dapo", train=TrainConfig(batch_size=2, grad_accum=2))
    torch.manual_seed(0)
    model = qlora.add_lora(tiny_llama(), qlora.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    rewards = iter(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 5.0, 3.0, 0.0]]))
    prepare, loss_fn = grpo.make_loss(cfg, SimpleNamespace(eos_token_id=11), 0,
                                      lambda examples, completions, n: (next(rewards), {}, ["t"] * len(completions)))
    batches = [{"examples": [{"prompt": "p", "prompt_ids": ids, "columns": {}} for ids in prompts]}
               for prompts in (PROMPTS, [[4, 4, 8, 1], [2]])]
    rollouts, sample = [], grpo.sample_rollout
    monkeypatch.setattr(grpo, "sample_rollout", lambda *a: rollouts.append(sample(*a)) or rollouts[-1])
    params = [p for p in model.parameters() if p.requires_grad]
    prepare(model, batches)
    assert len(rollouts) == 2                             # both micro-batches sampled before the first forward
    ours = sum(loss_fn(model, b) / 2 for b in batches)
    ours_grad = torch.autograd.grad(ours, params)
    whole = group_advantages(torch.cat([r.rewards for r in rollouts]), 2, "batch").values
    torch.testing.assert_close(torch.cat([r.advantages for r in rollouts]), whole)
    per_batch = group_advantages(rollouts[0].rewards, 2, "batch").values
    assert not torch.allclose(rollouts[0].advantages, per_batch)          # not each micro-batch's own std
    sums = [policy_loss(completion_logps(model, r.ids, r.attn, r.comp), None, r.advantages, r.comp[:, 1:],
                        loss_type="dapo", tokens=1.0)[0] for r in rollouts]
    counts = [int(r.comp.sum()) for r in rollouts]
    assert counts[0] != counts[1], counts                 # else each micro-batch's own count would give the same
    total = sum(counts)
    theirs = sum(sums) / total
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-7)
    for a, b in zip(ours_grad, torch.autograd.grad(theirs, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
