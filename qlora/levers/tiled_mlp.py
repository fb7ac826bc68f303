"""The MLP computed in sequence tiles: the same result, one tile's [tile, intermediate] tensors at a time.

    import qlora
    from qlora.levers.tiled_mlp import tile_mlps
    tile_mlps(model, tile=1024, min_tokens=4096)     # every module named "mlp"; any token-wise module works

Why: in a Llama block the MLP is the largest activation. For N tokens it holds gate [N, I], up [N, I],
act(gate) [N, I] and their product [N, I] (I = 14,336 on Llama-3-8B: 4 x 2 bytes x 14,336 = 115 KB per
token in bf16, 9 GB at 78k tokens), plus what the LoRA layers inside save. With checkpointing these
exist once, during one block's recompute and backward, and at long context they are the step's peak.

How: a token-wise module (y[t] depends on x[t] only, true of every transformer MLP) is run tile by tile
under one autograd Function (`TiledForward`). Forward: each tile runs without autograd, so only the
output [N, H] and the input (saved) remain. Backward: each tile is recomputed with autograd and
differentiated at once; the tile's gradient for the input is written into [N, H] and the parameter
gradients (LoRA's A and B; full weights if they train) are summed over tiles. Peak: one tile's
intermediates in place of N tokens' (x tile / N), for one extra MLP forward per step (the recompute;
under checkpointing that is a second one). Random state (dropout inside the MLP) is saved before the
forward and replayed tile by tile in backward, so the masks are the same as in forward.

Generic: nothing here knows an architecture. The module's own `forward` is called on [.., tile, H]
slices of the flattened tokens (kept 3-D: [1, tile, H]); only its name is needed to find it. Modules
are patched in place (an instance `forward`), so parameter names and saved adapters do not change.
Off by default (`qlora train` does not tile): it pays only when the MLP's intermediates are the peak,
i.e. at long context; below `min_tokens` tokens a call runs the module as is.
"""
from __future__ import annotations

import torch
from torch import nn

from qlora.errors import QLoRAError
from qlora.lora.inject import find_modules
from qlora.util.checks import must_be_int


def _rng_devices(x: torch.Tensor) -> list:
    return [x.device] if x.device.type == "cuda" else []


class NotOneTensor(Exception):
    """The module returned something else than one tensor (a MoE block that also returns its router's
    scores, e.g. gpt-oss): it is not tiled, it runs as it is."""


class TiledForward(torch.autograd.Function):
    """y = fn(x) over x's tokens in tiles of `tile`; x [..., N', H] -> y [..., N', H_out]."""

    @staticmethod
    def forward(ctx, fn, tile: int, visit, x: torch.Tensor, *params):
        # visit: None, or only the first `visit` tiles (a memory trace: each tile's tensors die before
        # the next one's are made, so one or two tiles have the whole loop's peak)
        ctx.fn, ctx.tile, ctx.params = fn, tile, params     # params: leaves (LoRA A/B), safe to hold on ctx
        ctx.visit = visit
        ctx.rng_cpu = torch.get_rng_state()
        ctx.rng_cuda = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
        kind = x.device.type         # autocast is off in backward: the recompute must run under the forward's
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.save_for_backward(x)
        flat = x.reshape(1, -1, x.shape[-1])                           # [1, N, H]
        out = None     # [..., N', H_out], returned as it is: a view of it would be one the caller
        with torch.no_grad():   # may not modify in place (Falcon adds the attention output into it)
            for start in range(0, flat.shape[1], tile)[:visit]:
                y = fn(flat[:, start:start + tile])                   # [1, t, H_out]: one tile's intermediates
                if not isinstance(y, torch.Tensor):
                    raise NotOneTensor(type(y).__name__)
                if out is None:
                    out = y.new_empty((*x.shape[:-1], y.shape[-1]))
                out.view(1, -1, y.shape[-1])[:, start:start + y.shape[1]] = y
                del y
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        params = list(ctx.params)
        need_x = ctx.needs_input_grad[3]
        flat = x.reshape(1, -1, x.shape[-1]).detach()
        g = grad_out.reshape(1, -1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if need_x else None
        grad_p = [None] * len(params)
        kind, enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=_rng_devices(x)), torch.autocast(kind, dtype=dtype, enabled=enabled):
            torch.set_rng_state(ctx.rng_cpu)                  # replay the forward's random draws, tile by tile
            if ctx.rng_cuda is not None:
                torch.cuda.set_rng_state(ctx.rng_cuda, x.device)
            for start in range(0, flat.shape[1], ctx.tile)[:ctx.visit]:
                xt = flat[:, start:start + ctx.tile].requires_grad_(need_x)
                with torch.enable_grad():
                    yt = ctx.fn(xt)
                inputs = ([xt] if need_x else []) + params
                if not inputs or not yt.requires_grad:
                    continue
                grads = torch.autograd.grad(yt, inputs, g[:, start:start + yt.shape[1]], allow_unused=True)
                if need_x:
                    grad_x[:, start:start + yt.shape[1]] = grads[0]
                    grads = grads[1:]
                for k, gp in enumerate(grads):
                    if gp is not None:
                        grad_p[k] = gp if grad_p[k] is None else grad_p[k].add_(gp)
                del yt, grads
        grad_x = grad_x.reshape(x.shape) if need_x else None
        return (None, None, None, grad_x, *grad_p)


class TiledMLP:
    """An MLP module's replacement ``forward`` (an instance attribute): tiles when the input has more
    than ``min_tokens`` tokens and autograd is recording, else runs the module's own forward."""

    def __init__(self, module: nn.Module, tile: int, min_tokens: int):
        self.module, self.tile, self.min_tokens = module, tile, min_tokens
        self.not_tileable = False     # its forward returned more than one tensor: run as it is
        self.visit = None
        """None; or a memory trace's shortcut: only the first `visit` tiles are computed (wrong values,
        the same peak). qlora.plan sets it on the fake models it traces, never on a model that trains."""

    def _forward(self, x):
        return type(self.module).forward(self.module, x)

    def __call__(self, x, *args, **kwargs):
        tokens = x.numel() // x.shape[-1] if x.dim() else 0
        if args or kwargs or tokens <= max(self.min_tokens, self.tile) or not torch.is_grad_enabled() \
                or self.not_tileable:
            return type(self.module).forward(self.module, x, *args, **kwargs)
        # the trainable parameters go in as inputs, so autograd asks this Function for their gradients
        params = [p for p in self.module.parameters() if p.requires_grad]
        try:
            return TiledForward.apply(self._forward, self.tile, self.visit, x, *params)
        except NotOneTensor:
            self.not_tileable = True
            return type(self.module).forward(self.module, x, *args, **kwargs)


def tile_mlps(model: nn.Module, *, tile: int = 1024, min_tokens: int = 4096,
              names: tuple[str, ...] = ("mlp",)) -> list[str]:
    """Run every module whose path ends in one of ``names`` in tiles of ``tile`` tokens once its input
    has more than ``min_tokens`` tokens. Returns the patched module paths. Idempotent (re-tiling
    updates the sizes); :func:`untile_mlps` undoes it. The modules must be token-wise (one tensor in,
    one out, each token on its own): every transformer MLP / feed-forward is."""
    for key, value, minimum in (("tile", tile, 1), ("min_tokens", min_tokens, 0)):
        need = must_be_int(value, minimum)
        if need is not None:
            raise QLoRAError(f"tile_mlps: {key}={value!r} must be {need}")
    found = find_modules(model, list(names), "tile_mlps name")
    for path, module in found.items():
        current = module.__dict__.get("forward")
        if isinstance(current, TiledMLP):
            current.tile, current.min_tokens = tile, min_tokens
            continue
        if current is not None:
            raise QLoRAError(f"tile_mlps: {path} already has a patched forward ({current!r}); cannot tile it")
        module.forward = TiledMLP(module, tile, min_tokens)
    return list(found)


def untile_mlps(model: nn.Module) -> nn.Module:
    """Undo :func:`tile_mlps`; returns ``model``."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), TiledMLP):
            del module.__dict__["forward"]
    return model
