"""Triton kernel tests: compiled on a CUDA GPU, else interpreted on CPU (TRITON_INTERPRET=1).

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports
the kernels, i.e. in the environment of this pytest process:
    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton -q
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", (
        "no CUDA device: run the Triton tests in their own process with TRITON_INTERPRET=1 set, "
        "e.g. `TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton -q`"
    )

# tests/tolerances.py (the shared dtype -> tolerance table) lives one directory up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
