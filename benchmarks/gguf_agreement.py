"""How closely each GGUF export of a fine-tuned model agrees with the merged model, in transformers and llama.cpp.

    qlora train sft out_dir=runs/sft                                   # the default SFT run (SmolLM2, ~80 s on CPU)
    python benchmarks/gguf_agreement.py --adapter runs/sft/adapter [--base smollm2] [--out runs/gguf-bench]

For each --dtype (f16, bf16, q8_0 and, with llama-cpp-python, q4_k_m, q5_k_m, q6_k): `qlora.export_gguf` of base +
adapter, verified as the export verifies it (qlora/export/gguf_verify.py: the merged model in fp32 on three chat
prompts; read back by transformers' GGUF loader and run by llama.cpp): relative logit error, top-1 agreement,
greedy tokens. Then the adapter alone as a LoRA GGUF applied by llama.cpp to the f16 base GGUF, against PEFT's
merge of the adapter into the plain base (what llama.cpp's --lora computes): greedy tokens and top-1 agreement.
Prints a markdown table; writes results.json to --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

DTYPES = ("f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")


def lora_row(base: Path, adapter: Path, folder: Path) -> dict:
    """The LoRA GGUF on the f16 base GGUF in llama.cpp vs PEFT's merge into the plain base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora.export.gguf import export_gguf
    from qlora.export.gguf_lora import export_lora_gguf
    from qlora.export.gguf_verify import GREEDY_TOKENS, compare, eos_ids, prompt_ids, run, run_llama_cpp
    export_gguf(base, None, folder / "base-f16.gguf", dtype="f16", verify=False, modelfile=False, progress=False)
    export_lora_gguf(base, adapter, folder / "adapter.gguf")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    ids = prompt_ids(base, merged.config.vocab_size)
    c = compare(*run(merged, ids), *run_llama_cpp(folder / "base-f16.gguf", ids, lora=folder / "adapter.gguf",
                                                  stop=eos_ids(merged.generation_config)))
    return {"dtype": "LoRA GGUF on the f16 base GGUF (llama.cpp) vs PEFT's merge", "size": (folder / "adapter.gguf")
            .stat().st_size, "checks": {"llama_cpp": c}, "prompts": len(ids), "greedy_tokens": GREEDY_TOKENS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="a qlora / PEFT adapter folder trained on --base")
    ap.add_argument("--base", default="smollm2", help="the base model folder or a bundled name (default smollm2)")
    ap.add_argument("--out", default="runs/gguf-bench", help="where results.json goes")
    args = ap.parse_args(argv)
    from qlora.bundled import resolve_model
    from qlora.export.gguf import export_gguf
    base, adapter = Path(resolve_model(args.base)), Path(args.adapter)
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in DTYPES if have_llama else DTYPES[:3]:
            start = time.perf_counter()
            r = export_gguf(base, adapter, Path(tmp) / f"m-{dtype}.gguf", dtype=dtype, modelfile=False, progress=False)
            v = r.verification
            rows.append({"dtype": dtype, "size": r.out.stat().st_size, "checks": v["checks"], "passed": v["passed"],
                         "prompts": v["prompts"], "seconds": time.perf_counter() - start})
            r.out.unlink()
        if have_llama:
            rows.append(lora_row(base, adapter, Path(tmp)))
    print("| file | size | reader | logits relative error | top-1 agreement | greedy tokens (prompts) | check |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for reader, c in r["checks"].items():
            ties = f" + {len(c['greedy_ties'])} near-tie" if c.get("greedy_ties") and r.get("passed") is not None else ""
            check = {True: "PASS", False: "FAIL", None: "for information"}[r.get("passed")]
            print(f"| {r['dtype']} | {r['size'] / 2**20:.1f} MiB | {reader} | {c['relative_error']:.3g} | "
                  f"{c['top1_agreement_pct']:.1f}% | {c['greedy_prompts_matching']}/{r['prompts']}{ties} | {check} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
