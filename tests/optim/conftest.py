"""The op tests' fixtures, for the optimizer's Triton kernel (tests/ops/conftest.py)."""

from tests.ops.conftest import interpreter_fuses_fma_like_the_gpu, interpreter_rounds_bf16_like_the_gpu  # noqa: F401
