"""Plan a training run's memory from a config.json alone: the model `qlora train` would build, traced on
fake tensors (memprofile.trace), no weights and no device.

    settings.py  RunSettings (qlora train's defaults)   build.py  the model, batch, loss, optimizer of a traced step
    planner.py   Planner: estimate / largest_batch / longest_seq      pool.py  forked workers, imports before the fork
    table.py     plan(): the rows, the recommendation, FSDP, levers  text.py  the plan as the CLI prints it
    sweep.py     measured vs predicted over configurations (qlora profile)
    images.py    an image-text model's images in a step: the processor's tensors, the model's token count
    grpo.py      a GRPO step: generation through the model's own KV cache, then training on its rows
"""
from qlora.plan.build import (
                              apply_levers,
                              build,
                              first_blocks,
                              layer_period,
                              load_config,
                              loss_fn,
                              make_batch,
                              measured_optimizer,
                              num_layers,
                              with_layers,
)
from qlora.plan.planner import Planner, fewest_checkpointed_blocks
from qlora.plan.settings import LOSSES, TASKS, RunSettings
from qlora.plan.table import fsdp_per_rank, option, plan, recommend
from qlora.plan.text import LEVERS, format_levers, format_plan

__all__ = ["LEVERS", "LOSSES", "Planner", "RunSettings", "TASKS", "apply_levers", "build", "first_blocks", "loss_fn",
           "measured_optimizer", "fewest_checkpointed_blocks",
           "format_levers", "format_plan", "fsdp_per_rank", "layer_period", "load_config", "make_batch",
           "num_layers", "option", "plan", "recommend", "with_layers"]
