"""A written GGUF file read back and run against the merged model it was made from, on fixed prompts.

    report = verify_gguf(path, src, "q8_0")     # src: the MergedBase the file was written from

The reference is the merged model in fp32 (its tensors re-read from the MergedBase stream, into the model class
of the base's config). The file is read back by transformers' own GGUF loader (AutoModelForCausalLM with
gguf_file: it undoes llama.cpp's q/k permutation and Gemma's 1 + w itself, so our layout is checked against an
independent reader), and, where llama-cpp-python is installed, run by llama.cpp too. Reported per reader: the
logits' relative error ||Δ||/||ref||, top-1 agreement over every prompt position, and whether 16 greedy tokens
match. The limits (THRESHOLDS, the folder export's for f16/bf16) are on the relative error, the top-1 agreement
and the greedy tokens: every prompt's must be equal, or part where the reference itself is at a near-tie (its
top-2 margin there no larger than the largest logit difference measured on the prompts; after that token the
continuations differ by construction). Both continuations end at the model's EOS. When the two
fp32 models would not fit in memory, the check is skipped and says so. Run: pytest tests/qlora/export/test_gguf.py.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from qlora.export.from_files import MergedBase
from qlora.export.layout import model_class_for
from qlora.export.verify import available_memory

PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "def fibonacci(n):")
GREEDY_TOKENS = 16
# dtype -> (max relative error of the logits, min top-1 agreement %); K-quants: reported, no limit. q8_0: llama.cpp
# also rounds the activations to 8 bits in its q8_0 matmuls (measured on SmolLM2 + a trained adapter: relative
# 0.087, top-1 89.2%; transformers' read-back of the same file 0.040, 91.0%)
THRESHOLDS = {"f16": (1e-2, 99.0), "bf16": (5e-2, 95.0), "q8_0": (1e-1, 85.0),
              "q4_k_m": (None, None), "q5_k_m": (None, None), "q6_k": (None, None)}


def verify_gguf(path: Path, src: MergedBase, dtype: str) -> dict:
    """The file at `path` against the merged model (see the module docstring); a dict for the report."""
    path = Path(path)
    params = sum(_numel(s) for g in src.layout.groups for s in g.shapes.values())
    free = available_memory()
    if free is not None and params * 4 * 3 > free:      # two fp32 models and the activations
        return {"mode": "skipped", "passed": None,
                "reason": f"the merged model in fp32 twice ({params * 8 >> 20} MiB) does not fit in memory"}
    ids = prompt_ids(src.folder, src.layout.model.config.vocab_size)
    reference = merged_model(src)
    ref_logits, ref_greedy = run(reference, ids)
    checks = {}
    readback = read_back(path, src.layout.model.config)

    @torch.no_grad()
    def margin(i: int, k: int) -> float:
        top = reference(torch.tensor([ids[i] + ref_greedy[i][:k]])).logits[0, -1].float().topk(2).values
        return float(top[0] - top[1])
    checks["transformers"] = compare(ref_logits, ref_greedy, *run(readback, ids), margin)
    del readback
    if importlib.util.find_spec("llama_cpp") is not None:
        stop = eos_ids(reference.generation_config)
        checks["llama_cpp"] = compare(ref_logits, ref_greedy, *run_llama_cpp(path, ids, stop=stop), margin)
    limit_rel, limit_top1 = THRESHOLDS[dtype]
    passed = None if limit_rel is None else all(
        c["relative_error"] <= limit_rel and c["top1_agreement_pct"] >= limit_top1
        and c["greedy_prompts_matching"] + len(c["greedy_ties"]) == len(ids) for c in checks.values())
    return {"mode": "gguf", "checks": checks, "passed": passed, "prompts": len(ids),
            "thresholds": {"relative_error": limit_rel, "top1_agreement_pct": limit_top1}}


def prompt_ids(folder: Path, vocab_size: int) -> list[list[int]]:
    """The fixed prompts through the folder's tokenizer (and chat template, when it has one)."""
    from transformers import AutoTokenizer  # lazy: with the check only
    tok = AutoTokenizer.from_pretrained(str(folder))
    out = []
    for text in PROMPTS:
        if tok.chat_template:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tok.encode(text)
        out.append([i for i in ids if i < vocab_size])
    return out


@torch.no_grad()
def merged_model(src: MergedBase):
    """The merged model in fp32, its tensors re-read through the stream the file was written from."""
    config = src.layout.model.config
    model = model_class_for(config.to_dict())._from_config(config, dtype=torch.float32)
    layers = list(src.layers)                           # the second pass must not report its updates twice
    state = {}
    for group in src.layout.groups:
        state.update({k: v.float() for k, v in src.group_tensors(group).items()})
    src.layers[:] = layers
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def read_back(path: Path, config=None):
    """The GGUF file as transformers' GGUF loader makes a model of it (dequantized to fp32), quietly; with the rope
    parameters of `config` (the source's), which its reader does not read for these architectures (rope scaling:
    llama.cpp's check, where installed, runs the file's own)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils  # lazy: with the check only
    from transformers import AutoModelForCausalLM  # lazy: with the check only

    # its "Converting and de-quantizing GGUF tensors" bar is a plain tqdm that no transformers setting turns off
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        rope = {"rope_parameters": config.rope_parameters} if getattr(config, "rope_parameters", None) else {}
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                    **rope).eval()
    finally:
        gguf_utils.tqdm = bar


@torch.no_grad()
def run(model, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """(logits [n, vocab] per prompt, GREEDY_TOKENS greedy continuation per prompt) of a transformers model."""
    logits, greedy = [], []
    for ids in prompts:
        x = torch.tensor([ids])
        logits.append(model(x).logits[0].float())
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=_greedy_config())
        greedy.append(out[0, len(ids):].tolist())
    return logits, greedy


def _greedy_config():
    """Plain greedy decoding of GREEDY_TOKENS tokens, whatever sampling defaults generation_config.json sets."""
    from transformers import GenerationConfig  # lazy: with the check only
    return GenerationConfig(do_sample=False, max_new_tokens=GREEDY_TOKENS, pad_token_id=0)


def eos_ids(generation_config) -> set:
    """The token ids at which generate stops (generation_config.eos_token_id: one, a list, or none)."""
    eos = generation_config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos} - {None}


def run_llama_cpp(path: Path, prompts: list[list[int]], lora: Path | None = None, stop=()
                  ) -> tuple[list[torch.Tensor], list[list[int]]]:
    """The same through llama.cpp (llama-cpp-python): every position's logits, then greedy tokens, ending after a
    token in `stop` as generate ends at its EOS; `lora`: a LoRA GGUF llama.cpp applies at load (its --lora)."""
    import llama_cpp  # lazy: optional

    longest = max(len(p) for p in prompts) + GREEDY_TOKENS
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, longest), logits_all=True, verbose=False,
                          lora_path=None if lora is None else str(lora))
    logits, greedy = [], []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        logits.append(torch.tensor(llm.scores[:len(ids)]).float())
        seq = []
        for _ in range(GREEDY_TOKENS):
            nxt = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
            seq.append(nxt)
            if nxt in stop:
                break
            llm.eval([nxt])
        greedy.append(seq)
    return logits, greedy


def compare(ref_logits, ref_greedy, logits, greedy, margin=None) -> dict:
    """Relative error of all logits, top-1 agreement over all positions, greedy match of every prompt. A prompt
    whose greedy tokens part at a near-tie counts as a tie: `margin(i, k)`, the reference's top-1 minus top-2
    logit at token k of prompt i's continuation, within the largest |logit difference| measured on the prompts."""
    a, b = torch.cat(ref_logits), torch.cat(logits)
    worst = float((b - a).abs().max())
    ties = []
    for i, (x, y) in enumerate(zip(ref_greedy, greedy)):
        if x != y and margin is not None:
            k = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            m = margin(i, k) if k < len(x) else None
            if m is not None and m <= worst:
                ties.append({"prompt": i, "token": k, "reference_margin": m})
    return {"relative_error": float((b - a).norm() / a.norm().clamp_min(1e-30)),
            "max_abs_error": worst,
            "top1_agreement_pct": 100.0 * float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "greedy_match": ref_greedy == greedy,
            "greedy_prompts_matching": sum(x == y for x, y in zip(ref_greedy, greedy)),
            "greedy_ties": ties}


def summary_lines(v: dict) -> list[str]:
    """The check in a few lines for the terminal."""
    if not v:
        return []
    if v.get("mode") == "skipped":
        return [f"  verification skipped: {v['reason']}"]
    lines = []
    t = v["thresholds"]
    for reader, c in v["checks"].items():
        ties = "".join(f", prompt {t['prompt'] + 1} parts at token {t['token'] + 1}, a near-tie (the reference's "
                       f"top-2 margin {t['reference_margin']:.2g} <= max |logit difference| {c['max_abs_error']:.2g})"
                       for t in c.get("greedy_ties", ()) if v["passed"] is not None)
        lines.append(f"  read back by {reader}: logits relative error {c['relative_error']:.3g}, top-1 agreement "
                     f"{c['top1_agreement_pct']:.1f}%, greedy {GREEDY_TOKENS} tokens match on "
                     f"{c['greedy_prompts_matching']}/{v['prompts']} prompts{ties}")
    if v["passed"] is None:
        lines.append("  -> for information (no limit for this dtype)")
    else:
        lines.append(f"  -> {'PASS' if v['passed'] else 'FAIL'} (limits: relative <= {t['relative_error']:g}, "
                     f"agreement >= {t['top1_agreement_pct']:g}%, greedy tokens equal but at near-ties)")
    return lines


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
