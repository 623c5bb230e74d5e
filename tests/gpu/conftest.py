"""The GPU tier: tests marked `gpu`, run on a CUDA GPU (`pytest -m gpu tests/gpu`, or scripts/gpu_check.sh on a
lent GPU machine) and skipped, with the reason, everywhere else.

EDDY_GPU_TESTS_ON_CPU=1 runs the same tests on the CPU at tiny sizes: a dry run of the tier before the one
short GPU run. Only what needs CUDA itself (the fp16 GradScaler) is skipped there.

tests/gpu/ is a package (it has __init__.py), so pytest imports this file as `gpu.conftest`. As a plain
top-level module it would be named `conftest` too: pytest would then replace tests/conftest.py in
sys.modules with this file, and every `from conftest import ...` collected after this folder (tests/test_*.py
included) would find this file instead. As it is, `from conftest import ...` means tests/conftest.py everywhere.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import sys

import pytest

ON_CPU = os.environ.get("EDDY_GPU_TESTS_ON_CPU") == "1"
if ON_CPU:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even where a GPU is present; read when CUDA starts


@functools.cache
def skip_reason() -> str | None:
    """Why the tier cannot run here, or None. Where no CUDA driver is installed torch is not even imported,
    so that a run without a GPU collects and skips the tier in a moment."""
    if ON_CPU:
        return None
    hint = "; EDDY_GPU_TESTS_ON_CPU=1 runs the tier on the CPU at tiny sizes"
    if sys.platform == "linux":
        import ctypes

        try:
            ctypes.CDLL("libcuda.so.1")  # what torch needs to see a GPU
        except OSError:
            return "no CUDA GPU (no CUDA driver: libcuda.so.1 not found)" + hint
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is false)" + hint
    return None


def pytest_collection_modifyitems(config, items):
    reason = skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def pytest_report_header(config):
    """The environment report: torch, CUDA, the GPU and the packages the runs depend on."""
    reason = skip_reason()
    if reason is not None:
        return [f"gpu tier: skipped: {reason}"]
    import torch

    lines = [f"gpu tier: {'CPU dry run (EDDY_GPU_TESTS_ON_CPU=1)' if ON_CPU else 'on the GPU'}",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
                     f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    for dist in ("einops", "accelerate", "ema-pytorch", "wandb", "datasets", "deepspeed", "safetensors"):
        try:
            found = md.distribution(dist)
            lines.append(f"{dist} {found.version} ({found.locate_file('')})")
        except md.PackageNotFoundError:
            lines.append(f"{dist}: not installed")
    return lines
