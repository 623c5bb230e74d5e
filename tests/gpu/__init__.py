# A package, so that pytest imports tests/gpu/conftest.py as `gpu.conftest` (see its docstring).
