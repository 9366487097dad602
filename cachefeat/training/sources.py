"""Where phase-2 batches come from: the cache (resident or streamed) or the live frozen backbone.

Every source yields this rank's `HeadBatch`es for one epoch, holding only the queries with a
valid target and their pairs (`HeadBatch.with_valid_targets_only`: all a head step reads). The
cache-resident and live sources draw the SAME event batches from `epoch_event_batches`, so the two
paths see identical events in identical order: that is what the equivalence tests compare.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from cachefeat.head.inputs import HeadBatch


def epoch_event_batches(num_events: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                        world: int = 1) -> list[np.ndarray]:
    """This rank's event-index batches for one epoch: a function of (seed, epoch, world) only.

    One permutation per (seed, epoch), cut into global batches of `batch_size * world` events
    (the incomplete tail is dropped); rank r takes the r-th slice of each global batch, so every
    rank gets the same number of batches and 1 process with `batch_size * world` sees the same
    global batches.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(num_events)
    global_size = batch_size * world
    n_batches = num_events // global_size
    return [perm[b * global_size + rank * batch_size: b * global_size + (rank + 1) * batch_size]
            for b in range(n_batches)]


class CacheMemorySource:
    """The whole cache resident in (host or device) memory; batches gathered by index, their sizes
    computed on the host (`ResidentCache.batch`): on a GPU, no batch waits for the GPU."""

    kind = "cached_memory"

    def __init__(self, reader, batch_size: int, seed: int, rank: int, world: int, device="cpu"):
        self.resident = reader.load(device)
        self.num_events = reader.num_events
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world

    def num_batches(self, epoch: int) -> int:
        return self.num_events // (self.batch_size * self.world)

    def batches(self, epoch: int, start: int = 0) -> Iterator[HeadBatch]:
        order = epoch_event_batches(self.num_events, self.batch_size, self.seed, epoch, self.rank, self.world)
        for idx in order[start:]:
            yield self.resident.batch(idx, valid_targets_only=True)


class CacheStreamSource:
    """The cache streamed block-wise from disk with a shuffle buffer and background prefetch."""

    kind = "cached_stream"

    def __init__(self, reader, batch_size: int, seed: int, rank: int, world: int, buffer_blocks: int = 2):
        self.reader = reader
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.buffer_blocks = buffer_blocks

    def num_batches(self, epoch: int) -> int:
        return self.reader.stream_num_batches(self.batch_size, self.seed, epoch, self.world)

    def batches(self, epoch: int, start: int = 0) -> Iterator[HeadBatch]:
        stream = self.reader.stream(self.batch_size, seed=self.seed, epoch=epoch, rank=self.rank,
                                    world=self.world, buffer_blocks=self.buffer_blocks, valid_targets_only=True)
        for i, hb in enumerate(stream):
            if i >= start:
                yield hb


class LiveSource:
    """The live frozen baseline: each batch is read from HDF5 and run through the frozen backbone.

    keep_hits="all" keeps every valid hit in the batch: with the dense head this is the padded
    [B, N, M_all] computation a hepattn user runs today.
    """

    kind = "live_frozen"

    def __init__(self, frozen, events, batch_size: int, seed: int, rank: int, world: int, floor: float,
                 device="cpu", keep_hits: str = "assigned"):
        self.frozen, self.events = frozen, events
        self.num_events = len(events)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.floor = floor
        self.device = device
        self.keep_hits = keep_hits
        self.metric_sums: dict[str, float] = {}

    def num_batches(self, epoch: int) -> int:
        return self.num_events // (self.batch_size * self.world)

    def read(self, idx: np.ndarray) -> dict:
        return {k: v.to(self.device) for k, v in self.events.read(idx).items()}

    def batches(self, epoch: int, start: int = 0) -> Iterator[HeadBatch]:
        order = epoch_event_batches(self.num_events, self.batch_size, self.seed, epoch, self.rank, self.world)
        self.metric_sums = {}
        for idx in order[start:]:
            hb, counts = self.frozen.head_batch(self.read(idx), self.floor, keep_hits=self.keep_hits)
            for key, value in counts.items():
                self.metric_sums[key] = self.metric_sums.get(key, 0.0) + float(np.sum(value))
            yield hb.with_valid_targets_only()


def cache_fits_memory(reader, budget_mb: float) -> bool:
    """Whether the decoded cache (float32 embeddings) fits in `budget_mb` megabytes."""
    decoded = sum(reader.nbytes()["decoded"].values())
    scale = 2 if reader.embed_dtype != "float32" else 1
    return decoded * scale <= budget_mb * 1e6

