"""Every Triton kernel of the engine reads only the globals a compiled kernel may read.

Triton's compiler refuses a @triton.jit function that reads a plain Python global (a float
constant, say): only constexprs, modules, other jitted functions, dtypes and triton.language's
own objects pass (triton/compiler/code_generator.py, ``global_lookup``). The interpreter the CPU
tests run under does not apply that rule, so a kernel can pass every CPU test and fail to compile
on the GPU; this test applies it to the names each kernel's code reads."""

from __future__ import annotations

import importlib
import pkgutil
import types

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import engine

KERNELS = (JITFunction, InterpretedFunction)  # what @triton.jit returns, compiled or interpreted
ALLOWED = (types.ModuleType, *KERNELS, tl.constexpr, tl.dtype)


def _modules():
    for info in pkgutil.walk_packages(engine.__path__, "engine."):
        if not info.name.startswith("engine._C"):
            yield importlib.import_module(info.name)


def _kernels():
    seen = set()
    for module in _modules():
        for name, obj in vars(module).items():
            if isinstance(obj, KERNELS) and id(obj) not in seen:
                seen.add(id(obj))
                yield f"{obj.fn.__module__}.{name}", obj


def test_the_check_finds_the_kernels():
    names = {name for name, _ in _kernels()}
    assert {"engine.ops.moe._moe_combine_kernel", "engine.ops._gemm._gelu_tanh_grad"} <= names  # a kernel, a helper
    assert any(name.startswith("engine.optim.") for name in names)


def test_kernels_read_only_constexpr_globals():
    offending = []
    for name, kernel in _kernels():
        scope = kernel.fn.__globals__
        for read in kernel.fn.__code__.co_names:  # globals and attribute names; only globals are looked up
            if read not in scope:
                continue
            value = scope[read]
            if not (isinstance(value, ALLOWED) or getattr(value, "__module__", "").startswith("triton.language")):
                offending.append(f"{name} reads {read} ({type(value).__name__})")
    assert not offending, "make these tl.constexpr: " + "; ".join(offending)
