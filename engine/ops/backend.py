"""Backend selection for engine ops.

Every op has three implementations: ``eager`` (plain PyTorch, the reference the others are
checked against), ``triton`` and ``cuda`` (the compiled ``engine._C`` module). The choice is

    explicit ``backend=`` argument  >  ``ENGINE_BACKEND_<OP>``  >  ``ENGINE_BACKEND``  >  ``auto``

where ``ENGINE_BACKEND_<OP>`` names one op (``ENGINE_BACKEND_MLP=cuda``, ``ENGINE_BACKEND_LINEAR``,
...: the op's function name in capitals), so one op can be switched inside a whole model, e.g.
to A/B it in a training step. ``auto`` picks the op's preferred available backend on CUDA
tensors and ``eager`` on the CPU.
An unknown name, or a backend asked for by name that cannot run here, is an error: never a
silent fallback, so a benchmark row labelled ``triton`` really ran Triton.

On CPU tensors the non-eager backends still run, so CI exercises their logic:
``triton`` under the Triton interpreter (``TRITON_INTERPRET=1`` must be set before Triton
kernels are defined) and ``cuda`` through the C++ reference path of ``engine._C``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os

import torch

BACKENDS = ("eager", "triton", "cuda")
_CHOICES = BACKENDS + ("auto",)


@functools.cache
def extension():
    """The compiled ``engine._C`` module, or None when the package was installed without it."""
    try:
        from engine import _C
    except ImportError:
        return None
    return _C


def extension_function(name: str):
    """engine._C's function ``name``; a clear error when the built module predates it."""
    fn = getattr(extension(), name, None)
    if fn is None:
        raise RuntimeError(f"engine._C has no {name}: rebuild the extension (pip install -e .) from this checkout")
    return fn


# Looked up once at import: Dynamo cannot trace importlib.util.find_spec (seen with torch 2.11).
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    if backend == "eager":
        return None
    if backend == "triton":
        if not triton_importable():
            return "the triton package is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        if device.type == "cpu":
            return "Triton kernels run on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing engine"
        return f"Triton kernels do not run on device type {device.type!r}"
    if backend == "cuda":
        ext = extension()
        if ext is None:
            return ("engine._C is not built (reinstall with `pip install -e .`; "
                    "it needs CMake, pybind11 and a C++ compiler, plus nvcc for GPU kernels)")
        if device.type == "cuda" and not ext.has_cuda():
            return "engine._C was built without nvcc, so it has only its C++ reference (CPU) kernels"
        if device.type not in ("cuda", "cpu"):
            return f"engine._C has no kernels for device type {device.type!r}"
        return None
    raise ValueError(f"unknown backend {backend!r}; choose one of {_CHOICES}")


# True while a training step runs that is, or will be, captured into a CUDA graph and replayed
# (engine.step_graph sets it around its warm-up calls and its capture): the host cost of each op
# call then stops counting, and an op's ``auto`` may prefer kernels that are faster on the GPU but
# slower to launch (linear's and mlp's cuBLASLt path, engine/ops/linear.py).
_GRAPH_STEP = contextvars.ContextVar("engine_graph_step", default=False)


@contextlib.contextmanager
def graph_step():
    """Mark the code inside as a step whose launches are replayed from a CUDA graph."""
    token = _GRAPH_STEP.set(True)
    try:
        yield
    finally:
        _GRAPH_STEP.reset(token)


@torch.compiler.assume_constant_result  # Dynamo cannot trace ContextVar.get: read once while tracing
def in_graph_step() -> bool:
    return _GRAPH_STEP.get()


@torch.compiler.assume_constant_result
def requested(backend: str | None, op: str) -> str:
    """The backend name as asked for, before resolution: the argument, else ENGINE_BACKEND_<OP>,
    else ENGINE_BACKEND, else "auto". Unchecked (``resolve`` checks)."""
    if backend is not None:
        return backend
    per_op = os.environ.get(f"ENGINE_BACKEND_{op.upper()}")
    return per_op if per_op is not None else os.environ.get("ENGINE_BACKEND", "auto")


def _source(backend: str | None, op: str) -> str:
    if backend is not None:
        return "backend argument"
    per_op = f"ENGINE_BACKEND_{op.upper()}"
    return per_op if per_op in os.environ else "ENGINE_BACKEND"


@torch.compiler.assume_constant_result
def resolve(backend: str | None, device: torch.device, op: str,
            prefer: tuple[str, ...] = ("cuda", "triton")) -> str:
    """Return the concrete backend an op call runs with.

    Under torch.compile this runs once while tracing and its result is baked into the graph:
    Dynamo cannot trace ``engine._C.has_cuda()`` (a pybind11 function), and the choice is fixed
    per graph anyway (changing ENGINE_BACKEND later does not retrace a compiled model).

    ``op`` is the op's function name (for ENGINE_BACKEND_<OP>); ``prefer`` is its own order for
    ``auto`` on CUDA tensors (fastest measured first); eager is always the last resort there and
    the only ``auto`` choice on other devices.
    """
    name = requested(backend, op)
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r} (from {_source(backend, op)}); choose one of {_CHOICES}")
    if name == "auto":
        if device.type != "cuda":
            return "eager"
        for candidate in prefer:
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "eager"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} was asked for but cannot run on {device.type}: {reason}")
    return name


def cuda_stream(tensor: torch.Tensor) -> int:
    """The raw stream handle ``engine._C`` kernels launch on (0 for CPU tensors)."""
    if tensor.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(tensor.device).cuda_stream


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (``cuda`` without an index: the current one);
    the ops size their launch grids by it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessor_count(index)


# Element types as engine._C receives them (csrc/common.h mirrors this table).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def dtype_code(tensor: torch.Tensor) -> int:
    try:
        return _DTYPE_CODES[tensor.dtype]
    except KeyError:
        raise TypeError(f"engine._C kernels take float32, float16, bfloat16 or float64 tensors, got {tensor.dtype}") from None
