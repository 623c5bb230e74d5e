"""torch.compile with a way out, and gradient checkpointing of a network's blocks.

`compiled(fn)` is `fn` through `torch.compile(fullgraph=True, dynamic=False)`: one graph per call
signature, never a silent graph break. Where compiling fails (an operation dynamo cannot trace, a
backend that is missing), the first call warns once, naming the reason, and `fn` runs eagerly from
then on. A failure of `fn` itself is raised as it would be without compiling.

einops' operations enter the graph as single calls (`allow_in_graph`). Dynamo could trace through
them (torch 2.8 and later do by default), but it then re-parses every pattern symbolically at every
call site: on the tiny Unet that was about 9,000 of the 11,000 functions dynamo inlined, and the trace
took 1.7-3x longer (benchmarks/compile_time.py). In the graph they are still traced once by AOT
autograd (aot_eager, inductor), at the cost of running einops' cached recipe.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def einops_in_graph() -> None:
    """Put einops' operations into dynamo's graphs as single calls (see the module doc). Idempotent."""
    import einops
    from torch._dynamo import allow_in_graph

    for op in (einops.rearrange, einops.reduce, einops.repeat, einops.einsum, einops.pack, einops.unpack):
        allow_in_graph(op)


def compiled(fn, *, name: str, mode: str = "default", backend: str = "inductor"):
    """`fn` compiled as one graph; on a compile failure, a warning and `fn` itself (see the module doc)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    einops_in_graph()
    options = {} if backend != "inductor" else {"mode": mode}
    graph = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, **options)
    state = {"call": graph, "proven": False}

    def call(*args, **kwargs):
        if state["proven"]:
            return state["call"](*args, **kwargs)
        try:
            out = state["call"](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compile failure falls back; fn's own errors recur below
            if state["call"] is fn:
                raise
            logger.warning("torch.compile of %s failed (%s: %s); it runs eagerly instead",
                           name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            state["call"] = fn
            return fn(*args, **kwargs)
        state["proven"] = True
        return out

    call.__wrapped__, call.compiled_graph = fn, graph
    return call


def checkpoint_blocks(net: nn.Module, block_types: tuple[type, ...] | None = None) -> int:
    """Recompute the activations of every block of `block_types` (default: the network's `fsdp_units`) in
    backward instead of storing them: memory for about one more forward pass. Dropout draws the same
    numbers when recomputed (the RNG state is kept), so gradients equal those without checkpointing.
    Returns the number of blocks."""
    block_types = tuple(block_types or getattr(net, "fsdp_units", ()))
    if not block_types:
        raise ValueError(f"{type(net).__name__} declares no blocks to checkpoint (fsdp_units)")
    count = 0
    for module in net.modules():
        if isinstance(module, block_types) and not getattr(module, "_checkpointed", False):
            module.forward = types.MethodType(_checkpointed_forward(type(module).forward), module)
            module._checkpointed = True
            count += 1
    return count


def _checkpointed_forward(forward):
    def run(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(self, *args, **kwargs)
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)

    return run
