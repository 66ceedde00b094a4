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

Pipeline. A source yields this rank's host batches from a position ``(epoch, batch)`` on, through
epoch boundaries, each tagged with its position; one source serves epoch after epoch, and the
loader rebuilds it only when asked for a position other than the one it delivers next.

- torch backend: one DataLoader whose worker processes live as long as the source (starting them
  every epoch would idle the GPU for each epoch's first batches). Its sampler walks the plan
  epoch after epoch. A worker reads a whole batch from the memory-mapped shards straight into
  tensors in shared memory, each caption into its row of the padded (B, text_len, Ct) tensor,
  so the batch reaches the main process without a copy: at 120 x 4096 fp16 features the text is
  0.94 MiB a sample, and every host copy of it costs bandwidth the reader needs. On CUDA the
  DataLoader's pin-memory thread copies it into pinned memory, from which the device copy runs
  asynchronously.
- dali backend: one pipeline (its Python workers start once) whose one DALI epoch never ends: its
  source maps DALI's iteration count to positions across the plan's epochs, so the pipeline reads
  ahead over an epoch boundary instead of being reset there (a reset restarts its prefetch, which
  the training step then waits for). A GPU pipeline delivers on the device; a CPU pipeline
  delivers host batches.

Device prefetch. The loader keeps one batch ahead: when the consumer takes batch k, batch k + 1
is already on its way. On a CUDA device a thread of the loader (the stager) takes batch k + 1
from the source while the consumer works on batch k, so the host time of that call (the DALI
pipeline's run and its hand-over to torch, or the DataLoader's queue) is spent beside the step
rather than in it; the batch is copied to the device (or, from a DALI GPU pipeline, taken over
from DALI's stream) and its latent drawn on a side stream, so that work overlaps the consumer's
compute instead of queueing behind it on the training stream. The consumer's current stream
waits on that work's event when it takes the batch, and the batch's tensors are
``record_stream``-ed to it so the caching allocator keeps them until the consumer's work is
done (a DALI GPU batch is copied out of DALI's memory, which the allocator does not track, and
DALI gets that memory back once the copy is done). On the CPU nothing is asynchronous (unless ``stage_thread`` asks for the stager): batch
k + 1 is finished before batch k is returned.

``Loader.epoch`` / ``Loader.batch`` (and ``state_dict()``) name the next batch the consumer
takes, not the one in flight, so a checkpoint saved between steps resumes with exactly the batch
that step would have taken.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from concurrent import futures

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


class _Positions:
    """The DataLoader's sampler: this rank's batches from batch ``start`` of ``epoch`` on, epoch
    after epoch without end, each as ``(epoch, k, sample ids)``."""

    def __init__(self, plan: BatchPlan, epoch: int, start: int):
        self.plan, self.epoch, self.start = plan, epoch, start

    def __iter__(self):
        epoch, start = self.epoch, self.start
        while True:
            batches = self.plan.batches(epoch)
            for k in range(start, len(batches)):
                yield epoch, k, batches[k]
            epoch, start = epoch + 1, 0


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor; ``shared`` places it in shared memory, from where a worker's
    result reaches the main process without a copy (a tensor in private memory is copied into
    shared memory when the worker sends it). The storage is made shared from the start, as
    torch's default_collate does for its worker batches: ``share_memory_()`` would copy the
    uninitialised bytes."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


class _TorchBatches(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: ``(epoch, k, sample ids)`` in,
    ``(epoch, k, dict of tensors)`` out, the position passed through so the loader knows which
    batch arrived."""

    def __init__(self, cache: LatentCache, text_len: int):
        self.cache, self.text_len = cache, text_len

    def __getitem__(self, position: tuple[int, int, np.ndarray]) -> tuple[int, int, dict[str, torch.Tensor]]:
        epoch, k, ids = position
        shared = torch.utils.data.get_worker_info() is not None
        arrays = self.cache.read(ids, self.text_len)
        texts = arrays.pop("text")  # views of the memory-mapped shard: nothing copied yet
        batch = {}
        for name, array in arrays.items():  # small: latent mean / std are 16 KiB a sample
            source = torch.from_numpy(np.ascontiguousarray(array))
            batch[name] = _empty(source.shape, source.dtype, shared).copy_(source) if shared else source
        caption = _empty((len(texts), self.text_len, self.cache.text_width), torch.float16, shared)
        rows = caption.numpy()  # (B, text_len, Ct)
        for row, text in zip(rows, texts, strict=True):
            row[:len(text)] = text  # the one host copy of the features before pinning
            row[len(text):] = 0
        batch["caption"] = caption
        return epoch, k, batch


class _TorchSource:
    """``(epoch, k, host batch)`` from ``positions`` on, without end: read by the thread that
    iterates (``workers == 0``) or by one DataLoader's worker processes. The workers start here,
    in the thread that builds the source (a process forked from the loader's stager thread would
    inherit that thread as its main one, which its exit handlers then try to join), and live
    until ``close()``."""

    def __init__(self, dataset: _TorchBatches, positions: _Positions, workers: int, prefetch: int, pin_memory: bool):
        if workers == 0:
            self.batches, self.dataloader = map(dataset.__getitem__, positions), None
        else:
            self.dataloader = iter(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=positions,
                                                               num_workers=workers, prefetch_factor=prefetch,
                                                               pin_memory=pin_memory))
            self.batches = self.dataloader

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, int, dict[str, torch.Tensor]]:
        return next(self.batches)

    def close(self) -> None:
        if self.dataloader is not None:  # the workers and the pin-memory thread stop now, not when collected
            self.dataloader._shutdown_workers()
            self.dataloader = None


_DALI_DENSE = ("latent_mean", "latent_std", "caption_lens", "label", "resolution", "aspect_ratio", "index")


class _DaliSource:
    """Batch callback for ``fn.external_source``. It never ends an epoch for DALI: the pipeline's
    iteration i is this rank's batch ``start + i`` counted from batch 0 of ``first_epoch``, across
    epochs (every epoch holds len(plan) batches), so the pipeline reads ahead over an epoch's end
    instead of restarting there.

    It holds only the plan's inputs, so it pickles small into DALI's worker processes and
    computes each epoch's batch list there.
    """

    def __init__(self, cache: LatentCache, plan: BatchPlan, first_epoch: int, start: int, text_len: int):
        self.cache, self.plan, self.first_epoch, self.start, self.text_len = cache, plan, first_epoch, start, text_len
        self._epoch, self._batches = None, None

    def position(self, iteration: int) -> tuple[int, int]:
        """(epoch, k) of the pipeline's ``iteration``."""
        epochs, k = divmod(self.start + iteration, len(self.plan))
        return self.first_epoch + epochs, k

    def __call__(self, info):
        epoch, k = self.position(info.iteration)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.plan.batches(epoch)
        arrays = self.cache.read(self._batches[k], self.text_len)
        # dense columns go as one array with the batch as outer dimension, text as a list of
        # (L_i, Ct) arrays of different lengths
        columns = [arrays[name] for name in _DALI_DENSE]
        if self.cache.text_width:
            columns.append(arrays["text"])
        return tuple(columns)


def _build_dali(source: _DaliSource, batch_size: int, text_len: int, text_width: int, workers: int, prefetch: int,
                device_id: int | None):
    """A DALI pipeline around ``source``; ``device_id`` None builds a CPU pipeline."""
    from nvidia.dali import Pipeline, fn, types

    dtypes = [types.FLOAT16, types.FLOAT16, types.INT64, types.INT64, types.FLOAT, types.FLOAT, types.INT64]
    ndims = [3, 3, 0, 0, 1, 1, 0]
    if text_width:
        dtypes.append(types.FLOAT16)
        ndims.append(2)
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, workers), device_id=device_id, exec_dynamic=True,
                    prefetch_queue_depth=prefetch, py_num_workers=max(1, workers),
                    # spawn: forking a process that has initialised CUDA is unsafe
                    py_start_method="spawn")
    with pipe:
        outputs = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, batch_info=True,
                                     parallel=workers > 0, dtype=dtypes, ndim=ndims)
        if device_id is not None:
            outputs = [node.gpu() for node in outputs]
        if text_width:  # text travels packed at its true length and is padded here
            outputs[-1] = fn.pad(outputs[-1], axes=(0,), shape=(text_len,), fill_value=0)
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


class _DaliBatches:
    """``(epoch, k, batch)`` from batch ``start`` of ``epoch`` on, without end, from one pipeline
    whose one DALI epoch never ends (_DaliSource). The pipeline (and its Python workers) starts
    here, in the thread that builds the source, and is released by ``close()``."""

    def __init__(self, cache: LatentCache, plan: BatchPlan, epoch: int, start: int, text_len: int, workers: int,
                 prefetch: int, device_id: int | None):
        self.source = _DaliSource(cache, plan, epoch, start, text_len)
        self.pipe = _build_dali(self.source, plan.batch_size, text_len, cache.text_width, workers, prefetch, device_id)
        self.names = [*_DALI_DENSE, *(["caption"] if cache.text_width else [])]
        self.device_id, self.iteration = device_id, 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, int, dict[str, torch.Tensor]]:
        results = self.pipe.run()
        # The dynamic executor's outputs own their memory: DLPack hands it to torch without a
        # copy, ordered after DALI's work on torch's current stream (as DALI's own PyTorch
        # iterator does).
        with torch.cuda.device(self.device_id) if self.device_id is not None else contextlib.nullcontext():
            batch = {name: torch.from_dlpack(out.as_tensor()) for name, out in zip(self.names, results, strict=True)}
        epoch, k = self.source.position(self.iteration)
        self.iteration += 1
        return epoch, k, batch

    def close(self) -> None:
        self.pipe = None


class Loader:
    """Iterate to get one epoch of batches (dicts of tensors on ``device``), resuming from the
    saved position; ``state_dict()`` / ``load_state_dict()`` save and restore that position.
    ``close()`` stops the reading processes (they also stop when the loader is collected or the
    interpreter exits); iterating again starts them anew.

    Batch keys: ``latent`` (B, C, h, w) fp32, ``caption`` (B, text_len, Ct) fp16 (the cache's
    precision; zero past each caption's length), ``caption_lens`` (B,) int64, ``label`` (B,) int64
    (-1 without labels), ``resolution`` (B, 2) fp32 original (h, w), ``aspect_ratio`` (B, 1) fp32
    bucket h / w, ``index`` (B,) int64 sample ids.
    """

    def __init__(self, cache: LatentCache, batch_size: int, rank: int, world: int, seed: int, backend: str,
                 text_len: int, drop_last: bool, device: torch.device, workers: int, prefetch: int,
                 dali_device: str | None = None, stage_thread: bool | None = None):
        self.cache, self.backend, self.text_len, self.device = cache, backend, text_len, device
        self.batch_size, self.seed, self.workers, self.prefetch = batch_size, seed, workers, prefetch
        self.dali_device = dali_device or ("gpu" if device.type == "cuda" else "cpu")  # see make_loader
        self._dali_gpu = backend == "dali" and self.dali_device == "gpu"  # batches in DALI's device memory
        self.plan = BatchPlan(cache.sample_buckets, batch_size, rank, world, seed, drop_last)
        self.epoch, self.batch = 0, 0  # position: the next batch the consumer takes
        # batches bound for CUDA are finished on this stream (module docstring)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        stage_thread = device.type == "cuda" if stage_thread is None else stage_thread
        self._stager = futures.ThreadPoolExecutor(1, thread_name_prefix="loader-stage") if stage_thread else None
        self._source = None  # iterator of (epoch, k, batch), delivering the position after self._ahead's
        self._ahead = None  # Future of (position, finished batch, event or None): the next batch to hand over
        self._ahead_position = None  # the position self._ahead delivers
        self._stop_source = None  # weakref.finalize closing self._source
        # A DALI GPU batch's own tensors (DALI's memory, which torch's allocator does not track) and
        # the copy-stream event after which nothing reads them: held until the next batch is staged.
        self._dali_held = None

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
        while self.batch < len(self):
            yield self._next()  # held by no local here: the consumer's reference is the last one
        self.epoch, self.batch = self.epoch + 1, 0

    def peek(self, count: int) -> dict[str, torch.Tensor]:
        """A batch of ``count`` samples of the largest bucket, read in this process and finished on
        the device like any batch, without moving the position or touching the source: what a
        memory probe of the step runs on (train.recompute)."""
        buckets = self.cache.sample_buckets
        values, sizes = np.unique(buckets, return_counts=True)
        ids = np.flatnonzero(buckets == values[np.argmax(sizes)])[:count]
        if len(ids) < count:
            raise ValueError(f"latent cache {self.cache.path}: its largest bucket holds {len(ids)} samples, "
                             f"fewer than {count}")
        _, _, host = _TorchBatches(self.cache, self.text_len)[(0, 0, ids)]
        return self._finish(host, 0, 0)

    def close(self) -> None:
        """Stop the source (its worker processes or DALI pipeline) and drop the batch in flight."""
        if self._ahead is not None:  # a batch being staged leaves the source before it is closed
            futures.wait([self._ahead])
        self._ahead = self._ahead_position = None
        self._release_dali()
        if self._stop_source is not None:
            self._stop_source()
        self._source = self._stop_source = None

    def _next(self) -> dict[str, torch.Tensor]:
        """The batch at the position, after starting the next one on its way; then the position
        moves on. The live source is kept whenever it delivers the position (consecutive epochs,
        a loop broken off and resumed); any other position (load_state_dict, an epoch skipped)
        starts a new one. A failed read ends the source; iterating again restarts at the
        position."""
        position = (self.epoch, self.batch)
        if self._ahead is None or self._ahead_position != position:  # (a staged batch or error of another position is dropped)
            self._start(position)
        try:
            staged = self._ahead.result()
        except BaseException:
            self.close()
            raise
        epoch, batch = position
        self._request((epoch, batch + 1) if batch + 1 < len(self) else (epoch + 1, 0))
        self.batch += 1
        return self._hand_over(staged)

    def _request(self, position: tuple[int, int]) -> None:
        """Stage the source's next batch, the one at ``position``: on the stager thread, which reads,
        copies and finishes it while the consumer works, or at once in this thread (where an
        interrupt is raised at once; an error is raised when the batch is taken)."""
        self._ahead_position = position
        if self._stager is not None:
            self._ahead = self._stager.submit(self._stage_next, self._source)
            return
        self._ahead = futures.Future()
        try:
            self._ahead.set_result(self._stage_next(self._source))
        except Exception as error:
            self._ahead.set_exception(error)

    def _start(self, position: tuple[int, int]) -> None:
        self.close()  # release the old source's workers before starting new ones
        epoch, start = position
        if self.backend == "dali":
            device_id = self.device.index if self._dali_gpu else None
            source = _DaliBatches(self.cache, self.plan, epoch, start, self.text_len, self.workers, self.prefetch,
                                  device_id)
        else:
            source = _TorchSource(_TorchBatches(self.cache, self.text_len), _Positions(self.plan, epoch, start),
                                  self.workers, self.prefetch, pin_memory=self.device.type == "cuda")
        # The finalizer holds the source, not the loader: a loader nobody closes still stops its
        # workers when it is collected, and at interpreter exit.
        self._source, self._stop_source = source, weakref.finalize(self, source.close)
        self._request(position)

    def _stage_next(self, source):
        """The source's next batch, finished: (position, batch, event or None). Bound for CUDA, it
        is read (a DALI GPU batch taken over from DALI's stream), copied and finished on the copy
        stream, whose event the consumer waits on; on the CPU, at once."""
        if self._copy_stream is None:
            epoch, k, host = next(source)
            return (epoch, k), self._finish(host, epoch, k), None
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            epoch, k, host = next(source)
            batch = self._finish(host, epoch, k)
            event = self._copy_stream.record_event()
            if self._dali_gpu:
                self._release_dali()
                self._dali_held = (event, host)
            return (epoch, k), batch, event

    def _release_dali(self) -> None:
        """Let DALI have the memory of the last DALI GPU batch once the copy stream's work on it
        (the copies _finish made) is done."""
        if self._dali_held is not None:
            self._dali_held[0].synchronize()
            self._dali_held = None

    def _hand_over(self, staged) -> dict[str, torch.Tensor]:
        _, batch, event = staged
        if event is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(event)
            for tensor in batch.values():  # made on the copy stream, used on the consumer's
                tensor.record_stream(consumer)
        return batch

    def _finish(self, host: dict[str, torch.Tensor], epoch: int, k: int) -> dict[str, torch.Tensor]:
        """The batch the consumer gets, in memory of torch's allocator (a DALI GPU batch's tensors
        are copied out of DALI's, whose reuse record_stream cannot hold back), latent drawn."""
        out = {name: t.to(self.device, non_blocking=True) for name, t in host.items()}
        mean = out.pop("latent_mean").float()  # (B, C, h, w)
        std = out.pop("latent_std").float()  # (B, C, h, w)
        if self._dali_gpu:
            out = {name: t.clone() for name, t in out.items()}
        generator = torch.Generator(self.device)
        generator.manual_seed(noise_seed(self.seed, epoch, k, self.plan.rank))
        noise = torch.randn(mean.shape, generator=generator, device=self.device)  # (B, C, h, w)
        out["latent"] = torch.addcmul(mean, std, noise)
        if "caption" not in out:  # a cache without text features
            out["caption"] = torch.zeros(len(mean), self.text_len, 0, dtype=torch.float16, device=self.device)
        return out


def make_loader(cache: str | os.PathLike | LatentCache, batch_size: int, rank: int = 0, world: int = 1,
                seed: int = 0, backend: str = "dali", text_len: int = 120, drop_last: bool = True,
                device: str | torch.device | None = None, workers: int = 2, prefetch: int = 2,
                verify: str = "lazy", dali_device: str | None = None, stage_thread: bool | None = None) -> Loader:
    """A loader over a latent cache (a path or an open LatentCache); see Loader for the batches.

    ``workers``: processes that read shards (DALI parallel external source / DataLoader
    workers); 0 reads in the calling process. ``prefetch``: batches each worker (DataLoader) or
    the pipeline (DALI) reads ahead. ``verify`` is passed to open_cache for a path.
    ``device`` defaults to the current CUDA device when there is one, else the CPU.
    ``dali_device``: where a DALI pipeline delivers, ``"gpu"`` (the default on a CUDA device) or
    ``"cpu"`` (a CPU pipeline; on a CUDA device the loader copies its batches there).
    ``stage_thread``: stage the next batch on a thread of its own while the consumer works (see
    Device prefetch in the module docstring); None (the default) does so on a CUDA device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("world", world, 1), ("text_len", text_len, 1),
                             ("workers", workers, 0), ("prefetch", prefetch, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank!r}")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dali_device not in (None, "gpu", "cpu") or (dali_device == "gpu" and device.type != "cuda"):
        raise ValueError(f"dali_device must be 'gpu' (with a CUDA device) or 'cpu', got {dali_device!r} with "
                         f"device {device}")
    if not isinstance(cache, LatentCache):
        cache = open_cache(cache, verify=verify)
    if cache.num_samples == 0:
        raise ValueError(f"latent cache {cache.path} holds no samples")
    if stage_thread not in (None, True, False):
        raise ValueError(f"stage_thread must be True, False or None, got {stage_thread!r}")
    loader = Loader(cache, batch_size, rank, world, seed, backend, text_len, drop_last, device, workers, prefetch,
                    dali_device, stage_thread)
    if len(loader) == 0:
        raise ValueError(f"latent cache {cache.path} ({cache.num_samples} samples) gives rank {rank} of {world} "
                         f"no batch of {batch_size} with drop_last={drop_last}")
    return loader
