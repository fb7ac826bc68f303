"""The plan as text: the configuration table, the FSDP rows, the recommendation, the lever table."""
from __future__ import annotations

from memprofile.composition import describe
from memprofile.units import human
from qlora.plan.settings import RunSettings
from qlora.util.dtypes import dtype_name

LEVERS = {"defaults": {}, "offload": {"offload_activations": True}, "tiled MLP": {"mlp_tile": 1024},
          "offload + tiled MLP": {"offload_activations": True, "mlp_tile": 1024}}
"""The long-context levers `qlora plan --levers` tabulates (none is on in qlora train's defaults; the
MLP tiles are tile_mlps' defaults: 1,024 tokens, above 4,096)."""


def format_levers(rows: list[dict], budget: int) -> str:
    """The lever rows as a markdown table: longest context at batch 1 and its breakdown."""
    lines = [f"longest context at batch 1 within {human(budget)}, per long-context lever (checkpointing on; "
             "qlora train's defaults use none of these levers):", "",
             "| levers | longest seq | peak | weights | grads + optimizer | activations (on device) | host (offloaded) "
             "| peak at |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["bytes"]
        if b is None:
            lines.append(f"| {r['lever']} | does not fit | | | | | | |")
            continue
        w = b["weights_quantized"] + b["weights_frozen"] + b["weights_trainable"]
        lines.append(f"| {r['lever']} | {r['longest_seq']} | {human(b['peak'])} | {human(w)} | "
                     f"{human(b['gradients'] + b['optimizer'])} | {human(b['activations'])} | {human(r['host'])} | "
                     f"{r['peak_at']} |")
    return "\n".join(lines)


def format_plan(result: dict) -> str:
    """The plan as the CLI prints it: assumptions, one table row per configuration, the advice."""
    s: RunSettings = result["assumed"]
    lines = [f"{result['model_type']}: budget {human(result['budget'])} per device, seq {result['seq']}, "
             f"{s.device}; predicted by tracing the model on fake tensors "
             f"({result['seconds']:.1f} s)",
             f"assumed (qlora train's defaults unless given): {s.describe().split(': ', 1)[1]}"]
    if result.get("note"):
        lines.append(result["note"])
    if s.task == "grpo":
        lines.append(f"grpo: a batch counts prompts, each with {s.num_generations} completions (batch x "
                     f"{s.num_generations} rows); seq is the completion length, after prompts of {s.prompt_length} "
                     "tokens; the peak is the larger of generation (the KV cache of every row) and the training step")
    if result["moe"]:
        lines.append("mixture of experts: the routed rows (tokens x top_k) are the same for any routing; "
                     "lora/qlora run the experts as qlora's grouped matmuls, dequantizing a layer's matrix at once "
                     "(groups of experts above 1 GiB), the same bytes for any routing; full fine-tuning uses "
                     "transformers' grouped_mm")
    lines += ["", "| configuration | peak at batch 1 | largest batch at seq | longest seq at batch 1 | "
                  "weights | grads + optimizer | activations (batch 1) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        b = r["bytes"]
        w = b["weights_quantized"] + b["weights_frozen"] + b["weights_trainable"]
        longest = "-" if r["longest_seq"] is None else (str(r["longest_seq"]) if r["longest_seq"] else "does not fit")
        lines.append(f"| {r['configuration']} | {human(r['peak_batch1'])} | "
                     f"{r['largest_batch'] or 'does not fit'} | {longest} | {human(w)} | "
                     f"{human(b['gradients'] + b['optimizer'])} | {human(b['activations'])} |")
    lines += _tower_lines(result)
    if result["world_size"] > 1:
        n = result["world_size"]
        lines += ["", f"FSDP over {n} ranks (a formula, not a trace: weights, gradients and optimizer state / {n}, "
                      "+ the largest block's unsharded parameters all-gathered, activations unchanged):", "",
                  "| configuration | per-rank peak at batch 1 | sharded state | all-gather buffer |", "|---|---|---|---|"]
        for r in result["rows"]:
            f = r["fsdp"]
            state = sum(f[k] for k in ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer"))
            lines.append(f"| {r['configuration']} | {human(f['peak'])} | {human(state)} | {human(f['all_gather'])} |")
    lines += ["", f"what is live at the peak of batch 1 (seq {result['seq']}), by category (they add up to the peak):"]
    lines += [f"  {r['configuration']}: {describe(r['at_peak'], r['peak_phase'], r['temporary_parts'])}"
              for r in result["rows"] if r.get("at_peak")]
    rec = result["recommendation"]
    lines.append("")
    if rec is None:
        lines.append(f"recommendation: {s.mode} does not fit in {human(result['budget'])} at seq {result['seq']}, "
                     "even at batch 1 with checkpointing; shorten --seq or use more memory")
    else:
        eff = rec["micro_batch"] * rec["grad_accum"]
        lines.append(f"recommendation for {s.mode} (effective batch {result['effective_batch']}): "
                     f"train.batch_size={rec['micro_batch']} train.grad_accum={rec['grad_accum']} "
                     f"gradient_checkpointing={'true' if rec['checkpointing'] else 'false'} "
                     f"(predicted peak {human(rec['peak'])}"
                     + (f"; {eff} examples per step" if eff != result["effective_batch"] else "") + ")")
    return "\n".join(lines)


def _tower_lines(result: dict) -> list[str]:
    """An image-text model's towers (weights; with images, what the images add at batch 1) as their own table."""
    rows, s = result["rows"], result["assumed"]
    if not any(r.get("towers") for r in rows):
        return []
    side = s.image_size or result["image_size"]
    images = (f"{s.images} image(s) of {side}x{side} px per sequence, {rows[0]['images']['tokens']} tokens each "
              f"(part of seq {result['seq']}); " if s.images else "text only (--images 0); ")
    lines = ["", f"image-text model: {images}the towers (vision / audio encoder, projector) stay in "
                 f"{dtype_name(s.dtype)}, frozen, no LoRA under all-linear; their weights are part of the weights "
                 "above; what the images cost is the step with them minus the same step on text tokens only:", "",
             "| configuration | towers' weights | activations: images - text (batch 1) | peak: images - text (batch 1) |",
             "|---|---|---|---|"]
    for r in rows:
        i = r.get("images")
        lines.append(f"| {r['configuration']} | {human(r['towers'])} | {human(i['activations']) if i else '-'} | "
                     f"{human(i['peak']) if i else '-'} |")
    return lines
