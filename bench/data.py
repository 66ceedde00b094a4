"""Latent-cache loader throughput, and the data wait a training loop would see, per text shape.

    python bench/data.py [--samples 256] [--batch 64] [--text 120x4096,77x1024]
                         [--backends dali-gpu,dali-cpu,torch] [--workers 2[,4,8]] [--prefetch 2]
                         [--batches 40] [--warmup 4] [--train-rate R[,R]] [--consumer-ms X[,X]]
                         [--cache DIR] [--json PATH]

For each text shape (``--text``, tokens x width) a synthetic cache with the per-sample sizes of
256 px training is written with the cache writer: latent mean and std 4 x 32 x 32 fp16 each
(16 KiB together) and text features with every caption at its full length, the worst case:
120 x 4096 fp16 (PixArt's T5-XXL, 0.94 MiB a sample) and 77 x 1024 fp16 (MicroDiT's OpenCLIP,
154 KiB). 4096 samples of the first are about 4 GB; the default is small so the script doubles as
a CPU smoke test. ``--cache DIR`` keeps the cache in DIR (with several shapes, each in
DIR/<tokens>x<width>) and reuses one whose size and shape match, e.g. for ``python -m train run
--data DIR``.

Backends: ``dali-gpu`` (DALI pipeline delivering on the GPU), ``dali-cpu`` (DALI CPU pipeline;
on a GPU machine the loader copies its batches to the GPU), ``torch`` (DataLoader workers, then
the loader's copy to the default device). One row per (backend, shape, workers), each on a fresh
loader cycling epochs, in two phases:

1. idle consumer: ``--warmup`` untimed batches, then ``--batches`` timed ones, the consumer doing
   nothing but waiting for each batch (on CUDA: its current stream synchronised). Reports
   samples/s and its ratio to the training rate: above 1 the loader keeps up.
2. busy consumer: ``--batches`` more, the consumer holding each batch for ``--consumer-ms`` of
   simulated GPU work (on CUDA ``torch.cuda._sleep`` on the current stream, then that stream
   synchronised, as the training loop's one host sync a step does; on the CPU ``time.sleep``).
   Reports the data wait, the time blocked in ``next()`` over the phase's time: what the training
   loop logs as its data wait. ``--consumer-ms 0`` skips this phase.

Training rates (``--train-rate``, one value or one per shape): 500 img/s for 120x4096, where
PixArt-XL/2 at 256 px, batch 64, engine+graph measured 504 img/s on an H100
(bench/results/h100_throughput_256_b64_b8e8330.json); 1,350 img/s for 77x1024, MicroDiT's
about 2.7 x that rate (../shared/MICRODIT.md: masking made an image 2.72x cheaper per step).
``--consumer-ms`` defaults to batch / training rate per shape (128 ms and 47 ms at batch 64).

The shard files were just written or hashed, so they come from the page cache: this measures the
loader, not the disk.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hardware
from engine.data import make_loader, open_cache
from engine.data.cache import Sample, shard_name, write_index, write_shard

LATENT_SHAPE = (4, 32, 32)  # 256px through an 8x VAE
BACKENDS = ("dali-gpu", "dali-cpu", "torch")
TEXT_SHAPES = "120x4096,77x1024"
# one GPU's training img/s per text shape (the module docstring gives the sources)
TRAIN_RATES = {(120, 4096): 500.0, (77, 1024): 1350.0}


def build_synthetic_cache(root: Path, samples: int, text_tokens: int, text_width: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    entries = []
    for number, start in enumerate(range(0, samples, shard_size)):
        count = min(shard_size, samples - start)
        text = rng.standard_normal((count, text_tokens, text_width), dtype=np.float32).astype(np.float16)
        latents = rng.standard_normal((count, 2, *LATENT_SHAPE), dtype=np.float32).astype(np.float16)
        shard = [Sample(latents[i, 0], np.abs(latents[i, 1]), text[i], -1, (256, 256), 0, "", f"synthetic-{start + i}")
                 for i in range(count)]
        entries.append(write_shard(root / "shards", shard_name(number), shard, [], text_width))
    meta = {"resolution": 256, "multi_aspect": False, "buckets": [[256, 256]], "latent_channels": LATENT_SHAPE[0],
            "latent_downsample": 8, "vae": None, "text_encoder": None, "text_width": text_width,
            "max_tokens": text_tokens, "labels": False, "classes": []}
    write_index(root, meta, entries)


def open_synthetic_cache(root: Path, samples: int, text_tokens: int, text_width: int, shard_size: int):
    """The cache at ``root``, written first unless one of this size and text shape is there."""
    try:
        cache = open_cache(root, verify="none")
        reuse = (cache.num_samples, cache.max_tokens, cache.text_width) == (samples, text_tokens, text_width)
    except FileNotFoundError:
        reuse = False
    if not reuse:
        start = time.perf_counter()
        build_synthetic_cache(root, samples, text_tokens, text_width, shard_size)
        print(f"wrote a {samples}-sample {text_tokens}x{text_width} cache to {root} in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return open_cache(root, verify="open")  # hashing every shard also pulls it into the page cache


def sleep_cycles_per_ms() -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond, timed with CUDA events."""
    torch.cuda._sleep(1000)  # the first launch pays for loading the kernel
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 50_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def measure(cache, backend: str, text: tuple[int, int], workers: int, train_rate: float, consumer_ms: float,
            cycles_per_ms: float | None, args) -> dict:
    row = {"backend": backend, "text": f"{text[0]}x{text[1]}", "workers": workers, "prefetch": args.prefetch}
    if backend == "dali-gpu" and not torch.cuda.is_available():
        return {**row, "skipped": "no CUDA GPU"}
    if backend.startswith("dali") and importlib.util.find_spec("nvidia.dali") is None:
        return {**row, "skipped": "nvidia-dali-cuda130 is not installed"}
    dali_device = {"dali-gpu": "gpu", "dali-cpu": "cpu"}.get(backend)
    loader = make_loader(cache, args.batch, backend=backend.split("-")[0], text_len=text[0], workers=workers,
                         prefetch=args.prefetch, seed=0, dali_device=dali_device)
    on_cuda = loader.device.type == "cuda"

    def delivered():  # the consumer's view: the batch is ready for its stream
        if on_cuda:
            torch.cuda.current_stream().synchronize()

    def work():
        if cycles_per_ms is None:
            time.sleep(consumer_ms / 1000)
        else:
            torch.cuda._sleep(int(consumer_ms * cycles_per_ms))
            delivered()

    def batches():
        while True:
            yield from loader

    try:
        stream = batches()
        next(stream)  # the first batch pays for worker and pipeline start-up
        for _ in range(args.warmup - 1):
            next(stream)
        delivered()
        count, start = 0, time.perf_counter()
        for _ in range(args.batches):
            count += len(next(stream)["index"])
            delivered()
        seconds = time.perf_counter() - start
        rate = count / seconds
        bytes_per_sample = 2 * np.prod(LATENT_SHAPE) * 2 + text[0] * text[1] * 2
        row.update(device=loader.device.type, samples=count, seconds=seconds, samples_per_s=rate,
                   GB_per_s=rate * bytes_per_sample / 1e9, train_rate=train_rate,
                   ratio_to_train_rate=rate / train_rate, consumer_ms=consumer_ms)
        if consumer_ms > 0:
            wait, start = 0.0, time.perf_counter()
            for _ in range(args.batches):
                fetch = time.perf_counter()
                batch = next(stream)
                wait += time.perf_counter() - fetch
                work()
                del batch  # freeing it is the consumer's work, as in the training loop
            busy = time.perf_counter() - start
            row.update(busy_seconds=busy, wait_seconds=wait, data_wait=wait / busy,
                       busy_samples_per_s=args.batches * args.batch / busy)
    finally:
        loader.close()
    return row


def _per_shape(parser, option: str, text: str, count: int) -> list[float]:
    """One value per shape from a comma list of one value, or of one value per shape."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{option} takes numbers, got {text!r}")
    if len(values) not in (1, count):
        parser.error(f"{option} takes one value or one per --text shape ({count}), got {text!r}")
    return values * count if len(values) == 1 else values


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="samples in each synthetic cache")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--text", default=TEXT_SHAPES, help="text feature shapes, tokens x width, comma-separated")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard (about 250 MB at 120x4096)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--workers", default="2", help="reader processes per loader, a comma list to sweep")
    parser.add_argument("--prefetch", type=int, default=2, help="batches each reader reads ahead")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per phase")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches per row (at least 1)")
    parser.add_argument("--train-rate", help="one GPU's training img/s at 256px, one value or one per shape "
                                             "(default: 500 for 120x4096, 1350 for 77x1024)")
    parser.add_argument("--consumer-ms", help="simulated GPU work per batch, one value or one per shape "
                                              "(default: batch / train rate; 0 skips the busy phase)")
    parser.add_argument("--cache", type=Path, help="where to keep the synthetic cache, one folder per shape under it "
                                                   "with several (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {BACKENDS}")
    if args.warmup < 1 or args.batches < 1:
        parser.error("--warmup and --batches must be at least 1")
    try:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.text.split(",")]
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--text takes shapes like {TEXT_SHAPES} and --workers integers like 2,4,8")
    if any(len(shape) != 2 for shape in shapes):
        parser.error(f"--text takes shapes like {TEXT_SHAPES}, got {args.text!r}")
    if args.train_rate is None:
        missing = [shape for shape in shapes if shape not in TRAIN_RATES]
        if missing:
            parser.error(f"no default training rate for text shapes {missing}: give --train-rate")
        rates = [TRAIN_RATES[shape] for shape in shapes]
    else:
        rates = _per_shape(parser, "--train-rate", args.train_rate, len(shapes))
    consumer = ([1000 * args.batch / rate for rate in rates] if args.consumer_ms is None
                else _per_shape(parser, "--consumer-ms", args.consumer_ms, len(shapes)))
    cycles_per_ms = sleep_cycles_per_ms() if torch.cuda.is_available() else None

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        for shape, rate, consumer_ms in zip(shapes, rates, consumer, strict=True):
            root = args.cache or Path(scratch) / "cache"
            if len(shapes) > 1:
                root = root / f"{shape[0]}x{shape[1]}"
            cache = open_synthetic_cache(root, args.samples, *shape, args.shard_size)
            results += [measure(cache, backend, shape, count, rate, consumer_ms, cycles_per_ms, args)
                        for backend in backends for count in workers]

    environment = hardware.environment([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    try:
        dali_version = importlib.metadata.version("nvidia-dali-cuda130")
    except importlib.metadata.PackageNotFoundError:
        dali_version = None
    environment.update(dali=dali_version, cpu_count=os.cpu_count())
    report = {"environment": environment, "config": {k: str(v) if isinstance(v, Path) else v
                                                       for k, v in vars(args).items()},
              "results": results}
    for row in results:
        name = f"{row['backend']:>8} {row['text']:>8} workers {row['workers']}"
        if "skipped" in row:
            print(f"{name}: skipped ({row['skipped']})")
            continue
        line = (f"{name}: {row['samples_per_s']:8.1f} samples/s  {row['GB_per_s']:6.2f} GB/s  "
                f"{row['ratio_to_train_rate']:5.2f} x {row['train_rate']:g} img/s")
        if "data_wait" in row:
            line += f"  data wait {100 * row['data_wait']:5.1f}% at {row['consumer_ms']:.0f} ms a batch"
        print(line)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
