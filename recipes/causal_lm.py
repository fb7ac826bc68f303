"""What the causal-LM recipes (sft, dpo) share: their common config keys, the data sources, the model build,
greedy samples, the first step's memory line and the end of a run (the curve from the untrained model, the
summary, the merged export).

    cfg = SFTConfig(...)                                   # an LMRecipeConfig plus the recipe's own keys
    rows, eval_rows = read_splits(cfg, bundled={"wordnet": wordnet_chat_files})
    path, tokenizer, pad_id = load_tokenizer(cfg)
    model = build_model(cfg, path)                         # qlora | lora | full, the memory savers on
    texts = greedy(model, tokenizer, [prompt_ids, ...], max_new_tokens=64, pad_id=pad_id)
    summary = finish(cfg, model, tokenizer, result, before, summary, t0)
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

import qlora
from memprofile.composition import describe
from memprofile.units import human
from qlora.arch.loading import from_pretrained_quietly
from qlora.arch.loading import load_tokenizer as load_tokenizer_of
from qlora.arch.multimodal import checkpoint_class
from qlora.bundled import resolve_model
from qlora.data.images import collate_inputs
from qlora.data.rows import read_splits as read_data_splits
from qlora.errors import QLoRAError, RecipeFailed
from qlora.export.gguf import check_gguf_dtype
from qlora.levers.checkpointing import prepare_for_training
from qlora.levers.modes import build_for_mode
from qlora.levers.tiled_mlp import tile_mlps
from qlora.lora.config import LoraConfig
from qlora.objectives.rollout import left_padded
from qlora.train.loop import TrainConfig, check_earlier_run, plot_curves, read_metrics
from qlora.util.checks import check_bools, check_ints, check_numbers
from qlora.util.dist import is_main_process
from qlora_recipes.config import RecipeConfig
from qlora_recipes.four_modes import export_gguf_verified, export_verified
from qlora_recipes.image_chat_default import build_default_model

MODES = ("qlora", "lora", "full")


@dataclass
class LMRecipeConfig(RecipeConfig):
    """The keys of every recipe (recipes/config.py) and those every causal-LM recipe shares below."""
    model: str = "smollm2"
    """A model folder, a bundled name (smollm2) or a Hub id; any transformers causal LM."""
    data: str = "wordnet"
    """Training data: a file (.jsonl/.json/.csv/.parquet), a folder of them, a Hub data set name, or
    `wordnet` (the recipe's bundled WordNet set)."""
    eval_data: Optional[str] = None
    """Evaluation data: a file/folder, or a split name of the Hub data set. None: eval_fraction of data
    (for data=wordnet: its own eval split, whose words are unseen in training)."""
    eval_fraction: float = 0.05
    """Share of the rows held out (seeded) for evaluation when eval_data is None; 0: no evaluation."""
    split: str = "train"
    """The split of a Hub data set to train on."""
    max_length: int = 512
    """Tokens per sequence (prompt + response); longer ones are cut (counted)."""
    eval_size: Optional[int] = 256
    """Evaluation rows used (seeded subset); None: all."""
    mode: str = "qlora"
    """qlora (NF4 base + LoRA) | lora (float base + LoRA) | full (every weight trains)."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer in backward (non-reentrant) instead of keeping its activations."""
    loss_chunk_size: int = 256
    """Tokens per chunk of the chunked head (peak: 4 x chunk x vocab bytes of fp32 logits)."""
    upcast_norms: bool = False
    """Cast norms, embeddings and the head to fp32 (PEFT's habit; costs memory)."""
    mlp_tile: int = 0
    """Long context: the MLPs in sequence tiles of this many tokens (qlora.levers.tiled_mlp; same result, one
    tile's [tile, intermediate] tensors at a time, one more MLP forward per step); 0: off."""
    mlp_tile_min_tokens: int = 4096
    """With mlp_tile: only inputs of more than this many tokens are tiled."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05,
                                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    """Adapter settings (modes lora and qlora)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4, batch_size=8))
    """The loop: epochs, max_steps, batch_size, lr, optimizer, eval_every, save_every, offload_activations..."""
    eval_batch_size: int = 8
    """Examples per evaluation forward pass."""
    samples: int = 3
    """Greedy generation samples per evaluation (prompt, reference, generated)."""
    max_new_tokens: int = 64
    """Tokens generated per sample."""
    export: bool = False
    """After training: merge the adapter into a plain model folder out_dir/merged, verified."""
    export_dtype: str = "bfloat16"
    """dtype of the merged export: bfloat16 | float16 | float32; with export_format=gguf f16 | bf16 | q8_0 |
    q4_k_m | q5_k_m | q6_k (bfloat16 = bf16; K-quants need llama-cpp-python)."""
    export_format: str = "folder"
    """folder: the merged model folder out_dir/merged; gguf: also out_dir/model.gguf (+ model.Modelfile), verified."""
    out_dir: str = "runs/lm"
    """Where everything goes (train.out_dir follows it)."""

    modes = MODES

    def __post_init__(self):
        super().__post_init__()
        check_ints(self, ("max_length", "loss_chunk_size", "eval_batch_size", "max_new_tokens"))
        check_ints(self, ("mlp_tile", "mlp_tile_min_tokens", "samples"), minimum=0)
        check_ints(self, ("eval_size",), null="")
        check_numbers(self, ("eval_fraction",), at_least=0, below=1)
        check_bools(self, ("gradient_checkpointing", "upcast_norms", "export"))
        if self.export_format not in ("folder", "gguf"):
            raise QLoRAError(f"export_format={self.export_format!r}: use folder or gguf")
        if self.export and self.export_format == "gguf":
            self.export_dtype = check_gguf_dtype(self.export_dtype)    # a K-quant without llama_cpp: before training
        if not isinstance(self.data, str) or not self.data.strip():
            raise QLoRAError("data= is empty: give a file, a folder, a Hub data set or wordnet")

    def head_words(self) -> str:
        """How the LM head runs, in words (the recipe's own)."""
        return f"chunked head ({self.loss_chunk_size} tokens)"

    def savers(self) -> str:
        """The memory savers of this run, in words (the first-step memory line)."""
        return ", ".join([
            "NF4 base + double quant" if self.mode == "qlora" else f"{self.mode} (no 4-bit base)",
            f"gradient checkpointing {'on (non-reentrant)' if self.gradient_checkpointing else 'OFF'}",
            self.head_words(),
            "fp32 up-casts ON" if self.upcast_norms else "no fp32 up-casts",
            f"optimizer {self.train.optimizer}",
            f"activation offload {'on' if self.train.offload_activations else 'off'}"]
            + ([f"MLP in {self.mlp_tile}-token tiles above {self.mlp_tile_min_tokens} tokens"] if self.mlp_tile else []))


def read_splits(cfg: LMRecipeConfig, bundled: dict[str, Callable]) -> tuple[list, list]:
    """(training rows, evaluation rows) of cfg.data / eval_data / eval_fraction, seeded subsets (qlora.data.rows).
    `bundled` maps a data name (wordnet) to a function returning its (train file, eval file)."""
    data, eval_data = cfg.data, cfg.eval_data
    if data in bundled:
        train_file, eval_file = bundled[data]()
        data, eval_data = str(train_file), eval_data or str(eval_file)
    return read_data_splits(data, eval_data, split=cfg.split, eval_fraction=cfg.eval_fraction, seed=cfg.train.seed,
                            train_size=cfg.train_size, eval_size=cfg.eval_size)


BUILT_MODELS = {"fmnist-llava": build_default_model}
"""Models the recipes build offline by name (recipes/image_chat_default.py): `model=fmnist-llava`."""


def load_tokenizer(cfg: LMRecipeConfig):
    """(model path, tokenizer, pad id: the pad token, else EOS)."""
    path = str(BUILT_MODELS[cfg.model]()) if cfg.model in BUILT_MODELS else resolve_model(cfg.model)
    return (path, *load_tokenizer_of(path))


def build_model(cfg: LMRecipeConfig, path: str):
    """The model of `mode` with the memory savers of `cfg` on; prints its trainable share and savers."""
    torch.manual_seed(cfg.train.seed)                  # the adapters' initialisation
    dtype = cfg.resolved_compute_dtype()
    lora = dataclasses.replace(cfg.lora, dtype=cfg.lora.dtype or (dtype if cfg.mode == "qlora" else None))
    cls = checkpoint_class(path)                       # a causal LM, or an image-text model's own class
    model = build_for_mode(cfg.mode, load_float=lambda: from_pretrained_quietly(cls, path, dtype=dtype),
                           load_4bit=lambda: qlora.load_4bit(path, cls, compute_dtype=dtype), lora=lora)
    model = prepare_for_training(model, checkpointing=cfg.gradient_checkpointing, upcast_norms=cfg.upcast_norms)
    if cfg.mlp_tile:
        tile_mlps(model, tile=cfg.mlp_tile, min_tokens=cfg.mlp_tile_min_tokens)
    trainable, total = qlora.count_parameters(model)
    print(f"{cfg.model} · {cfg.mode}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.3f}%); savers: {cfg.savers()}")
    return model


def greedy(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int,
           inputs: Optional[list[dict]] = None) -> list[str]:
    """Greedy continuations of token-id prompts, in one batched generate with the prompts left-padded: each
    new token costs one pass over the weights (on a CPU, dequantizing every 4-bit layer), so all share it.
    `inputs`: per prompt, {"input_ids": the prompt, "pictures": its qlora.data.images.Pictures or None}."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, pad_id)
    width = ids.shape[1]
    media = {k: v.to(device) for k, v in collate_inputs(inputs or [], width, left=True).items()}
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **media, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(new, skip_special_tokens=True) for new in out[:, width:]]


def shown_question(prompt: str) -> str:
    """The last line of a rendered prompt that is not a chat marker nor a bare cue like "A:" (what a sample in the
    log shows)."""
    lines = [line.strip() for line in re.sub(r"<\|[^|>]*\|>", "\n", prompt).splitlines()]
    lines = [line for line in lines if len(line) > 3 and line not in ("user", "assistant", "system")]
    return lines[-1] if lines else prompt


def clear_samples(cfg: LMRecipeConfig) -> None:
    """samples.jsonl holds this run's samples only (a resumed run's continue the file). An out_dir holding an
    earlier run is refused first (qlora.train.loop.check_earlier_run): nothing of it is removed unasked."""
    check_earlier_run(Path(cfg.out_dir), cfg.train)
    if is_main_process() and not cfg.train.resume:
        (Path(cfg.out_dir) / "samples.jsonl").unlink(missing_ok=True)


def append_samples(cfg: LMRecipeConfig, samples: list[dict]) -> None:
    if not is_main_process():
        return
    path = Path(cfg.out_dir) / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)


def memory_line(cfg: LMRecipeConfig, result) -> str:
    """The first step's peak, what is live at it by category (train()'s account) and the savers of the run."""
    at_peak = (f"\n  {describe(result.first_step_at_peak, result.first_step_peak_phase, result.first_step_temporary_parts)}"
               if result.first_step_at_peak else "")
    return (f"first step: peak {human(result.first_step_peak_bytes, digits=1)} ({result.peak_method}); "
            f"savers: {cfg.savers()}{at_peak}")


def report_first_step(cfg: LMRecipeConfig) -> Callable:
    """train()'s on_first_step: the first step's memory line, printed when that step is done."""
    return lambda result: tqdm.write(memory_line(cfg, result))


def evaluate_before(evaluate, model) -> Optional[dict]:
    """The untrained model's evaluation (None without eval data)."""
    if evaluate is None:
        return None
    print("before training:")
    model.eval()
    with torch.no_grad():
        before = evaluate(model)
    model.train()
    return before


def finish(cfg: LMRecipeConfig, model, tokenizer, result, before: Optional[dict], summary: dict, t0: float) -> dict:
    """After train(): the memory line, the curve from the untrained model, the full model (mode=full), the
    verified merged export (export=true), summary.json. A failed export verification raises RecipeFailed."""
    out = Path(cfg.out_dir)
    print(memory_line(cfg, result))
    main = is_main_process()
    if before is not None and main:      # the curve starts from the untrained model (train() began a fresh log)
        rows = [{"step": 0, **{f"eval_{k}": v for k, v in before.items()}}, *read_metrics(out / "metrics.jsonl")]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    if cfg.mode == "full" and main:
        model.save_pretrained(str(out / "model"))
        tokenizer.save_pretrained(str(out / "model"))
    # lora / qlora: train() wrote the final adapter to out_dir/adapter (gathered under FSDP)
    trainable, total = qlora.count_parameters(model)
    summary = {"model": cfg.model, "mode": cfg.mode, "data": cfg.data, "steps": result.steps,
               "trainable_params": trainable, "total_params": total, "savers": cfg.savers(),
               "first_step_peak_bytes": result.first_step_peak_bytes, "peak_method": result.peak_method,
               "mean_step_seconds": result.mean_step_seconds, "eval_before": before,
               "eval_after": result.evals[-1][1] if result.evals else None, **summary, "wall_seconds": None}
    failure = None
    if cfg.export and main:
        if cfg.mode == "full":
            print("export: mode=full has no adapter to merge; the trained model is in out_dir/model")
        else:
            gguf = cfg.export_format == "gguf"
            dtype = ("float16" if cfg.export_dtype == "f16" else "bfloat16") if gguf else cfg.export_dtype
            export = export_verified(model, out / "merged", dtype=dtype, tokenizer=tokenizer)
            summary["export"] = {"out": str(export.out), "verification": export.verification}
            failure = None if export.verification.get("passed") is not False else export
            if gguf and failure is None:       # the GGUF file from the verified merged folder
                export = export_gguf_verified(out / "merged", out / "model.gguf", cfg.export_dtype)
                summary["export_gguf"] = {"out": str(export.out), "verification": export.verification}
                failure = None if export.verification.get("passed") is not False else export
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done in {summary['wall_seconds']:.0f} s: {out}/adapter (or model/), metrics.jsonl, curves.png, "
          "samples.jsonl, summary.json")
    if failure is not None:
        raise RecipeFailed(f"the merged export in {failure.out} failed its verification (it differs from the "
                           "trained model more than the limits allow)")
    return summary
