"""Training logs: one JSONL line per interval, a progress bar on a terminal or a plain line per
interval otherwise, and TensorBoard when asked for (the optional `tensorboard` extra).

Each line of OUT/metrics.jsonl (rank 0 writes it)::

    step, loss, grad_norm, lr        loss and grad norm: means over the interval's applied steps
    img_per_s, img_per_s_per_gpu     images of the global batch per second of step time
    tflops_per_gpu, mfu              model.flops_per_sample (3 x forward, docs/design.md §10) x images/s;
                                     mfu against the GPU's datasheet dense bf16 peak, null on CPU
    mem_gib                          torch.cuda.max_memory_allocated, null on CPU
    step_ms                          mean wall time of a step (data wait included)
    data_wait, data_wait_ms          share of step time spent waiting for the loader; mean ms per step
    recompute                        the activation recompute applied (engine.recompute; "off": none)
    cuda_graph, cuda_graph_off       whether the interval's steps replayed a CUDA graph; why not
    gpu_days                         device time used so far (all segments of the run, all ranks)
    gpu_days_stage                   projection for the configured steps of this stage at the
                                     interval's rate: steps x global batch / (img/s per GPU) / 86400
    skipped, skipped_total           steps not applied because the loss or grad norm was not finite

When stdout is not a terminal (nohup, CI, a log file) or the bar cannot show (stderr is not a
terminal), each JSONL line is also printed to stdout as one flushed line (plain_line), so a
redirected log shows progress at every ``log.every`` steps instead of nothing for minutes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from engine.hardware import datasheet_peak_tflops

class Interval:
    """Sums over the steps since the last log line."""

    def __init__(self):
        self.steps = self.applied = self.images = self.skipped = 0
        self.flops = self.step_seconds = self.wait_seconds = 0.0
        self.loss_sum = self.grad_norm_sum = 0.0

    def add(self, images: int, flops: float, step_seconds: float, wait_seconds: float, loss: float,
            grad_norm: float, applied: bool) -> None:
        self.steps += 1
        self.images += images
        self.flops += flops
        self.step_seconds += step_seconds
        self.wait_seconds += wait_seconds
        if applied:
            self.applied += 1
            self.loss_sum += loss
            self.grad_norm_sum += grad_norm
        else:
            self.skipped += 1


class EnergyMeter:
    """Joules a GPU drew between calls of ``take``, from its own cumulative counter
    (engine.hardware.open_energy_counter); None where the counter cannot be read (a CPU, no
    nvidia-ml-py, a GPU without one) or a reading failed."""

    def __init__(self, counter=None):
        self.counter = counter
        self._last = counter.read_mj() if counter is not None else None

    def take(self) -> float | None:
        if self.counter is None:
            return None
        now = self.counter.read_mj()
        joules = (now - self._last) / 1e3 if now is not None and self._last is not None else None
        self._last = now
        return joules

    def close(self) -> None:
        if self.counter is not None:
            self.counter.close()


def _round(value: float | None, digits: int = 6):
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def interval_record(step: int, interval: Interval, lr: float, world: int, device: torch.device,
                    stage_steps: int, global_batch: int, gpu_seconds: float, skipped_total: int,
                    recompute: str = "off", cuda_graph: bool = False, cuda_graph_off: str = "",
                    energy_j: float | None = None) -> dict:
    """The log line of an interval. ``energy_j``: what the logging rank's GPU drew over it
    (EnergyMeter), recorded per step; a job's energy is about the world size times it."""
    seconds = max(interval.step_seconds, 1e-9)
    steps = max(interval.steps, 1)
    img_per_s = interval.images / seconds
    per_gpu = img_per_s / world
    tflops_per_gpu = interval.flops / seconds / world / 1e12
    peak = datasheet_peak_tflops(device)
    return {
        "step": step,
        "loss": _round(interval.loss_sum / interval.applied) if interval.applied else None,
        "grad_norm": _round(interval.grad_norm_sum / interval.applied) if interval.applied else None,
        "lr": _round(lr),
        "img_per_s": _round(img_per_s, 5),
        "img_per_s_per_gpu": _round(per_gpu, 5),
        "tflops_per_gpu": _round(tflops_per_gpu, 5),
        "mfu": _round(tflops_per_gpu / peak, 4) if peak else None,
        "mem_gib": _round(torch.cuda.max_memory_allocated(device) / 2**30, 4) if device.type == "cuda" else None,
        "step_ms": _round(interval.step_seconds / steps * 1e3, 5),
        "data_wait": _round(interval.wait_seconds / seconds, 4),
        "data_wait_ms": _round(interval.wait_seconds / steps * 1e3, 4),
        "recompute": recompute,
        "cuda_graph": cuda_graph,
        "cuda_graph_off": cuda_graph_off or None,
        "gpu_days": _round(gpu_seconds / 86400, 5),
        "gpu_days_stage": _round(stage_steps * global_batch / per_gpu / 86400, 5) if per_gpu > 0 else None,
        "skipped": interval.skipped,
        "skipped_total": skipped_total,
        "gpu_energy_j_per_step": _round(energy_j / steps, 5) if energy_j is not None else None,
    }


def _duration(seconds: float) -> str:
    """A rough duration: 42s, 3m20s, 1h02m, 2d03h."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def plain_line(record: dict, total_steps: int, eta_seconds: float | None) -> str:
    """One interval_record as a line for a log file:
    ``step 120/5000  loss 0.1234  grad norm 0.0561  lr 0.0001  310 img/s  206 ms/step  data wait 3%
    recompute mlp/2  graph on  eta 1h02m``."""
    def number(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    parts = [f"step {record['step']}/{total_steps}", f"loss {number(record['loss'], '.4f')}",
             f"grad norm {number(record['grad_norm'], '.4g')}", f"lr {number(record['lr'], '.3g')}",
             f"{number(record['img_per_s'], '.4g')} img/s", f"{number(record.get('step_ms'), '.4g')} ms/step",
             f"data wait {number(record['data_wait'], '.0%')}", f"recompute {record.get('recompute', 'off')}",
             f"graph {'on' if record.get('cuda_graph') else 'off'}",
             *([f"{record['gpu_energy_j_per_step']:.4g} J/step"] if record.get("gpu_energy_j_per_step") is not None
               else []),
             f"eta {'n/a' if eta_seconds is None else _duration(eta_seconds)}"]
    if record.get("skipped"):
        parts.append(f"skipped {record['skipped']} (total {record['skipped_total']})")
    return "  ".join(parts)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def open_tensorboard(folder: Path):
    """A SummaryWriter writing to ``folder``; None, after one printed line saying how to get it,
    when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # imports the tensorboard package
    except ImportError:
        print('log.tensorboard is on, but the tensorboard package is not installed: continuing without it '
              '(metrics.jsonl has every value). To get it: pip install "engine[tensorboard]", or pip install '
              'tensorboard.', flush=True)
        return None
    return SummaryWriter(str(folder))


def _step_of(line: str) -> float:
    """The step of a JSONL line; infinity for a line cut short by a killed process (dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """JSONL file + tqdm bar or plain lines + optional TensorBoard, all on rank 0; other ranks keep nothing."""

    def __init__(self, out: Path, rank: int, total_steps: int, start_step: int, tensorboard: bool):
        self.active = rank == 0
        self.file = self.bar = self.board = None
        self.plain = False
        self.postfix: dict[str, str] = {}
        self.total_steps, self.start_step = total_steps, start_step
        self.start_time = time.perf_counter()  # for the eta: wall time per step since this segment began
        if not self.active:
            return
        from tqdm import tqdm

        out = Path(out)
        path = out / "metrics.jsonl"
        if path.exists():  # a resumed run: drop the lines of steps it is about to repeat
            path.write_text("".join(line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                                    if _step_of(line) <= start_step), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")
        # disable=None: the bar shows on a terminal and stays out of redirected logs
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=None)
        # plain lines wherever the bar is not seen on a terminal beside stdout
        self.plain = self.bar.disable or not _is_terminal(sys.stdout)
        if tensorboard:
            self.board = open_tensorboard(out / "tensorboard")

    def eta_seconds(self, step: int) -> float | None:
        """Wall time left at this segment's rate so far (checkpoints and sample grids included)."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.start_time) / done * max(0, self.total_steps - step)

    def step(self, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.postfix["loss"] = f"{loss:.4f}"
                self.bar.set_postfix(self.postfix, refresh=False)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar is not None:  # where the time goes, beside the bar's own rate
            self.postfix.update({"img/s": f"{record.get('img_per_s') or 0:.4g}",
                                 "ms/step": f"{record.get('step_ms') or 0:.4g}",
                                 "data wait": f"{record.get('data_wait') or 0:.0%}",
                                 "recompute": record.get("recompute", "off"),
                                 "graph": "on" if record.get("cuda_graph") else "off"})
            self.bar.set_postfix(self.postfix, refresh=False)
        if self.plain:
            print(plain_line(record, self.total_steps, self.eta_seconds(record["step"])), flush=True)
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(f"train/{key}", value, record["step"])

    def message(self, text: str) -> None:
        if self.plain:
            print(text, flush=True)
        elif self.bar is not None:
            self.bar.write(text)  # above the bar

    def close(self) -> None:
        for handle in (self.bar, self.board, self.file):
            if handle is not None:
                handle.close()
