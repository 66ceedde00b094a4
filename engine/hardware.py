"""Facts about the machine and checkout a run is on: one home for the engine, train/ and bench/.

- ``datasheet_peak_tflops``: a GPU's dense bf16 tensor-core peak from its vendor's datasheet
  (never the sparsity figure), the denominator of MFU against the datasheet (docs/design.md §10);
- ``read_git_commit``: the commit of the checkout that runs, for result files and run reports;
- ``median_seconds``: the median time of a callable, by CUDA events on a GPU (the GEMM tuning of
  engine.ops and the bench scripts time with it).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets (the "with sparsity" figures
# halved). Matched against the upper-cased torch.cuda.get_device_name(), most specific pattern first.
DATASHEET_DENSE_BF16_TFLOPS = (
    ("H200", 989.0),  # H200 SXM (and GH200, the same GPU die)
    ("H100 PCIE", 756.0),
    ("H100", 989.0),  # H100 SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),  # SXM and PCIe alike
)

A100_DENSE_BF16_TFLOPS = 312.0  # the unit of "A100-equivalent GPU-days"


def datasheet_peak_tflops(gpu: str | torch.device | None) -> float | None:
    """Dense bf16 datasheet peak of a GPU, given its reported name (``torch.cuda.get_device_name()``)
    or a torch.device; None for a GPU not in the table, a non-CUDA device, or None."""
    if isinstance(gpu, torch.device):
        gpu = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else None
    if not gpu:
        return None
    name = gpu.upper()
    return next((tflops for pattern, tflops in DATASHEET_DENSE_BF16_TFLOPS if pattern in name), None)


def read_git_commit(repo: str | Path | None = None) -> str | None:
    """HEAD of the repository holding ``repo`` (default: this file's), with "-dirty" when the work
    tree has changes; None where git or the repository is missing.

    ENGINE_GIT_COMMIT, when set, wins: a copied tree (a GPU machine's) may have no .git, or a
    stale one, whose HEAD would name another commit.
    """
    if os.environ.get("ENGINE_GIT_COMMIT"):
        return os.environ["ENGINE_GIT_COMMIT"]
    repo = Path(__file__).resolve().parent if repo is None else Path(repo)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True,
                              timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                                check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def median_seconds(fn: Callable[[], object], device: torch.device | str, repeats: int, warmup: int = 0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    On CUDA each call is bracketed by events recorded on the current stream and the host
    synchronises once at the end, so the launches of consecutive calls still overlap as they
    would in a loop; on the CPU it is perf_counter around each call.
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
