"""Online RL with verifiable rewards (GRPO, Dr. GRPO, DAPO, BNPO) on one 4-bit base: generation, policy, reference.

    qlora train grpo                                                   # SmolLM2-135M-Instruct on arithmetic, offline
    qlora train grpo model=FOLDER_OR_HUB_ID data=prompts.jsonl rewards=[my_rewards.py:score]
    qlora train recipes/configs/grpo.yaml loss_type=grpo beta=0.04 num_generations=8

Data: rows with a `prompt` (a text, or chat messages rendered with the tokenizer's chat template and its
generation prompt); every other column is passed to the reward functions by name (recipes/grpo_rewards.py:
TRL's signature). The default, `arithmetic`, asks "What is A + B?" (A, B in 0..30), with an `answer` column
scored by the built-in `exact_answer` (and `format` / `length` columns for those rewards); its eval questions are
never trained on.

One step, `train.batch_size` prompts (qlora.objectives.rollout, qlora.objectives.grpo):
  1. sampling: the policy itself (the same 4-bit base, adapters on, eval mode, no grad, KV cache) writes
     `num_generations` completions per prompt of at most `max_completion_length` tokens, all rows at once;
  2. rewards: each function on every completion, weighted and summed; advantages relative to the prompt's
     group (`scale_rewards`);
  3. the reference (only when `beta` > 0): the same base with the adapters off, no grad;
  4. the policy's log-probs of the completion tokens through the chunked head, and the clipped loss of
     `loss_type`. With num_iterations 1 (the default) each batch is used once: the sampling policy is the current
     one. With num_iterations N, as TRL: the sampled batch (and its rewards, advantages, reference log-probs and
     the sampling policy's log-probs, computed once with no grad) is trained on for N optimizer steps, the ratio
     taken against those old log-probs; the prompts the loop hands in on steps 2..N of a cycle are not used (TRL's
     sampler repeats its prompts instead), and a run resumed from a checkpoint samples afresh at once.
With train.grad_accum > 1 a step's micro-batches are all sampled before the first one's forward (TRL's generation
batch; one micro-batch's rows at a time): scale_rewards=batch and dapo's token count cover the whole step.
Logged with TRL's names: reward, reward_std, rewards/<name>/mean, frac_reward_zero_std, completions/mean_length,
completions/clipped_ratio, kl (beta > 0), clip_ratio/low_mean, high_mean, region_mean (metrics.jsonl, the log,
curves.png); sampled completions with their rewards in samples.jsonl every `samples_every` steps; the held-out
prompts' mean reward of greedy completions before training, every train.eval_every steps and at the end.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from qlora.bundled import default_cache_dir
from qlora.errors import QLoRAError
from qlora.lora.inject import disable_adapters
from qlora.objectives.grpo import LOSS_TYPES, SCALE_REWARDS, completion_logps, group_advantages, nanstd, policy_loss
from qlora.objectives.rollout import Sampler
from qlora.train.loop import TrainConfig, train
from qlora.util.checks import check_ints, check_numbers
from qlora.util.dist import is_main_process
from qlora_recipes.causal_lm import (
    LMRecipeConfig,
    build_model,
    clear_samples,
    evaluate_before,
    finish,
    load_tokenizer,
    read_splits,
    report_first_step,
)
from qlora_recipes.grpo_rewards import load_rewards, score


@dataclass
class GRPOConfig(LMRecipeConfig):
    """The keys every causal-LM recipe shares (recipes/causal_lm.py) and GRPO's own below (TRL's names)."""
    data: str = "arithmetic"
    """Prompts: a file / folder / Hub data set with a `prompt` column, or `arithmetic` (built here, offline)."""
    rewards: list = field(default_factory=lambda: ["exact_answer"])
    """Reward functions: built-in names (exact_answer, format, length), path/to/file.py:function, module:function."""
    reward_weights: Optional[list] = None
    """One weight per reward function (None: all 1)."""
    num_generations: int = 4
    """Completions sampled per prompt (the group each advantage is relative to)."""
    max_prompt_length: int = 256
    """Longer prompts keep their last max_prompt_length tokens (counted)."""
    max_completion_length: int = 32
    """Most tokens a completion may have (longer ones are cut: completions/clipped_ratio)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling (1.0: off)."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    beta: float = 0.0
    """Weight of the KL to the reference (the base with the adapters off); 0 as in TRL: no reference pass."""
    use_bias_correction_kl: bool = True
    """With beta > 0, the KL term times the probability ratio (TRL's default: the unbiased reverse-KL gradient)."""
    epsilon: float = 0.2
    """Lower clip of the probability ratio: 1 - epsilon."""
    epsilon_high: Optional[float] = None
    """Upper clip: 1 + epsilon_high (None: epsilon; DAPO uses 0.28)."""
    loss_type: str = "dapo"
    """grpo | dr_grpo | dapo | bnpo (TRL's; dapo is TRL's default)."""
    scale_rewards: str = "group"
    """group | batch | none: what the advantages are divided by (Dr. GRPO: none)."""
    num_iterations: int = 1
    """Optimizer steps per sampled batch (TRL's mu; > 1: the ratio is taken against the sampling policy)."""
    samples_every: int = 10
    """Write the step's sampled completions and rewards to samples.jsonl every N steps (0: never)."""
    train_size: Optional[int] = 512
    eval_size: Optional[int] = 64
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5, batch_size=4, out_dir="runs/grpo"))
    """The loop: max_steps, batch_size (prompts; each gets num_generations completions), lr, eval_every, ..."""
    out_dir: str = "runs/grpo"
    """Where everything goes (train.out_dir follows it)."""

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise QLoRAError(f"loss_type={self.loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise QLoRAError(f"scale_rewards={self.scale_rewards!r}; allowed: {', '.join(SCALE_REWARDS)}")
        check_ints(self, ("num_generations",), 2)
        check_ints(self, ("max_prompt_length", "max_completion_length", "num_iterations"), 1)
        check_ints(self, ("top_k", "samples_every"), 0)
        check_numbers(self, ("temperature", "top_p", "epsilon"), above=0)
        check_numbers(self, ("beta",), at_least=0)
        if not isinstance(self.rewards, list) or not self.rewards:
            raise QLoRAError("rewards must be a list of reward functions, e.g. rewards=[exact_answer]")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise QLoRAError(f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards")

    def head_words(self) -> str:
        reference = "reference = the same base, adapters off" if self.beta else "no reference (beta 0)"
        return f"{self.num_generations} completions per prompt sampled by the policy, chunked log-probs, {reference}"


# ------------------------------------------------------------------------------------------------ data
def arithmetic_files(folder: Optional[Path] = None, n_train: int = 800, n_eval: int = 64, seed: int = 0):
    """(train file, eval file): "What is A + B?" with a checkable `answer` (A, B in 0..30: 961 distinct
    questions); eval questions never in training. Also a `format` column (the number alone, a regex) and a
    `length` column (1 word) for the built-in rewards of those names."""
    folder = Path(folder or default_cache_dir() / "arithmetic-v4")
    train_file, eval_file = folder / "train.jsonl", folder / "eval.jsonl"
    if train_file.is_file() and eval_file.is_file():
        return train_file, eval_file
    rng = random.Random(seed)
    pairs = rng.sample([(a, b) for a in range(31) for b in range(31)], n_train + n_eval)
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b),
             "format": r"\s*-?\d+\.?\s*", "length": 1} for a, b in pairs]
    folder.mkdir(parents=True, exist_ok=True)
    for path, part in ((train_file, rows[:n_train]), (eval_file, rows[n_train:])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in part))
        tmp.replace(path)
    return train_file, eval_file


def encode_prompts(rows: list, tokenizer, max_prompt_length: int, name: str) -> list[dict]:
    """Each row (qlora.data.rows.Row) -> {prompt, prompt_ids, columns}; a chat prompt gets the template's
    generation prompt."""
    out, cut = [], 0
    for r in rows:
        row = r.data
        if "prompt" not in row:
            raise QLoRAError(f"{r.where}: no 'prompt' column (columns: {', '.join(row)}); GRPO needs prompts")
        prompt = row["prompt"]
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tokenizer(str(prompt), add_special_tokens=True)["input_ids"]
        if len(ids) > max_prompt_length:
            ids, cut = ids[-max_prompt_length:], cut + 1
        out.append({"prompt": prompt, "prompt_ids": list(ids), "columns": {k: v for k, v in row.items() if k != "prompt"}})
    print(f"{name}: {len(out):,} prompts" + (f", {cut:,} cut to their last {max_prompt_length} tokens" if cut else ""))
    return out


# ------------------------------------------------------------------------------------------------ one step
class Scorer:
    """Completions -> rewards [rows] (weighted sum; NaN when no function scored the row) and their metrics."""

    def __init__(self, cfg: GRPOConfig, tokenizer):
        self.functions = load_rewards(list(cfg.rewards))
        self.weights = torch.tensor(cfg.reward_weights or [1.0] * len(self.functions), dtype=torch.float32)
        self.tokenizer = tokenizer

    def __call__(self, examples: list[dict], completions: list[list[int]], n: int):
        prompts = [e["prompt"] for e in examples for _ in range(n)]
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        chat = isinstance(examples[0]["prompt"], list)
        shown = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        names = examples[0]["columns"].keys()
        columns = {k: [e["columns"].get(k) for e in examples for _ in range(n)] for k in names}
        table = torch.tensor(score(self.functions, prompts, shown, completions, columns), dtype=torch.float32)
        rewards = (table * self.weights).nansum(1)
        rewards[torch.isnan(table).all(1)] = math.nan
        metrics = {f"rewards/{name}/mean": torch.nanmean(table[:, j]) for j, (name, _) in enumerate(self.functions)}
        return rewards, metrics, texts


@dataclass
class Rollout:
    """One micro-batch's sampled completions and what is computed once for them (no grad)."""
    examples: list
    ids: torch.Tensor            # [rows, L] prompt + completion (left-padded prompts)
    attn: torch.Tensor           # [rows, L]
    comp: torch.Tensor           # [rows, L] 1 on completion tokens
    advantages: Optional[torch.Tensor]   # [rows] (sample_step's, over the whole step)
    rewards: torch.Tensor        # [rows] (NaN: no reward function scored the row)
    texts: list
    metrics: dict                # reward metrics with TRL's names
    ref: Optional[torch.Tensor]  # [rows, L-1] the reference's log-probs (beta > 0)
    old: Optional[torch.Tensor]  # [rows, L-1] the sampling policy's log-probs (num_iterations > 1)


def sample_rollout(cfg: GRPOConfig, model, examples: list[dict], tokenizer, pad_id: int, scorer: Scorer) -> Rollout:
    """Steps 1 and 3 of the module docstring for one micro-batch (its rewards, the reference's log-probs), and the
    sampling policy's log-probs when the batch is reused; the advantages are sample_step's."""
    G = cfg.num_generations
    sampler = Sampler(model, eos_id=tokenizer.eos_token_id, pad_id=pad_id, max_new_tokens=cfg.max_completion_length,
                      temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    roll = sampler([e["prompt_ids"] for e in examples], n=G)
    rewards, metrics, texts = scorer(examples, roll.completions, G)
    device = next(model.parameters()).device
    ids, attn, comp = roll.input_ids.to(device), roll.attention_mask.to(device), roll.completion_mask.to(device)
    ref = old = None
    with torch.no_grad():
        if cfg.beta:
            with disable_adapters(model):
                ref = completion_logps(model, ids, attn, comp, cfg.loss_chunk_size)
        if cfg.num_iterations > 1:
            old = completion_logps(model, ids, attn, comp, cfg.loss_chunk_size)
    lengths = roll.completion_mask.sum(1).float()
    metrics = {"reward": torch.nanmean(rewards), "reward_std": torch.nan_to_num(nanstd(rewards)), **metrics,
               "completions/mean_length": lengths.mean(), "completions/clipped_ratio": roll.clipped.float().mean()}
    return Rollout(examples, ids, attn, comp, None, rewards, texts, metrics, ref, old)


def sample_step(cfg: GRPOConfig, model, batches: list[list[dict]], tokenizer, pad_id: int, scorer: Scorer) -> list:
    """Steps 1-3 for every micro-batch of a step, as TRL's generation batch: sampled one micro-batch at a time (the
    planner's generation), the advantages over all of them (scale_rewards=batch: the whole step's std)."""
    rollouts = [sample_rollout(cfg, model, examples, tokenizer, pad_id, scorer) for examples in batches]
    adv = group_advantages(torch.cat([r.rewards for r in rollouts]), cfg.num_generations, cfg.scale_rewards)
    for r, values in zip(rollouts, adv.values.split([len(r.rewards) for r in rollouts])):
        r.advantages = values.to(r.ids.device)
        r.metrics["frac_reward_zero_std"] = torch.tensor(adv.frac_zero_std)
    return rollouts


def make_loss(cfg: GRPOConfig, tokenizer, pad_id: int, scorer: Scorer):
    """(prepare_step, loss_fn) for qlora.train.train. prepare_step(model, batches), with a step's grad_accum
    micro-batches before the first one's forward: on the first of every num_iterations steps, sample_step on them
    and their completion tokens counted over every process (dapo's normaliser: TRL's num_items_in_batch); on the
    others the same rollouts again. loss_fn(model, batch): the clipped loss of the step's next micro-batch,
    through the policy's current log-probs. With dapo, each micro-batch's token sum is divided by the step's
    tokens / (grad_accum x processes): the loop divides each loss by grad_accum and DDP averages the processes,
    so the step's gradient is that of the sum over all of its completion tokens / their count, as TRL's."""
    state = {"step": 0, "slot": 0, "rollouts": [], "tokens": None}

    def prepare_step(model, batches):
        step = state["step"]
        if step % cfg.num_iterations == 0 or len(state["rollouts"]) != len(batches):
            state["rollouts"] = sample_step(cfg, model, [b["examples"] for b in batches], tokenizer, pad_id, scorer)
            tokens = sum(r.comp.sum() for r in state["rollouts"]).float()
            shards = len(batches)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(tokens)
                shards *= torch.distributed.get_world_size()
            state["tokens"] = tokens / shards
            if cfg.samples_every and step % cfg.samples_every == 0:
                for r in state["rollouts"]:                                       # steps 1, 1 + N, ...
                    _write_samples(cfg, step + 1, r.examples, r.texts, r.rewards, cfg.num_generations)
        state["step"], state["slot"] = step + 1, 0

    def loss_fn(model, batch):
        r = state["rollouts"][state["slot"]]
        state["slot"] += 1
        logps = completion_logps(model, r.ids, r.attn, r.comp, cfg.loss_chunk_size)
        loss, stats = policy_loss(logps, r.old, r.advantages, r.comp[:, 1:], loss_type=cfg.loss_type,
                                  epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=cfg.beta, ref_logps=r.ref,
                                  max_completion_length=cfg.max_completion_length, tokens=state["tokens"],
                                  use_bias_correction_kl=cfg.use_bias_correction_kl)
        loss.metrics = {**r.metrics, **stats}
        return loss
    return prepare_step, loss_fn


def _write_samples(cfg: GRPOConfig, step: int, examples, texts, rewards, n: int) -> None:
    if not is_main_process():
        return
    path = Path(cfg.out_dir) / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"step": step, "prompt": examples[i // n]["prompt"], "completion": text,
                                "reward": None if math.isnan(rewards[i]) else rewards[i].item()}) + "\n")


def make_eval(cfg: GRPOConfig, eval_set: list[dict], tokenizer, pad_id: int, scorer: Scorer):
    """evaluate(model) -> {reward, rewards/<name>/mean}: greedy completions of the held-out prompts."""
    def evaluate(model):
        sampler = Sampler(model, eos_id=tokenizer.eos_token_id, pad_id=pad_id, max_new_tokens=cfg.max_completion_length,
                          greedy=True)
        totals, shown = [], []
        for i in range(0, len(eval_set), cfg.eval_batch_size):
            part = eval_set[i:i + cfg.eval_batch_size]
            roll = sampler([e["prompt_ids"] for e in part], n=1)
            rewards, metrics, texts = scorer(part, roll.completions, 1)
            totals.append((rewards, metrics))
            shown += list(zip(part, texts, rewards.tolist()))[:max(0, cfg.samples - len(shown))]
        rewards = torch.cat([r for r, _ in totals])
        out = {"reward": torch.nanmean(rewards).item()}
        for name, _ in scorer.functions:
            key = f"rewards/{name}/mean"
            out[key] = sum(m[key].item() * len(r) for r, m in totals) / len(rewards)
        tqdm.write(f"eval ({len(rewards)} prompts, greedy): mean reward {out['reward']:.4f}")
        for example, text, reward in shown:
            tqdm.write(f"  sample | {_last_user(example['prompt'])!r} -> {text!r} (reward {reward:.2f})")
        return out
    return evaluate


def _last_user(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)[-80:]


def main(cfg: GRPOConfig) -> dict:
    t0 = time.perf_counter()
    path, tokenizer, pad_id = load_tokenizer(cfg)
    scorer = Scorer(cfg, tokenizer)                       # a reward that does not resolve: before any loading
    rows, eval_rows = read_splits(cfg, {"arithmetic": arithmetic_files})
    train_set = encode_prompts(rows, tokenizer, cfg.max_prompt_length, "train")
    eval_set = encode_prompts(eval_rows, tokenizer, cfg.max_prompt_length, "eval") if eval_rows else []
    if not train_set:
        raise QLoRAError(f"no training prompt in {cfg.data}")
    model = build_model(cfg, path)
    prepare_step, loss_fn = make_loss(cfg, tokenizer, pad_id, scorer)
    evaluate = make_eval(cfg, eval_set, tokenizer, pad_id, scorer) if eval_set else None
    clear_samples(cfg)
    before = evaluate_before(evaluate, model)
    plan_as = dict(task="grpo", num_generations=cfg.num_generations, beta=cfg.beta, num_iterations=cfg.num_iterations,
                   prompt_length=max(len(e["prompt_ids"]) for e in train_set), seq=cfg.max_completion_length)
    result = train(model, train_set, lambda examples: {"examples": examples}, loss_fn, cfg.train, eval_fn=evaluate,
                   on_first_step=report_first_step(cfg), plan_as=plan_as, prepare_step=prepare_step)
    after = result.evals[-1][1] if result.evals else None
    if before and after:
        print(f"held-out prompts after {result.steps} steps: mean reward (greedy) {before['reward']:.4f} -> "
              f"{after['reward']:.4f}")
    return finish(cfg, model, tokenizer, result, before, {"rewards": list(cfg.rewards), "loss_type": cfg.loss_type,
                                                          "beta": cfg.beta}, t0)
