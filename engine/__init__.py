"""engine: a kernel-optimised training engine for PixArt-α-family diffusion transformers."""

__version__ = "0.1.0"
