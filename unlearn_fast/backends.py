"""Which kernel runs an op: discovery, fallback order and forcing.

Each backend is a module of plain functions named after the ops (same arguments as the op schema):
  reference  unlearn_fast.reference          pure PyTorch, any device (the default kernel)
  cpp        unlearn_fast._C, "<op>_cpu"       C++ CPU kernels (at::parallel_for, vectorised loops)
  cuda       unlearn_fast._C, "<op>_cuda"      CUDA kernels, built when torch has CUDA and nvcc exists
  triton     unlearn_fast.kernels              Triton kernels (GPU, or CPU under TRITON_INTERPRET=1)
A tensor on device D runs the first backend of FALLBACK[D] that is importable and has the op, unless
a backend is forced with `use_backend(name)` or the UNLEARN_FAST_BACKEND environment variable.
"""
import contextlib
import contextvars
import functools
import importlib
import os

from . import reference

FALLBACK = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
NAMES = ("reference", "cpp", "cuda", "triton")

_forced = contextvars.ContextVar("unlearn_fast_backend", default=None)


@functools.lru_cache(maxsize=None)
def _load(name):
    """(module, suffix, None) if the backend can run here, else (None, None, reason)."""
    if name == "reference":
        return reference, "", None
    if name in ("cpp", "cuda"):
        try:
            ext = importlib.import_module("unlearn_fast._C")
        except ImportError as err:
            return None, None, f"compiled extension unlearn_fast._C not importable ({err})"
        if name == "cuda" and not getattr(ext, "WITH_CUDA", False):
            return None, None, "extension built without CUDA (CPU torch or no nvcc at build time)"
        return ext, "_" + ("cpu" if name == "cpp" else "cuda"), None
    if name == "triton":
        import torch

        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            return None, None, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU)"
        try:
            mod = importlib.import_module("unlearn_fast.kernels")
        except ImportError as err:
            return None, None, f"triton not importable ({err})"
        return mod, "", None
    raise ValueError(f"backend must be one of {NAMES}, got {name!r}")


def _function(name, op):
    mod, suffix, _ = _load(name)
    return None if mod is None else getattr(mod, op + suffix, None)


def forced():
    return _forced.get() or os.environ.get("UNLEARN_FAST_BACKEND") or None


@contextlib.contextmanager
def use_backend(name):
    """Run every unlearn_fast op in this block on one backend (errors if it lacks an op)."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def kernel(op, device_type):
    """The function that runs `op` for tensors on `device_type`."""
    name = forced()
    if name is not None:
        fn = _function(name, op)
        if fn is None:
            reason = _load(name)[2] or f"backend {name!r} has no kernel for {op}"
            raise RuntimeError(f"unlearn_fast: forced backend {name!r} cannot run {op}: {reason}")
        return fn
    for name in FALLBACK.get(device_type, ("reference",)):
        fn = _function(name, op)
        if fn is not None:
            return fn
    raise AssertionError("unreachable: the reference backend has every op")


def backends():
    """What is active per device and why the others are not: {"cpu": ..., "cuda": ..., "backends": {...}}."""
    report = {name: (_load(name)[2] or "available") for name in NAMES}
    active = {}
    for device, order in FALLBACK.items():
        active[device] = next(n for n in order if _load(n)[0] is not None)
    return {"forced": forced(), "active": active, "backends": report}


def release_output_cache():
    """Free the large CPU output blocks the C++ codec keeps for reuse (see csrc/cpu/codec.cpp); returns bytes freed."""
    ext = _load("cpp")[0]
    return 0 if ext is None else int(ext.release_output_cache())
