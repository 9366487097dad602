"""Streaming a cache block by block, for caches that do not fit in memory.

Blocks are visited in a (seed, epoch) permutation and split over the ranks (rank r takes
blocks[r::world]); events are shuffled within a buffer of a few blocks, which a background
thread (`_Prefetch`) reads ahead. `CacheReader.stream` and `CacheReader.stream_num_batches`
call the functions here.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator

import numpy as np

from cachefeat.cache import schema
from cachefeat.cache.pool import ArrayPool
from cachefeat.cache.resident import ResidentCache
from cachefeat.head.inputs import HeadBatch, concat

log = logging.getLogger(__name__)


# --- the split over epochs and ranks (no data read) -----------------------------------------


def block_order(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits the blocks: a `default_rng((seed, epoch))` permutation."""
    return np.random.default_rng((seed, epoch)).permutation(num_blocks)


def rank_blocks(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s blocks of an epoch's `order`: every world-th block from the rank-th."""
    return order[rank::world]


def stream_num_batches(reader, batch_size: int, seed: int, epoch: int, world: int = 1,
                       drop_last: bool = True) -> int:
    """How many batches `stream_batches` yields on every rank for these settings: the smallest
    count over the ranks."""
    order = block_order(reader.num_blocks, seed, epoch)
    bounds = np.minimum(np.arange(reader.num_blocks + 1) * reader.block_size, reader.num_events)
    sizes = np.diff(bounds)  # events per block
    per_rank = [int(sizes[rank_blocks(order, r, world)].sum()) for r in range(world)]
    return min(n // batch_size if drop_last else math.ceil(n / batch_size) for n in per_rank)


# --- the stream -----------------------------------------------------------------------------


def stream_batches(
    reader,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    buffer_blocks: int = 2,
    prefetch: int = 2,
    drop_last: bool = True,
    valid_targets_only: bool = False,
) -> Iterator[HeadBatch]:
    """Batches of `reader`'s cache read block by block.

    Blocks are visited in `block_order(seed, epoch)`; rank r takes `rank_blocks(order, r, world)`.
    Events are shuffled within a buffer of `buffer_blocks` blocks (leftovers carry into the
    next buffer); a background thread reads `prefetch` buffers ahead. Every rank yields the
    same number of batches, `stream_num_batches(...)` (full batches only with `drop_last`,
    else including each rank's last partial batch). The order is a function of (seed, epoch,
    rank, world, buffer_blocks) only. With `valid_targets_only` every batch holds only the
    queries with a valid target and their pairs (`ResidentCache.batch`): the same batches as
    `.with_valid_targets_only()` of each, gathered once per buffer instead of masked per batch.
    """
    if batch_size < 1 or buffer_blocks < 1 or not 0 <= rank < world:
        raise ValueError("batch_size and buffer_blocks must be >= 1 and 0 <= rank < world")
    count = stream_num_batches(reader, batch_size, seed, epoch, world, drop_last)
    if count == 0:
        log.warning("stream of %s yields no batch for batch size %d and %d ranks", schema.describe(reader.path),
                    batch_size, world)
    mine = rank_blocks(block_order(reader.num_blocks, seed, epoch), rank, world)
    groups = [mine[i : i + buffer_blocks].tolist() for i in range(0, len(mine), buffer_blocks)]
    rng = np.random.default_rng((seed, epoch, rank, world))
    return _batches(reader, groups, batch_size, count, rng, prefetch, valid_targets_only)


def _batches(reader, groups, batch_size, count, rng, prefetch, valid_only) -> Iterator[HeadBatch]:
    if count == 0:
        return
    # one read per group, straight into the buffer's arrays (no concatenation of blocks), and the
    # buffer's gather indices, both in the prefetch thread; a buffer's arrays are reused by a later
    # read once the buffer is gone (batches are gathered copies), so reads write warm memory
    pool = ArrayPool()
    loader = _Prefetch(lambda group: ResidentCache(reader.read_blocks(group, pool)), groups, prefetch)
    emitted, carry = 0, None
    try:
        for buffer in loader:
            # the buffer is [carry events, then the loaded ones in a random order]; only the
            # first batch can hold carried events, so it alone is concatenated
            n_carry = 0 if carry is None else carry.num_events
            order = rng.permutation(buffer.num_events)
            pos = 0
            if n_carry and emitted < count and n_carry + len(order) >= batch_size:
                pos = batch_size - n_carry
                yield concat([carry, buffer.batch(order[:pos], valid_only)])
                emitted += 1
                carry = None
            elif n_carry:
                carry = concat([carry, buffer.batch(order, valid_only)])
                continue
            while emitted < count and len(order) - pos >= batch_size:
                yield buffer.batch(order[pos : pos + batch_size], valid_only)
                pos += batch_size
                emitted += 1
            if emitted == count:
                return
            carry = buffer.batch(order[pos:], valid_only)
        if emitted < count and carry is not None and carry.num_events:
            yield carry
    finally:
        loader.close()


class _Prefetch:
    """Run `load(group)` for each group in a background thread, up to `depth` results ahead."""

    _DONE = object()

    def __init__(self, load, groups, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(load, groups), name="cachefeat-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, load, groups) -> None:
        try:
            for group in groups:
                if not self._put(load(group)):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
