"""`python -m train prepare`: build a latent cache from images and captions (docs/data.md).

    python -m train prepare --images SRC --out CACHE --vae PATH --text-encoder PATH \\
        [--resolution 256] [--multi-aspect] [--labels] [--max-tokens 120] [--pad-captions] [--strict]

Several processes split the work with ``--rank/--world`` (or torchrun's RANK/WORLD_SIZE);
the last one to finish writes the index, or run ``prepare --out CACHE --merge`` afterwards.
"""

from __future__ import annotations

import argparse
import sys

_TEXT_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", metavar="SRC",
                        help="image folder (with .txt/.json captions or metadata.jsonl), or webdataset .tar(s)")
    parser.add_argument("--out", metavar="CACHE", required=True, help="cache folder to create or resume")
    parser.add_argument("--vae", metavar="PATH",
                        help="local diffusers AutoencoderKL folder, or 'pixels' (no encoder: latents are pixels)")
    parser.add_argument("--text-encoder", metavar="PATH",
                        help="local transformers text encoder + tokenizer folder (optional with --labels)")
    parser.add_argument("--resolution", type=int, default=256,
                        help="square side, or with --multi-aspect the aspect-ratio bucket table (256, 512, 1024)")
    parser.add_argument("--multi-aspect", action="store_true", help="resize to the nearest aspect-ratio bucket")
    parser.add_argument("--labels", action="store_true", help="class labels from folder names (SRC/<class>/<image>)")
    parser.add_argument("--max-tokens", type=int, default=120, help="longest caption kept, in tokens")
    parser.add_argument("--pad-captions", action="store_true",
                        help="keep all --max-tokens positions of every caption, the encoder's outputs at the padding "
                             "included (encoded without an attention mask), for models without a caption mask "
                             "(MicroDiT: --max-tokens 77)")
    parser.add_argument("--device", help="encoder device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder batch")
    parser.add_argument("--shard-size", type=int, default=512, help="source items per shard")
    parser.add_argument("--workers", type=int, help="image decoding threads (default: min(8, CPUs))")
    parser.add_argument("--text-dtype", choices=_TEXT_DTYPES,
                        help="text encoder precision (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--rank", type=int, help="this process's rank (default: $RANK or 0)")
    parser.add_argument("--world", type=int, help="number of processes (default: $WORLD_SIZE or 1)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    parser.add_argument("--merge", action="store_true", help="only write the index from finished shards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    import torch

    from engine.data.build import BadInputError, build_cache, merge_cache

    if args.merge:
        return 0 if merge_cache(args.out) is not None else 1
    missing = [flag for flag, value in (("--images", args.images), ("--vae", args.vae)) if value is None]
    if missing:
        print(f"prepare: {' and '.join(missing)} required (unless --merge)", file=sys.stderr)
        return 2
    try:
        build_cache(args.images, args.out, args.vae, args.text_encoder, resolution=args.resolution,
                    multi_aspect=args.multi_aspect, labels=args.labels, max_tokens=args.max_tokens,
                    device=args.device, batch_size=args.batch_size, shard_size=args.shard_size,
                    rank=args.rank, world=args.world, strict=args.strict, workers=args.workers,
                    text_dtype=getattr(torch, args.text_dtype) if args.text_dtype else None,
                    progress=not args.no_progress, pad_captions=args.pad_captions)
    except (BadInputError, FileNotFoundError, ValueError) as error:
        print(f"prepare: {error}", file=sys.stderr)
        return 2
    return 0
