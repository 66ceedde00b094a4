"""Data: the latent cache (built by `python -m train prepare`), its loaders, and demo data.

- ``open_cache(path)``: a built cache's metadata and samples (engine.data.cache);
- ``make_loader(cache, batch_size, ...)``: DALI or plain-PyTorch training batches (engine.data.loader);
- ``engine.data.demo``: a deterministic synthetic captioned dataset;
- ``engine.data.buckets``, ``sources``, ``images``, ``encode``: the pieces `prepare` is built from.
"""

from engine.data.cache import CacheCorruptError, CacheIndexError, LatentCache, open_cache
from engine.data.loader import Loader, make_loader

__all__ = ["CacheCorruptError", "CacheIndexError", "LatentCache", "Loader", "make_loader", "open_cache"]
