"""What the machine can do, measured in the same run as a benchmark, and where the run happened.

Shared by the bench scripts: MFU and bandwidth figures are only comparable when the ceiling
they are divided by was measured on the same GPU, clocks and software (docs/design.md §10).

- ``measure_matmul_tflops``: dense matmul rate (2 FLOPs per multiply-add), median of repeats;
- ``measure_copy_bandwidth``: device-to-device copy, bytes read + bytes written per second;
- ``environment``: GPU, versions, date, git commit and command line for every saved result;
- from engine.hardware: ``datasheet_peak_tflops`` (the vendor's dense bf16 peak, never the
  sparsity figure), ``A100_DENSE_BF16_TFLOPS``, ``median_seconds``, ``read_git_commit`` and
  ``open_energy_counter`` (the GPU's own cumulative energy counter through NVML, or the reason
  there is none).
"""

from __future__ import annotations

import datetime
import platform
import shlex
from pathlib import Path

import torch

from engine.hardware import (A100_DENSE_BF16_TFLOPS, EnergyCounter, datasheet_peak_tflops, median_seconds,
                             open_energy_counter, package_version, read_git_commit)

__all__ = ["A100_DENSE_BF16_TFLOPS", "EnergyCounter", "datasheet_peak_tflops", "environment", "measure_copy_bandwidth",
           "measure_matmul_tflops", "median_seconds", "open_energy_counter", "read_git_commit"]


def measure_matmul_tflops(device, n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 10,
                          warmup: int = 3) -> float:
    """Dense (n x n) @ (n x n) rate on ``device`` in TFLOP/s, 2·n³ FLOPs per product, random inputs.

    Random rather than constant data: tensor-core power (and so clock) depends on the bit
    patterns, and zeros would report a rate no real workload reaches. A short burst on a cool
    GPU: on an H200 the median of 10 products after 3 warm-ups read 803 TFLOP/s, while after
    100 and 300 warm-up products the power limit had pulled it down to 685 and 585. Call it
    before the GPU has been loaded for long, as bench/throughput.py does.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.matmul(a, b, out=out), device, repeats, warmup)
    return 2.0 * n**3 / seconds / 1e12


def measure_copy_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 20, warmup: int = 5) -> float:
    """Bytes read + bytes written per second of a ``nbytes`` device-to-device copy.

    The default 1 GiB is far larger than any GPU's L2 (50-60 MB on H100/H200), so the copy
    streams from and to HBM.
    """
    if nbytes < 1:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    device = torch.device(device)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats, warmup)
    return 2.0 * nbytes / seconds


def environment(argv: list[str], git_commit: str | None = None) -> dict:
    """Where and with what a result was measured: GPU, software versions, date, commit, command.

    ``git_commit`` overrides the commit read from the repository (for a copied tree without .git).
    """
    cuda = torch.cuda.is_available()
    gpu_name = torch.cuda.get_device_name() if cuda else None
    return dict(
        gpu_name=gpu_name,
        gpu_count=torch.cuda.device_count() if cuda else 0,
        gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        cpu=platform.processor() or platform.machine(),
        python=platform.python_version(),
        torch=torch.__version__,
        triton=package_version("triton"),
        diffusers=package_version("diffusers"),
        cuda=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit or read_git_commit(Path(__file__).resolve().parent),
        command=shlex.join(["python", *argv]),
    )
