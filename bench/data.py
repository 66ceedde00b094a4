"""Latent-cache loader throughput: samples/s of each loader beside one GPU's training rate.

    python bench/data.py [--samples 256] [--batch 64] [--backends dali-gpu,dali-cpu,torch]
                         [--workers 4] [--batches 40] [--warmup 4] [--train-rate 600]
                         [--cache DIR] [--json PATH]

A synthetic cache with the per-sample sizes of 256px PixArt training is written with the cache
writer: latent mean and std 4 x 32 x 32 fp16 each (16 KiB together) and 120 x 4096 fp16 text
features (0.94 MiB, every caption at the full 120 tokens: the worst case). 4096 samples are
about 4 GB; the default is small so the script doubles as a CPU smoke test. ``--cache DIR``
keeps the cache (and reuses it when its sample count matches).

Backends: ``dali-gpu`` (DALI pipeline delivering on the GPU), ``dali-cpu`` (DALI CPU pipeline,
device_id=None), ``torch`` (plain PyTorch loader, batches moved to the default device).
Each runs ``--warmup`` untimed batches, then ``--batches`` timed ones, cycling epochs, with
the consumer doing nothing but waiting for the batch (CUDA synchronised per batch). The
shard files were just written or read, so they come from the page cache: this measures the
loader, not the disk. The ratio column is samples/s over ``--train-rate`` (one GPU's
training img/s at 256px; default 600, the engine's target on H200): above 1 the loader keeps up.
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


def measure(cache, backend: str, args) -> dict:
    if backend == "dali-gpu" and not torch.cuda.is_available():
        return {"backend": backend, "skipped": "no CUDA GPU"}
    if backend.startswith("dali") and importlib.util.find_spec("nvidia.dali") is None:
        return {"backend": backend, "skipped": "nvidia-dali-cuda130 is not installed"}
    device = torch.device("cpu") if backend == "dali-cpu" else None
    loader = make_loader(cache, args.batch, backend=backend.split("-")[0], device=device, text_len=args.text_tokens,
                         workers=args.workers, seed=0)

    def batches():
        while True:
            yield from loader

    stream = batches()
    on_cuda = next(stream)["latent"].is_cuda  # the first batch pays for pipeline start-up
    for _ in range(args.warmup - 1):
        next(stream)
    start = time.perf_counter()
    count = 0
    for _ in range(args.batches):
        batch = next(stream)
        if on_cuda:
            torch.cuda.synchronize()
        count += len(batch["index"])
    seconds = time.perf_counter() - start
    rate = count / seconds
    bytes_per_sample = 2 * np.prod(LATENT_SHAPE) * 2 + args.text_tokens * args.text_width * 2
    return {"backend": backend, "device": "cuda" if on_cuda else "cpu", "samples": count, "seconds": seconds,
            "samples_per_s": rate, "GB_per_s": rate * bytes_per_sample / 1e9,
            "ratio_to_train_rate": rate / args.train_rate}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="samples in the synthetic cache")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--text-width", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard (about 250 MB at the defaults)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--workers", type=int, default=4, help="reader processes per loader")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per backend")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches per backend (at least 1)")
    parser.add_argument("--train-rate", type=float, default=600.0, help="one GPU's training img/s at 256px")
    parser.add_argument("--cache", type=Path, help="where to keep the synthetic cache (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {BACKENDS}")
    if args.warmup < 1 or args.batches < 1:
        parser.error("--warmup and --batches must be at least 1")

    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        root = args.cache or Path(scratch)
        try:
            cache = open_cache(root, verify="none")
            reuse = cache.num_samples == args.samples and cache.text_width == args.text_width
        except FileNotFoundError:
            reuse = False
        if not reuse:
            start = time.perf_counter()
            build_synthetic_cache(root, args.samples, args.text_tokens, args.text_width, args.shard_size)
            print(f"wrote a {args.samples}-sample cache to {root} in {time.perf_counter() - start:.1f} s",
                  file=sys.stderr)
        cache = open_cache(root, verify="open")  # hashing every shard also pulls it into the page cache
        results = [measure(cache, backend, args) for backend in backends]

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
        if "skipped" in row:
            print(f"{row['backend']:>9}: skipped ({row['skipped']})")
        else:
            print(f"{row['backend']:>9}: {row['samples_per_s']:9.1f} samples/s  {row['GB_per_s']:6.2f} GB/s  "
                  f"{row['ratio_to_train_rate']:6.2f} x the training rate of {args.train_rate:g} img/s")
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
