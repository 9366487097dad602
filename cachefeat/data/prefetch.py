"""Extraction's padded batches, read ahead of the frozen forward: on a thread or in worker processes.

`block_batches_ahead` yields, block after block in the order asked, each block's padded batches
(`events.block_batches`) while the caller runs the forward on the ones before:

- `workers=0`: one thread of this process reads them (`read_ahead`). HDF5 event files are always
  read this way: `EventFile` reads whole batches with a few array operations, little Python.
- `workers=N >= 1`, for a source that declares `worker_processes = True` (a data module,
  `DataModuleEvents`): N forked processes (torch's `DataLoader`) read whole blocks, block i by
  worker i mod N, and hand them over in order. A data module builds each event in Python
  (hepattn's ATLAS-muon dummy events: ~0.4 ms each on the 2-core VM), which holds the GIL: on a
  thread that work slows the forward's own Python (hepattn's modules on small tensors); in a
  process it runs beside it. A block travels whole (its events are all read before its first batch
  anyway: the batches group events of similar hit counts) as numpy arrays through the worker's
  pipe, one pickle per block, not as shared-memory tensors (one file descriptor each, hundreds
  per block); at most N blocks wait, so memory stays at about N + 1 blocks of padded batches.
  The batches are the thread's: every event is drawn under its own seed, whoever draws it.

An error while reading is raised here, at the block where it happened; in a worker it comes back
as the same exception (or a RuntimeError naming it, when it cannot be pickled) with the worker's
traceback as a note and `ORIGIN_ATTR` naming the library that raised it (`errors.library_of`).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Iterator

import numpy as np
import torch

from cachefeat.errors import ORIGIN_ATTR, library_of

log = logging.getLogger(__name__)


def block_batches_ahead(events, blocks: list[int], block_range: Callable[[int], tuple[int, int]],
                        batch_size: int, depth: int, workers: int = 0) -> Iterator[tuple[int, np.ndarray, dict, bool]]:
    """(block, event indices relative to the block's start, padded batch, whether it is the block's
    last batch) for every batch of `blocks`, in order; `depth` batches read ahead on the thread,
    `workers` processes when the source allows them (see the module docstring)."""
    if workers > 0 and getattr(events, "worker_processes", False) and blocks:
        if sys.platform.startswith("linux"):
            yield from _from_workers(events, blocks, block_range, batch_size, min(workers, len(blocks)))
            return
        log.info("reading events on a thread: worker processes are forked, which needs Linux")
    yield from read_ahead(_batches(events, blocks, block_range, batch_size), depth)


def _batches(events, blocks, block_range, batch_size):
    held = None
    for block in blocks:
        start, stop = block_range(block)
        for local, batch in events.block_batches(start, stop, batch_size):
            if held is not None:
                yield *held, held[0] != block
            held = (block, local, batch)
    if held is not None:
        yield *held, True


def read_ahead(iterable, depth: int):
    """Iterate `iterable` in a background thread, at most `depth` items ahead of the consumer.

    An exception in the thread is raised here, at the item where it happened; closing the
    generator early stops the thread.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in iterable:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # handed to the consumer
            put((end, exc))

    thread = threading.Thread(target=run, name="cachefeat-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class _Blocks(torch.utils.data.IterableDataset):
    """In worker w of n: (block, [(local, {key: numpy array})...], None) for blocks[w::n], or
    (block, None, portable error) at the first failure."""

    def __init__(self, events, blocks, block_range, batch_size):
        self.events, self.blocks, self.block_range, self.batch_size = events, blocks, block_range, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for block in self.blocks[info.id :: info.num_workers]:
            try:
                start, stop = self.block_range(block)
                batches = [(local, {k: v.numpy() for k, v in batch.items()})
                           for local, batch in self.events.block_batches(start, stop, self.batch_size)]
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                yield block, None, _portable(exc)
                return
            yield block, batches, None


def _as_is(item):
    return item


def _from_workers(events, blocks, block_range, batch_size, workers):
    loader = torch.utils.data.DataLoader(
        _Blocks(events, blocks, block_range, batch_size), batch_size=None, num_workers=workers,
        prefetch_factor=1, collate_fn=_as_is, multiprocessing_context="fork",
        generator=torch.Generator(),  # the workers' seeds: not drawn from the global RNG
    )
    it = iter(loader)
    try:
        for expected, (block, batches, error) in zip(blocks, it):
            if error is not None:
                raise error
            if block != expected:
                raise RuntimeError(f"read worker returned block {block} where block {expected} was due")
            for k, (local, batch) in enumerate(batches):
                yield block, local, {key: torch.from_numpy(v) for key, v in batch.items()}, k == len(batches) - 1
    finally:
        it._shutdown_workers()


def _portable(exc: BaseException) -> BaseException:
    """`exc` as it can cross to the parent: picklable, with the worker's traceback as a note and the
    library that raised it (`ORIGIN_ATTR`), which the parent cannot tell from its own traceback."""
    import pickle

    text = "".join(traceback.format_exception(exc))
    origin = library_of(exc)
    try:
        out = pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any exception that does not survive pickling
        out = RuntimeError(f"{type(exc).__name__}: {exc}")
    setattr(out, ORIGIN_ATTR, origin)
    out.add_note(f"raised in a read worker process:\n{text}")
    return out
