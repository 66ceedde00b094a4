"""`python -m train`: the engine's command line (see train/__main__.py for the subcommands)."""
