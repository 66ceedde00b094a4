"""`python -m train <command> ...` (installed also as `engine-train <command> ...`): dispatch to
one module per subcommand.

Each module named in COMMANDS provides ``add_arguments(parser)`` and ``main(args) -> int``,
and keeps heavy imports inside ``main`` so that ``--help`` stays fast. A new subcommand is
one new module plus one line here.

Exit codes, the same for every command (README.md, "Exit codes"):

    0    done
    1    ran, but fell short of its goal: `demo` missed its alignment bar
    2    bad input: arguments, config, data, checkpoint (the message names the file, key or value)
    3    `run` stopped after train.max_nonfinite_steps non-finite steps in a row (train.loop.EXIT_NONFINITE)
    4    the environment failed: an OSError such as a full disk (the message names the path)
    130  interrupted (Ctrl-C)

Commands return 0 to 3 for what they handle themselves; ``main`` maps what escapes them to 2, 4
or 130 with a one-line message on stderr and no traceback. Any other exception keeps its
traceback and Python's status 1: it is a bug or a failure nobody has classified yet. Under
torchrun every rank runs ``main``, so each rank prints its own message.
"""

from __future__ import annotations

import argparse
import importlib
import sys

PROG = "python -m train"

# name -> (module, one-line help)
COMMANDS = {
    "caption": ("train.caption", "dense captions for an image source from a local vision-language model"),
    "prepare": ("train.prepare", "encode images and captions into a latent cache"),
    "run": ("train.run", "train one stage on a latent cache (checkpoints, resume, DDP / FSDP2)"),
    "sample": ("train.sample", "generate images from a checkpoint"),
    "export": ("train.export", "write a checkpoint in another format (what its model family exports)"),
    "demo": ("train.demo", "a three-stage schedule end to end on synthetic data, scored for alignment"),
}

EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 4
EXIT_INTERRUPTED = 130

# Exceptions that mean the user's input is wrong rather than the machine: ConfigError and the
# cache builder's BadInputError are ValueErrors; the OSErrors here name a path that is missing,
# already taken, of the wrong kind or not accessible.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _bad_input_types() -> tuple[type[BaseException], ...]:
    """BAD_INPUT, plus the cache's checksum error once engine.data.cache is loaded (a corrupt
    shard is bad data; looking it up in sys.modules keeps engine.data out of `--help`)."""
    cache = sys.modules.get("engine.data.cache")
    return BAD_INPUT + ((cache.CacheCorruptError,) if cache is not None else ())


def describe(error: BaseException) -> str:
    """One line for ``error``; an OSError from the system reads "No space left on device: PATH"."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
        return f"{error.strerror}: {' -> '.join(paths)}"
    return str(error) or type(error).__name__


def build_parser(prog: str = PROG) -> tuple[argparse.ArgumentParser, dict]:
    """The parser with one subcommand per COMMANDS entry, and the imported command modules."""
    from engine import family

    parser = argparse.ArgumentParser(prog=prog, description="Train text-to-image diffusion transformers.",
                                     epilog=f"model families and their presets:\n{family.catalogue()}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        modules[name].add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    return parser, modules


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the command and return the exit code."""
    where = prog  # the prefix of a message: the command once it is known
    try:
        parser, modules = build_parser(prog)
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:  # --help (0) or a usage error (2); argparse has printed why
            return int(stop.code or 0)
        where = args.command
        return modules[args.command].main(args)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as error:
        if isinstance(error, _bad_input_types()):
            code = EXIT_BAD_INPUT
        elif isinstance(error, OSError):
            code = EXIT_ENVIRONMENT
        else:
            raise
        print(f"{where}: {describe(error)}", file=sys.stderr, flush=True)
        return code


def entry() -> None:
    """The `engine-train` console script: the same CLI, imported from the installed package, so
    a train.py or train/ folder in the working directory cannot stand in for it."""
    sys.exit(main(prog="engine-train"))


if __name__ == "__main__":
    sys.exit(main())
