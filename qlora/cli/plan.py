"""qlora plan: what fits in a memory budget, from a config.json alone (no weights)."""
from __future__ import annotations

from pathlib import Path

from qlora.bundled import resolve_model
from qlora.cli import args
from qlora.cli.args import run_settings


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="what fits in a memory budget, from a config.json alone (no weights)")
    p.add_argument("--model", required=True, type=args.model, help="config.json, model folder, or a bundled name")
    p.add_argument("--memory", required=True, type=args.size, help="memory budget per device, e.g. 24GiB, 80GB, 512MiB")
    p.add_argument("--seq", type=args.positive_int, default=2048,
                      help="sequence length (image side for image-cls; completion length for grpo; default 2048)")
    p.add_argument("--effective-batch", type=args.positive_int, default=16, help="examples per optimizer step (default 16)")
    p.add_argument("--rank", type=args.positive_int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--task", default="causal-lm",
                   help="causal-lm | seq-cls | image-cls | dpo (preference pairs: --effective-batch counts pairs) | "
                        "grpo (online RL: --effective-batch counts prompts, --seq is the completion length)")
    p.add_argument("--mode", default="qlora", help="the mode to recommend for: full | head | lora | qlora")
    p.add_argument("--configs", default="full,lora,lora-ckpt,qlora,qlora-ckpt", help="configurations to tabulate")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                      help="cuda | cpu: the device the run will use (default cuda)")
    p.add_argument("--levers", action="store_true",
                      help="also the longest context at batch 1 with each long-context lever (activation offload, "
                           "tiled MLP, both): three more length searches")
    p.add_argument("--world-size", type=args.positive_int, default=1,
                      help="FSDP ranks: per-rank bytes by formula (default 1)")
    p.add_argument("--images", type=args.nonnegative_int, default=0,
                   help="images per sequence of an image-text model (default 0: text only); their tokens are part "
                        "of --seq")
    p.add_argument("--image-size", type=args.positive_int, default=None,
                   help="image side in pixels (default: the vision config's image_size, or 448)")
    p.add_argument("--num-generations", type=args.positive_int, default=8,
                   help="grpo: completions sampled per prompt (default 8, TRL's)")
    p.add_argument("--prompt-length", type=args.positive_int, default=512,
                   help="grpo: tokens per prompt (default 512, TRL's max_prompt_length)")
    p.add_argument("--beta", type=float, default=0.0,
                   help="grpo: KL weight; > 0 adds the reference pass (default 0, TRL's)")
    args.run_options(p)
    p.set_defaults(func=run)



def run(args) -> int:
    from qlora.plan import LEVERS, format_levers, format_plan, plan  # lazy: qlora --help imports no torch
    model = args.model
    if not (model.endswith(".json") or Path(model).is_dir()):
        model = resolve_model(model)
    settings = run_settings(args, device=args.device, lora_r=args.rank, mode=args.mode, images=args.images,
                            image_size=args.image_size, num_generations=args.num_generations,
                            prompt_length=args.prompt_length, beta=args.beta)
    levers = LEVERS if args.levers and settings.task in ("causal-lm", "dpo") else None
    result = plan(model, args.memory, settings, seq=args.seq, effective_batch=args.effective_batch,
                  configurations=[c.strip() for c in args.configs.split(",")], world_size=args.world_size,
                  levers=levers)
    print(format_plan(result))
    if levers:
        print()
        print(format_levers(result["levers"], args.memory))
    return 0
