"""Facts about the machine and checkout a run is on: one home for the engine, train/ and bench/.

- ``datasheet_peak_tflops``: a GPU's dense bf16 tensor-core peak from its vendor's datasheet
  (never the sparsity figure), the denominator of MFU against the datasheet (docs/design.md §10);
- ``read_git_commit``: the commit of the checkout that runs, for result files and run reports;
- ``median_seconds``: the median time of a callable, by CUDA events on a GPU (the GEMM tuning of
  engine.ops and the bench scripts time with it);
- ``open_energy_counter``: the GPU's own cumulative energy counter through NVML (``pynvml`` from
  the optional ``nvidia-ml-py`` package), or the reason there is none (`train run` logs energy per
  step with it, `bench/throughput.py --schedule` projects a schedule's kWh).
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


# ------------------------------------------------------------------------------ energy

class EnergyCounter:
    """A GPU's cumulative energy counter, or why it cannot be read.

    ``read_mj()`` returns the counter in millijoules (NVML's ``nvmlDeviceGetTotalEnergyConsumption``:
    the energy the board has drawn since the driver was loaded), or None once it fails, with the
    failure in ``reason``; it never raises. ``info`` describes the GPU as NVML sees it (name, power
    limit, driver) for the result file. Build one with ``open_energy_counter``; tests build one
    around a fake ``read`` function.
    """

    def __init__(self, read: Callable[[], int] | None, reason: str | None = None, info: dict | None = None,
                 close: Callable[[], None] | None = None):
        self._read, self.reason, self._close = read, reason, close
        self.info = dict(info or {}, available=read is not None, reason=reason)

    @property
    def available(self) -> bool:
        return self._read is not None

    def read_mj(self) -> int | None:
        if self._read is None:
            return None
        try:
            return int(self._read())
        except Exception as exc:  # e.g. NVMLError_GpuIsLost: the row's energy becomes null, the run goes on
            self._read, self.reason = None, f"reading the NVML energy counter failed: {type(exc).__name__}: {exc}"
            return None

    def close(self) -> None:
        if self._close is not None:
            try:
                self._close()
            except Exception:
                pass
            self._close = None


def _nvml_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_handle(nvml, device: torch.device):
    """NVML's handle of the GPU torch calls ``device``, matched by UUID (NVML numbers the GPUs without
    regard to CUDA_VISIBLE_DEVICES), else by index where no visibility mask reorders them."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available()
                                                            else 0)
    if torch.cuda.is_available():
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            text = str(uuid) if str(uuid).startswith("GPU-") else "GPU-" + str(uuid)
            for key in (text, text.encode()):  # older nvidia-ml-py releases take bytes only
                try:
                    return nvml.nvmlDeviceGetHandleByUUID(key), "uuid"
                except Exception:
                    pass
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        raise RuntimeError(f"cannot match CUDA device {index} to an NVML device (no UUID from torch, and "
                           "CUDA_VISIBLE_DEVICES renumbers the GPUs)")
    return nvml.nvmlDeviceGetHandleByIndex(index), "index"


def open_energy_counter(device) -> EnergyCounter:
    """The NVML energy counter of ``device``; never raises. Where there is none (not a CUDA device,
    ``pynvml`` not installed, NVML not answering, a GPU without the counter: it exists from Volta on)
    the counter is unavailable and ``reason`` says why."""
    device = torch.device(device)
    if device.type != "cuda":
        return EnergyCounter(None, f"no NVML energy counter on a {device.type} device")
    try:
        import pynvml
    except ImportError:
        return EnergyCounter(None, "pynvml is not importable (pip install nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return EnergyCounter(None, f"NVML did not initialise: {type(exc).__name__}: {exc}")
    try:
        handle, matched_by = _nvml_handle(pynvml, device)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # a GPU without the counter fails here
    except Exception as exc:
        pynvml.nvmlShutdown()
        return EnergyCounter(None, f"the NVML energy counter cannot be read: {type(exc).__name__}: {exc}")
    info = dict(nvml_device_matched_by=matched_by)
    for key, query, scale in (("gpu_name", "nvmlDeviceGetName", None),
                              ("power_limit_w", "nvmlDeviceGetEnforcedPowerLimit", 1e-3),
                              ("default_power_limit_w", "nvmlDeviceGetPowerManagementDefaultLimit", 1e-3)):
        try:
            value = getattr(pynvml, query)(handle)
            info[key] = value * scale if scale else _nvml_text(value)
        except Exception:  # optional facts: a missing one leaves the field null
            info[key] = None
    try:
        info["driver_version"] = _nvml_text(pynvml.nvmlSystemGetDriverVersion())
    except Exception:
        info["driver_version"] = None
    info["nvidia_ml_py"] = package_version("nvidia-ml-py")
    return EnergyCounter(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), info=info,
                         close=pynvml.nvmlShutdown)


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
