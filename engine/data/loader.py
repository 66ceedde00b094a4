"""Training loaders over a latent cache: DALI and plain PyTorch, one interface, same batches.

Batch plan (both backends): each epoch, samples are shuffled within their bucket with
``numpy.random.default_rng([seed, epoch])``, cut into batches of ``batch_size`` (so a batch holds
one bucket; with ``drop_last`` the incomplete batch of each bucket is dropped), the batches are
shuffled by the same generator, and rank ``r`` takes batches ``r, r + world, ...``. Ranks see
disjoint samples; with ``drop_last=False`` they cover the whole epoch; with ``drop_last=True``
the batch count is trimmed to a multiple of ``world`` so every rank runs the same number of steps.

Latent noise: after a batch arrives on its device, ``latent = mean + std * noise`` with
``noise = torch.randn(..., generator=g)``, ``g`` a generator on that device seeded with
``noise_seed(seed, epoch, batch, rank)`` (``batch`` counts this rank's batches in the epoch). The
draw depends only on those four numbers, so both backends, and a run restored from
``state_dict()``, give the same latents on the same device.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from engine.data.cache import LatentCache, open_cache

BACKENDS = ("dali", "torch")


def noise_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The seed of the noise generator for one batch (a 63-bit integer)."""
    state = np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


class BatchPlan:
    """Which sample ids form each of this rank's batches in an epoch (see the module docstring)."""

    def __init__(self, sample_buckets: np.ndarray, batch_size: int, rank: int, world: int, seed: int,
                 drop_last: bool):
        self.buckets = [np.flatnonzero(sample_buckets == b) for b in np.unique(sample_buckets)]
        self.batch_size, self.rank, self.world, self.seed, self.drop_last = batch_size, rank, world, seed, drop_last
        per_bucket = [len(ids) // batch_size if drop_last else -(-len(ids) // batch_size) for ids in self.buckets]
        total = sum(per_bucket)
        self.total = total - total % world if drop_last else total  # batches of all ranks per epoch
        self.length = len(range(rank, self.total, world))

    def __len__(self) -> int:
        return self.length

    def batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for ids in self.buckets:
            ids = rng.permutation(ids)
            stop = len(ids) - len(ids) % self.batch_size if self.drop_last else len(ids)
            batches += [ids[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]
        order = rng.permutation(len(batches))[:self.total]
        return [batches[i] for i in order[self.rank::self.world]]


def _padded_text(texts: list[np.ndarray], text_len: int, width: int) -> np.ndarray:
    out = np.zeros((len(texts), text_len, width), dtype=np.float16)  # (B, text_len, Ct)
    for i, text in enumerate(texts):
        out[i, :text.shape[0]] = text
    return out


class _TorchBatches(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches (a list of sample ids in, a dict out)."""

    def __init__(self, cache: LatentCache, text_len: int):
        self.cache, self.text_len = cache, text_len

    def __getitem__(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        arrays = self.cache.read(ids, self.text_len)
        arrays["caption"] = _padded_text(arrays.pop("text"), self.text_len, self.cache.text_width)
        return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}


_DALI_DENSE = ("latent_mean", "latent_std", "caption_lens", "label", "resolution", "aspect_ratio", "index")


class _DaliSource:
    """Batch callback for ``fn.external_source``. DALI counts epochs and iterations from the
    pipeline's start; they map to this rank's batch ``start + iteration`` of epoch ``first_epoch``,
    then batch ``iteration`` of each following epoch.

    It holds only the plan's inputs, so it pickles small into DALI's worker processes and
    computes each epoch's batch list there.
    """

    def __init__(self, cache: LatentCache, plan: BatchPlan, first_epoch: int, start: int, text_len: int):
        self.cache, self.plan, self.first_epoch, self.start, self.text_len = cache, plan, first_epoch, start, text_len
        self._epoch, self._batches = None, None

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        k = info.iteration + (self.start if info.epoch_idx == 0 else 0)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.plan.batches(epoch)
        if k >= len(self._batches):
            raise StopIteration
        arrays = self.cache.read(self._batches[k], self.text_len)
        # dense columns go as one array with the batch as outer dimension, text as a list of
        # (L_i, Ct) arrays of different lengths
        columns = [arrays[name] for name in _DALI_DENSE]
        if self.cache.text_width:
            columns.append(arrays["text"])
        return tuple(columns)


class Loader:
    """Iterate to get one epoch of batches (dicts of tensors on ``device``), resuming from the
    saved position; ``state_dict()`` / ``load_state_dict()`` save and restore that position.

    Batch keys: ``latent`` (B, C, h, w) fp32, ``caption`` (B, text_len, Ct) fp16 (the cache's
    precision; zero past each caption's length), ``caption_lens`` (B,) int64, ``label`` (B,) int64
    (-1 without labels), ``resolution`` (B, 2) fp32 original (h, w), ``aspect_ratio`` (B, 1) fp32
    bucket h / w, ``index`` (B,) int64 sample ids.
    """

    def __init__(self, cache: LatentCache, batch_size: int, rank: int, world: int, seed: int, backend: str,
                 text_len: int, drop_last: bool, device: torch.device, workers: int, prefetch: int):
        self.cache, self.backend, self.text_len, self.device = cache, backend, text_len, device
        self.batch_size, self.seed, self.workers, self.prefetch = batch_size, seed, workers, prefetch
        self.plan = BatchPlan(cache.sample_buckets, batch_size, rank, world, seed, drop_last)
        self.epoch, self.batch = 0, 0  # position: the next batch to yield
        self._dali_pipe, self._dali_next = None, None  # live DALI pipeline and the position it delivers next

    def __len__(self) -> int:
        return len(self.plan)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "rank": self.plan.rank,
                "world": self.plan.world, "batch_size": self.batch_size, "drop_last": self.plan.drop_last,
                "num_samples": self.cache.num_samples}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for field in ("seed", "rank", "world", "batch_size", "drop_last", "num_samples"):
            if state.get(field) != mine[field]:
                raise ValueError(f"loader state was saved with {field}={state.get(field)!r}, this loader has "
                                 f"{field}={mine[field]!r}: the saved position would name other batches")
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"loader state batch={state['batch']} is outside this epoch's {len(self)} batches")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self):
        epoch, start = self.epoch, self.batch
        host_batches = self._dali(epoch, start) if self.backend == "dali" else self._torch(epoch, start)
        for k, host in enumerate(host_batches, start):
            batch = self._finish(host, epoch, k)
            self.batch = k + 1
            yield batch
        self.epoch, self.batch = epoch + 1, 0

    def _finish(self, host: dict[str, torch.Tensor], epoch: int, k: int) -> dict[str, torch.Tensor]:
        out = {name: t.to(self.device, non_blocking=True) for name, t in host.items()}
        mean = out.pop("latent_mean").float()  # (B, C, h, w)
        std = out.pop("latent_std").float()  # (B, C, h, w)
        generator = torch.Generator(self.device)
        generator.manual_seed(noise_seed(self.seed, epoch, k, self.plan.rank))
        noise = torch.randn(mean.shape, generator=generator, device=self.device)  # (B, C, h, w)
        out["latent"] = torch.addcmul(mean, std, noise)
        if "caption" not in out:  # a cache without text features
            out["caption"] = torch.zeros(len(mean), self.text_len, 0, dtype=torch.float16, device=self.device)
        return out

    def _torch(self, epoch: int, start: int):
        batches = self.plan.batches(epoch)[start:]
        dataset = _TorchBatches(self.cache, self.text_len)
        if self.workers == 0:
            yield from (dataset[ids] for ids in batches)
            return
        yield from torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=batches, num_workers=self.workers,
            prefetch_factor=self.prefetch, pin_memory=self.device.type == "cuda")

    def _dali(self, epoch: int, start: int):
        if start >= len(self):
            return
        # One pipeline serves consecutive epochs (its Python workers start once); it is rebuilt
        # when iteration resumes anywhere else, e.g. after load_state_dict or a broken-off epoch.
        if self._dali_pipe is None or self._dali_next != (epoch, start):
            self._dali_pipe = None  # release the old pipeline's workers before starting new ones
            self._dali_pipe = self._build_dali(epoch, start)
        pipe, self._dali_next = self._dali_pipe, None
        names = [*_DALI_DENSE, *(["caption"] if self.cache.text_width else [])]
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        try:
            while True:
                try:
                    results = pipe.run()
                except StopIteration:
                    pipe.reset()  # DALI's next epoch
                    self._dali_next = (epoch + 1, 0)
                    return
                # The dynamic executor's outputs own their memory: DLPack hands it to torch without
                # a copy, ordered after DALI's work on torch's current stream (as DALI's own
                # PyTorch iterator does).
                with on_device:
                    host = {name: torch.from_dlpack(out.as_tensor()) for name, out in zip(names, results, strict=True)}
                yield host
        finally:
            if self._dali_next is None and self._dali_pipe is pipe:  # left mid-epoch: batches still queued
                self._dali_pipe = None

    def _build_dali(self, epoch: int, start: int):
        from nvidia.dali import Pipeline, fn, types

        dtypes = [types.FLOAT16, types.FLOAT16, types.INT64, types.INT64, types.FLOAT, types.FLOAT, types.INT64]
        ndims = [3, 3, 0, 0, 1, 1, 0]
        if self.cache.text_width:
            dtypes.append(types.FLOAT16)
            ndims.append(2)
        on_gpu = self.device.type == "cuda"
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, self.workers),
                        device_id=self.device.index if on_gpu else None, exec_dynamic=True,
                        prefetch_queue_depth=self.prefetch, py_num_workers=max(1, self.workers),
                        # spawn: forking a process that has initialised CUDA is unsafe
                        py_start_method="spawn")
        with pipe:
            outputs = fn.external_source(
                source=_DaliSource(self.cache, self.plan, epoch, start, self.text_len), num_outputs=len(dtypes),
                batch=True, batch_info=True, parallel=self.workers > 0, dtype=dtypes, ndim=ndims)
            if on_gpu:
                outputs = [node.gpu() for node in outputs]
            if self.cache.text_width:  # text travels packed at its true length and is padded here
                outputs[-1] = fn.pad(outputs[-1], axes=(0,), shape=(self.text_len,), fill_value=0)
            pipe.set_outputs(*outputs)
        pipe.build()
        return pipe


def make_loader(cache: str | os.PathLike | LatentCache, batch_size: int, rank: int = 0, world: int = 1,
                seed: int = 0, backend: str = "dali", text_len: int = 120, drop_last: bool = True,
                device: str | torch.device | None = None, workers: int = 2, prefetch: int = 2,
                verify: str = "lazy") -> Loader:
    """A loader over a latent cache (a path or an open LatentCache); see Loader for the batches.

    ``workers``: processes that read shards (DALI parallel external source / DataLoader
    workers); 0 reads in the calling process. ``verify`` is passed to open_cache for a path.
    ``device`` defaults to the current CUDA device when there is one, else the CPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("world", world, 1), ("text_len", text_len, 1),
                             ("workers", workers, 0), ("prefetch", prefetch, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank!r}")
    if not isinstance(cache, LatentCache):
        cache = open_cache(cache, verify=verify)
    if cache.num_samples == 0:
        raise ValueError(f"latent cache {cache.path} holds no samples")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    loader = Loader(cache, batch_size, rank, world, seed, backend, text_len, drop_last, device, workers, prefetch)
    if len(loader) == 0:
        raise ValueError(f"latent cache {cache.path} ({cache.num_samples} samples) gives rank {rank} of {world} "
                         f"no batch of {batch_size} with drop_last={drop_last}")
    return loader
