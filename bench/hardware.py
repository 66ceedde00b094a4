"""What the machine can do, measured in the same run as a benchmark, and where the run happened.

Shared by the bench scripts: MFU and bandwidth figures are only comparable when the ceiling
they are divided by was measured on the same GPU, clocks and software (docs/design.md §10).

- ``measure_matmul_tflops``: dense matmul rate (2 FLOPs per multiply-add), median of repeats;
- ``measure_copy_bandwidth``: device-to-device copy, bytes read + bytes written per second;
- ``environment``: GPU, versions, date, git commit and command line for every saved result;
- ``open_energy_counter``: the GPU's own cumulative energy counter through NVML (``pynvml`` from
  the optional ``nvidia-ml-py`` package), or the reason there is none;
- from engine.hardware: ``datasheet_peak_tflops`` (the vendor's dense bf16 peak, never the
  sparsity figure), ``A100_DENSE_BF16_TFLOPS``, ``median_seconds`` and ``read_git_commit``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
from collections.abc import Callable
from pathlib import Path

import torch

from engine.hardware import A100_DENSE_BF16_TFLOPS, datasheet_peak_tflops, median_seconds, read_git_commit

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


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


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
        git_commit=git_commit or read_git_commit(Path(__file__).resolve().parent),
        command=shlex.join(["python", *argv]),
    )


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
    info["nvidia_ml_py"] = _package_version("nvidia-ml-py")
    return EnergyCounter(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), info=info,
                         close=pynvml.nvmlShutdown)
