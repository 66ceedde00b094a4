"""`python -m train export --ckpt CKPT --to diffusers DIR`: a checkpoint as a diffusers model.

Writes the EMA weights (``--raw``: the raw ones) as a ``PixArtTransformer2DModel`` folder
(save_pretrained), which loads in diffusers' ``PixArtAlphaPipeline`` together with the VAE,
T5 text encoder, tokenizer and scheduler of the user's choice. The learned null caption has no
place in the diffusers model: diffusers' pipeline encodes the empty prompt for guidance instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("diffusers",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="CKPT", help="checkpoint folder, or a run folder (newest)")
    parser.add_argument("--to", required=True, nargs=2, metavar=("FORMAT", "DIR"),
                        help=f"output format ({', '.join(FORMATS)}) and folder")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")


def main(args: argparse.Namespace) -> int:
    from engine.interop.diffusers import to_diffusers
    from engine.model import PixArt
    from train.checkpoint import find_checkpoint, load_model

    fmt, target = args.to
    try:
        if fmt not in FORMATS:
            raise ValueError(f"--to {fmt!r}: formats are {list(FORMATS)}")
        folder = find_checkpoint(args.ckpt)
        model = load_model(folder, ema=not args.raw)
        if not isinstance(model, PixArt):
            raise ValueError(f"{folder} holds a {type(model).__name__}; diffusers export is for text-to-image "
                             f"PixArt checkpoints (stages 2 and 3)")
    except (FileNotFoundError, ValueError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    to_diffusers(model).save_pretrained(Path(target))
    weights = "raw" if args.raw else "EMA"
    print(f"wrote {weights} weights of {folder} to {target} as a diffusers PixArtTransformer2DModel")
    return 0
