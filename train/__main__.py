"""`python -m train <command> ...`: dispatch to one module per subcommand.

Each module named in COMMANDS provides ``add_arguments(parser)`` and ``main(args) -> int``,
and keeps heavy imports inside ``main`` so that ``--help`` stays fast. A new subcommand is
one new module plus one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "prepare": ("train.prepare", "encode images and captions into a latent cache"),
    "run": ("train.run", "train one stage on a latent cache (checkpoints, resume, DDP / FSDP2)"),
    "sample": ("train.sample", "generate images from a checkpoint"),
    "export": ("train.export", "write a checkpoint in another format (what its model family exports)"),
    "demo": ("train.demo", "a three-stage schedule end to end on synthetic data, scored for alignment"),
}


def main(argv: list[str] | None = None) -> int:
    from engine import family

    parser = argparse.ArgumentParser(prog="python -m train", description="Train text-to-image diffusion transformers.",
                                     epilog=f"model families and their presets:\n{family.catalogue()}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        modules[name].add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].main(args)


if __name__ == "__main__":
    sys.exit(main())
