"""`python -m train export --ckpt CKPT --to FORMAT DIR`: a checkpoint in another format.

Writes the EMA weights (``--raw``: the raw ones) in a format the checkpoint's model family
exports (engine.family: a family lists its ``exporters``). For a text-to-image transformer,
``diffusers`` writes a folder that loads with diffusers' pipeline together with the VAE, text
encoder, tokenizer and scheduler of the user's choice; a learned null caption has no place
there (diffusers' pipeline encodes the empty prompt for guidance instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="CKPT", help="checkpoint folder, or a run folder (newest)")
    parser.add_argument("--to", required=True, nargs=2, metavar=("FORMAT", "DIR"),
                        help="output format (what the model's family exports, e.g. diffusers) and folder")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")


def main(args: argparse.Namespace) -> int:
    from engine import family
    from train.checkpoint import find_checkpoint, load_model

    fmt, target = args.to
    try:
        folder = find_checkpoint(args.ckpt)
        model = load_model(folder, ema=not args.raw)
        model_family = family.of_model(model)
        if fmt not in model_family.exporters:
            raise ValueError(f"--to {fmt!r}: a {model_family.name!r} checkpoint ({folder}) exports to "
                             f"{list(model_family.exporters) or 'no other format'}")
    except (FileNotFoundError, ValueError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    written = model_family.export(model, fmt, Path(target))
    print(f"wrote {'raw' if args.raw else 'EMA'} weights of {folder} to {target} as {written}")
    return 0
