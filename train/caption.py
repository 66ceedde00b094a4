"""`python -m train caption`: dense captions from a vision-language model, then a density report
(docs/caption.md).

    python -m train caption --images SRC --vlm PATH --out DIR [--prompt TEXT] [--batch N] \\
        [--max-new-tokens N] [--sample --temperature T --top-p P --seed S] [--rank R --world W]
    python -m train caption --out DIR --merge
    python -m train caption --out DIR --density [--images SRC]

DIR then reads as a `prepare` source: ``python -m train prepare --images DIR ...``.
"""

from __future__ import annotations

import argparse
import sys

_DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from engine.data.density import TAGGERS

    parser.add_argument("--images", metavar="SRC",
                        help="image folder (with or without captions), metadata.jsonl folder, or webdataset .tar(s)")
    parser.add_argument("--vlm", metavar="PATH",
                        help="local folder of a transformers image-text-to-text model and its processor")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder to write the captions into, or resume")
    parser.add_argument("--prompt",
                        help="instruction given with every image (default: PixArt-α's, see docs/caption.md)")
    parser.add_argument("--batch", type=int, default=16,
                        help="images per generation batch (bench/caption.py measures the best)")
    parser.add_argument("--max-new-tokens", type=int, help="longest caption, in the model's tokens (default 160)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (seeded: --seed)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --sample)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --sample)")
    parser.add_argument("--device", help="model device (default: cuda:$LOCAL_RANK when available, else cpu)")
    parser.add_argument("--dtype", choices=_DTYPES, help="model precision (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--rank", type=int, help="this process's rank (default: $RANK or 0)")
    parser.add_argument("--world", type=int, help="number of processes (default: $WORLD_SIZE or 1)")
    parser.add_argument("--shard-size", type=int, default=512, help="items per unit of the rank split")
    parser.add_argument("--workers", type=int, help="image decoding threads (default: min(8, CPUs))")
    parser.add_argument("--tagger", choices=sorted(TAGGERS), default="pattern",
                        help="part-of-speech tagger of the density report (default: pattern, from textblob)")
    parser.add_argument("--density-limit", type=int, help="captions per side the density report counts, "
                                                          "a fixed-seed sample beyond it (default 100000; 0: all)")
    parser.add_argument("--merge", action="store_true", help="only write the outputs from finished journals")
    parser.add_argument("--density", action="store_true",
                        help="only (re)write the density report of a finished DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _debug_kill_hook():
    """ENGINE_DEBUG_KILL=caption-batch:<n> SIGKILLs the process right after its n-th batch is journaled."""
    from train.checkpoint import debug_kill

    return lambda number: debug_kill("caption-batch", number)


def main(args: argparse.Namespace) -> int:
    import torch

    from engine.data import captioning
    from engine.data.sources import open_source
    from engine.data.vlm import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT, Sampling

    limit = captioning.DENSITY_LIMIT if args.density_limit is None else args.density_limit
    source = open_source(args.images) if args.images is not None and (args.merge or args.density) else None
    if args.merge:
        return 0 if captioning.merge_captions(args.out, source, tagger=args.tagger, density_limit=limit) else 1
    if args.density:
        captioning.density_report(args.out, source, tagger=args.tagger, limit=limit)
        return 0
    missing = [flag for flag, value in (("--images", args.images), ("--vlm", args.vlm)) if value is None]
    if missing:
        print(f"caption: {' and '.join(missing)} required (unless --merge or --density)", file=sys.stderr)
        return 2
    if not args.sample and (args.temperature != 1.0 or args.top_p != 1.0):
        print("caption: --temperature and --top-p apply to --sample only", file=sys.stderr)
        return 2
    sampling = Sampling(True, args.temperature, args.top_p, args.seed) if args.sample else Sampling()
    captioning.caption_source(
        args.images, args.out, args.vlm, prompt=args.prompt or DEFAULT_PROMPT, batch_size=args.batch,
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, sampling=sampling, device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None, rank=args.rank, world=args.world,
        shard_size=args.shard_size, workers=args.workers, progress=not args.no_progress, tagger=args.tagger,
        density_limit=limit, after_batch=_debug_kill_hook())
    return 0
