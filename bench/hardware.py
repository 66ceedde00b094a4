"""What the machine can do, measured in the same run as a benchmark, and where the run happened.

Shared by the bench scripts: MFU and bandwidth figures are only comparable when the ceiling
they are divided by was measured on the same GPU, clocks and software (DESIGN §6).

- ``measure_matmul_tflops``: dense matmul rate (2 FLOPs per multiply-add), median of repeats;
- ``measure_copy_bandwidth``: device-to-device copy, bytes read + bytes written per second;
- ``datasheet_peak_tflops``: the vendor's dense bf16 peak (never the sparsity figure);
- ``environment``: GPU, versions, date, git commit and command line for every saved result.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import shlex
import statistics
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

# Dense bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets (the "with sparsity" figures
# halved). Matched against torch.cuda.get_device_name(), most specific pattern first.
_DATASHEET_BF16_DENSE = (
    ("H200", 989.0),  # H200 SXM (and GH200, the same GPU die)
    ("H100 PCIE", 756.0),
    ("H100", 989.0),  # H100 SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),  # SXM and PCIe alike
)

A100_DENSE_BF16_TFLOPS = 312.0  # the unit of "A100-equivalent GPU-days"


def datasheet_peak_tflops(gpu_name: str | None) -> float | None:
    """Dense bf16 datasheet peak of a GPU by its reported name; None for GPUs not in the table."""
    if not gpu_name:
        return None
    name = gpu_name.upper()
    for pattern, tflops in _DATASHEET_BF16_DENSE:
        if pattern in name:
            return tflops
    return None


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    On CUDA each call is bracketed by events recorded on the current stream and the host
    synchronises once at the end, so the launches of consecutive calls still overlap as
    they would in a loop; on the CPU it is perf_counter around each call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_git_commit(repo: Path | None = None) -> str | None:
    """HEAD of the repository holding this file, with "-dirty" when the work tree has changes.

    ENGINE_GIT_COMMIT, when set, wins: a copied tree (the GPU machine's) may have no .git, or a
    stale one (seen: a snapshot of an older commit, so every result there read "<old>-dirty").
    """
    if os.environ.get("ENGINE_GIT_COMMIT"):
        return os.environ["ENGINE_GIT_COMMIT"]
    repo = Path(__file__).resolve().parent if repo is None else repo
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


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
        triton=_package_version("triton"),
        diffusers=_package_version("diffusers"),
        cuda=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit or read_git_commit(),
        command=shlex.join(["python", *argv]),
    )
