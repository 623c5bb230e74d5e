"""How long `--compile` takes to trace Eddy's training loss, with einops' operations traced through by
dynamo (torch's default since 2.8) and entered into the graph as single calls (what `models/compiled.py`
does).

A benchmark, not a test: it prints numbers and asserts nothing. Runs in Eddy's own environment (`.venv`).
Each row is a fresh subprocess (dynamo's caches and the allow-in-graph registry are process-wide), which:

1. builds a network and its GaussianDiffusion with `compile_loss(backend=...)`;
2. times the first forward + backward of the compiled loss (the trace, and for aot_eager and inductor the
   AOT graphs and kernels): "first step s";
3. runs --steps more steps and reports the median ("step ms"), then a save-and-sample's worth of
   einops work on numpy arrays (which registers einops' numpy backend) and one more step, to show whether
   anything recompiles;
4. reads dynamo's counters: graphs compiled before and after that save, and the user functions it
   inlined while tracing.

Networks: the 2D Unet of `benchmarks/cpu_step.py` (1.4M parameters, batch 16 at 16x16, pred_v) and a
tiny factorized Unet3D (batch 2 of 4 frames at 16x16, one given frame).

    .venv/bin/python benchmarks/compile_time.py                       # eager and aot_eager, both networks
    .venv/bin/python benchmarks/compile_time.py --backends inductor   # minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETWORKS = ("unet", "unet3d")


def build(network: str):
    import torch

    from trainer.build import build_diffusion, build_network
    from trainer.config import build_config

    if network == "unet":
        from cpu_step import tiny_diffusion  # benchmarks/ is this script's own folder, first on sys.path

        return tiny_diffusion(), (16, 3, 16, 16)
    cfg = build_config(dict(preset="tiny", model="unet3d", dataset="moving_shapes", dim=16, dim_mults=[1, 2],
                            attn_heads=2, attn_dim_head=16, image_size=16, frames=4, cond_steps=1,
                            channels=1, timesteps=1000), has_gpu=False)
    torch.manual_seed(0)
    return build_diffusion(cfg, build_network(cfg)), (2, 1, 4, 16, 16)


def child(network: str, backend: str, einops_mode: str, steps: int) -> dict:
    import numpy as np
    import torch
    from einops import rearrange
    from torch._dynamo.utils import counters

    import models.compiled
    import torch._dynamo.symbolic_convert as symbolic_convert

    if einops_mode == "traced":
        models.compiled.einops_in_graph = lambda: None  # leave einops to dynamo's tracing
    inlined = [0]
    build_inline = symbolic_convert.InliningInstructionTranslator.build_inline_tracer

    def counting(*args, **kwargs):
        inlined[0] += 1
        return build_inline(*args, **kwargs)

    symbolic_convert.InliningInstructionTranslator.build_inline_tracer = staticmethod(counting)

    diffusion, shape = build(network)
    diffusion.compile_loss(backend=backend)
    x = torch.rand(shape) * 2 - 1

    def step() -> float:
        start = time.perf_counter()
        diffusion(x).backward()
        return time.perf_counter() - start

    first = step()
    times = [step() for _ in range(steps)]
    graphs = counters["stats"]["unique_graphs"]
    rearrange(np.zeros((2, 3, 4)), "a b c -> c b a")  # what image grids do at a save: einops on numpy arrays
    step()
    return {"network": network, "backend": backend, "einops": einops_mode, "first_step_s": first,
            "step_ms": 1e3 * statistics.median(times), "graphs": graphs,
            "graphs_after_a_save": counters["stats"]["unique_graphs"], "inlined": inlined[0]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["eager", "aot_eager"], choices=["eager", "aot_eager", "inductor"])
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    p.add_argument("--steps", type=int, default=5, help="steps after the first, for the median step time")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", nargs=3, metavar=("NETWORK", "BACKEND", "EINOPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.path.insert(0, str(ROOT))
        print("ROW " + json.dumps(child(*args.child, args.steps)), flush=True)
        return

    import einops
    import torch

    print(f"torch {torch.__version__}, einops {einops.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for network in args.networks:
        for backend in args.backends:
            for mode in ("traced", "in graph"):
                r = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", network, backend,
                                    mode], cwd=ROOT, capture_output=True, text=True)
                line = next((ln for ln in r.stdout.splitlines() if ln.startswith("ROW ")), None)
                if line is None:
                    print(f"{network} {backend} einops {mode}: failed\n{r.stderr[-2000:]}", flush=True)
                    continue
                rows.append(json.loads(line[4:]))
                print(rows[-1], flush=True)
    print("\n| network | backend | einops | first step (trace) s | step ms | graphs | graphs after a save | "
          "functions inlined |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['network']} | {r['backend']} | {r['einops']} | {r['first_step_s']:.1f} | {r['step_ms']:.1f} | "
              f"{r['graphs']} | {r['graphs_after_a_save']} | {r['inlined']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
