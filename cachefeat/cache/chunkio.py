"""Direct reads of a local cache's chunk files: the fast path of `CacheReader`'s reads.

Through zarr-python a muon block (2,048 events, 18 MB decoded) read at 0.38 GB/s, while reading
its files and checking their crc32c took 2.3 + 2.7 ms (about 3 GB/s): most of a read was
zarr's per-array and per-codec work (event-loop hops, buffer prototypes, a copy per codec stage,
the shard index) and the reader's concatenation. For the layouts the cache writes (regular chunk
grid, default "/" chunk keys, codecs `bytes(little) [-> blosc] -> crc32c`, no sharding) this
module reads the chunk files itself, straight into the caller's arrays: `os.readv` into the
destination for uncompressed chunks, Blosc decompressing into it otherwise. Every chunk's
crc32c is checked exactly as zarr checks it (over the stored bytes, little-endian, last 4
bytes), and each array's zarr.json against the crc32c its block manifest recorded.

A store that is not a local directory (xrootd, S3: `store`) is read the same way by
`StoreChunks`, one whole-object request per chunk, concurrently, decoded by the same code. A
layout outside that subset (`parse_layout` returns None) is read through zarr (`schema.read_arrays`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from crc32c import crc32c
from numcodecs import blosc
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

CRC_BYTES = 4


class FetchError(Exception):
    """A request for a key failed (the server or the connection, not the data): the cause is chained."""


@dataclass(frozen=True)
class Layout:
    """What a chunk read needs from an array's zarr.json."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    blosc: bool

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape[1:])


def parse_layout(meta: dict) -> Layout | None:
    """The `Layout` of an array's zarr.json, or None for a layout this module does not read."""
    try:
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
            return None
        grid, keys = meta["chunk_grid"], meta["chunk_key_encoding"]
        if grid["name"] != "regular" or keys["name"] != "default":
            return None
        if (keys.get("configuration") or {}).get("separator", "/") != "/":
            return None
        shape = tuple(int(s) for s in meta["shape"])
        chunks = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        if not shape or len(chunks) != len(shape) or chunks[1:] != shape[1:] or chunks[0] < 1:
            return None
        codecs = meta["codecs"]
        names = [c["name"] for c in codecs]
        if names not in (["bytes", "crc32c"], ["bytes", "blosc", "crc32c"]):
            return None
        dtype = np.dtype(meta["data_type"])
        if dtype.itemsize > 1 and (codecs[0].get("configuration") or {}).get("endian", "little") != "little":
            return None
        return Layout(shape, dtype.newbyteorder("<"), chunks[0], names[1] == "blosc")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def chunk_key(index: int, ndim: int) -> str:
    """Key of chunk `index` (along axis 0) of an array, relative to the array."""
    return "c/" + "/".join([str(index)] + ["0"] * (ndim - 1))


def check_crc(body: np.ndarray, stored: np.ndarray, what: str, crc: int | None = None) -> int:
    """Raise ValueError (zarr's message) unless crc32c(body) (or `crc`, computed already) equals the
    little-endian `stored`."""
    if crc is None:
        crc = crc32c(body)
    if crc != int.from_bytes(stored.tobytes(), "little"):
        raise ValueError(f"Stored and computed checksum do not match in {what}")
    return crc


def decode_chunk(buf: np.ndarray, layout: Layout, lo: int, hi: int, dest: np.ndarray, what: str) -> None:
    """Rows [lo, hi) of a chunk whose stored bytes are `buf` (uint8) into `dest`, a contiguous
    uint8 array of (hi - lo) * row_bytes bytes, after checking the chunk's size and crc32c."""
    if len(buf) < CRC_BYTES:
        expected = layout.chunk_rows * layout.row_bytes + CRC_BYTES
        raise ValueError(f"chunk {what} has {len(buf)} bytes, expected {expected}")
    _decode_body(buf[:-CRC_BYTES], buf[-CRC_BYTES:], None, layout, lo, hi, dest, what)


def _decode_body(body: np.ndarray, tail: np.ndarray, crc: int | None, layout: Layout, lo: int, hi: int,
                 dest: np.ndarray, what: str) -> None:
    """`decode_chunk` of a chunk split into its `body` and its stored crc32c `tail`; `crc` is
    crc32c(body) when the caller computed it while reading."""
    rb = layout.row_bytes
    decoded = layout.chunk_rows * rb
    if not layout.blosc and len(body) != decoded:
        raise ValueError(f"chunk {what} has {len(body) + CRC_BYTES} bytes, expected {decoded + CRC_BYTES}")
    check_crc(body, tail, what, crc)
    if not layout.blosc:
        dest[:] = body[lo * rb : hi * rb]
        return
    # Blosc 1 header: version, versionlz, flags, typesize, then nbytes (uint32 LE) at byte 4
    if len(body) < 16 or int.from_bytes(body[4:8].tobytes(), "little") != decoded:
        raise ValueError(f"chunk {what} decodes to the wrong size")
    if lo == 0 and hi == layout.chunk_rows:
        blosc.decompress(body, dest)
    else:
        dest[:] = np.frombuffer(blosc.decompress(body), np.uint8)[lo * rb : hi * rb]


# A chunk file is read in pieces of this size, each piece's crc32c taken while the piece is still
# in the core's cache: whole reads followed by one crc32c pass took 3.25-3.59 ms for the four big
# chunks of a muon block (15.5 MB) against 2.80-3.22 ms in 256 kB pieces (128 kB: 3.23-3.27,
# 1 MB: 3.31-3.43), one thread, the 2-core AMD EPYC VM.
PIECE_BYTES = 256 << 10


def _read_crc(fd: int, body: np.ndarray, what: str) -> int:
    """Fill `body` (uint8) from the file position of `fd` in `PIECE_BYTES` pieces; its crc32c.
    ValueError when the file ends first."""
    crc, n = 0, len(body)
    for start in range(0, n, PIECE_BYTES):
        piece = body[start : start + PIECE_BYTES]
        got = os.readv(fd, [piece])
        if got != len(piece):
            raise ValueError(f"chunk {what}: read {start + got} of {n} bytes")
        crc = crc32c(piece, crc)
    return crc


def read_chunk(path: str, layout: Layout, index: int, lo: int, hi: int, dest: np.ndarray) -> None:
    """Rows [lo, hi) of the local chunk file `path` (chunk `index`) into `dest` (see `decode_chunk`);
    a whole uncompressed chunk is read in place."""
    decoded = layout.chunk_rows * layout.row_bytes
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size < CRC_BYTES:
            raise ValueError(f"chunk {path} has {size} bytes, expected {decoded + CRC_BYTES}")
        in_place = lo == 0 and hi == layout.chunk_rows and not layout.blosc and size == decoded + CRC_BYTES
        body = dest if in_place else np.empty(size - CRC_BYTES, np.uint8)
        crc = _read_crc(f.fileno(), body, path)
        tail = np.empty(CRC_BYTES, np.uint8)
        if os.readv(f.fileno(), [tail]) != CRC_BYTES:
            raise ValueError(f"chunk {path}: read {size - CRC_BYTES} of {size} bytes")
    if in_place:
        check_crc(body, tail, path, crc)
    else:
        _decode_body(body, tail, crc, layout, lo, hi, dest, path)


def checked_layout(raw: bytes | None, key: str, files: dict[str, list]) -> Layout | None:
    """The layout of the array whose zarr.json `key` holds `raw`; ValueError when it is missing or
    differs from its manifest entry in `files`."""
    if raw is None:
        raise ValueError(f"{key} is missing")
    expected = files.get(key)
    if expected is not None and [len(raw), crc32c(raw)] != list(expected):
        raise ValueError(f"Stored and computed checksum do not match: {key} differs from its manifest")
    return parse_layout(json.loads(raw))


def chunk_reads(array_dir: str, layout: Layout, rows: slice, out: np.ndarray) -> list[tuple]:
    """The `read_chunk` calls that fill `out` (C-contiguous, rows `rows` of the array) from `array_dir`."""
    lo, hi = rows.start, rows.stop
    if not 0 <= lo <= hi <= layout.shape[0]:
        raise IndexError(f"rows {lo}-{hi} outside 0..{layout.shape[0]} of {array_dir}")
    if out.shape != (hi - lo, *layout.shape[1:]) or out.dtype != layout.dtype or not out.flags.c_contiguous:
        raise ValueError(f"destination {out.dtype} {out.shape} does not fit rows {lo}-{hi} of {array_dir}")
    dest = out.reshape(-1).view(np.uint8)
    cr, rb, ndim = layout.chunk_rows, layout.row_bytes, len(layout.shape)
    calls = []
    for index in range(lo // cr, -(-hi // cr)):
        a, b = max(lo, index * cr), min(hi, (index + 1) * cr)
        calls.append((f"{array_dir}/{chunk_key(index, ndim)}", layout, index, a - index * cr,
                      b - index * cr, dest[(a - lo) * rb : (b - lo) * rb]))
    return calls


class LocalChunks:
    """Chunk reads of the arrays of a local cache directory, with their layouts kept.

    `files` maps store keys to the [size, crc32c] of the block manifests: an array's zarr.json
    must match its entry before its layout is trusted.
    """

    def __init__(self, root: str | os.PathLike, files: dict[str, list]):
        self.root = os.fspath(root)
        self.files = files
        self._layouts: dict[str, Layout | None] = {}

    def layout(self, path: str) -> Layout | None:
        """The layout of the array at `path` (None: read it through zarr). Raises ValueError when
        its zarr.json differs from the manifest."""
        if path not in self._layouts:
            key = f"{path}/zarr.json"
            with open(os.path.join(self.root, key), "rb") as f:
                self._layouts[path] = checked_layout(f.read(), key, self.files)
        return self._layouts[path]

    def read_into(self, requests: list[tuple[str, slice, np.ndarray]],
                  finish: dict[int, Callable[[], None]] | None = None) -> list[BaseException | None]:
        """Fill each `(array path, rows, out)` request; per request None or the first error.

        `finish[i]()` runs once request i is filled without error, on the thread that read its
        last chunk (so work on a filled request overlaps the reads of others); its error is the
        request's error."""
        calls, owner = [], []
        errors: list[BaseException | None] = [None] * len(requests)
        for i, (path, rows, out) in enumerate(requests):
            try:
                layout = self.layout(path)
                if layout is None:
                    raise NotImplementedError(path)
                found = chunk_reads(os.path.join(self.root, path), layout, rows, out)
            except BaseException as exc:  # noqa: BLE001 - reported per request
                errors[i] = exc
                continue
            calls += found
            owner += [i] * len(found)
        finish = finish or {}
        left = collections.Counter(owner)
        lock = threading.Lock()

        def done(call: int, exc: BaseException | None) -> None:
            i = owner[call]
            with lock:
                if exc is not None and errors[i] is None:
                    errors[i] = exc
                left[i] -= 1
                filled = left[i] == 0 and errors[i] is None
            if filled:
                _finish(finish, i, errors)

        _run(calls, done)
        for i in finish:
            if i not in left and errors[i] is None:  # no chunk to read (no rows)
                _finish(finish, i, errors)
        return errors


def _finish(finish: dict[int, Callable[[], None]], i: int, errors: list) -> None:
    """Run finish[i]() if there is one; its error becomes request i's."""
    if i in finish:
        try:
            finish[i]()
        except Exception as exc:  # noqa: BLE001 - reported per request
            errors[i] = exc


def _call(args) -> BaseException | None:
    try:
        read_chunk(*args)
    except Exception as exc:  # noqa: BLE001 - reported per request
        return exc
    return None


# Local chunk reads in flight at once: at most 4, at most one per usable core (more threads than
# cores made a muon block's read slower: 3.8 ms with 4 threads on 2 cores, 2.6 ms with 2).
READ_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
# A Blosc chunk costs about this many times a plain chunk of as many decoded bytes (lz4 + shuffle:
# 0.13 ms for a 0.4 MB pair-row chunk, 0.55 ms for a plain 3.9 MB embedding chunk, on this Xeon).
BLOSC_COST = 2.5


def _run(calls: list[tuple], done: Callable[[int, BaseException | None], None]) -> None:
    """The chunk reads, each followed by `done(index, its error or None)` on the same thread, on
    up to `READ_THREADS` threads: the calling thread and the kept helper threads (`_Helpers`). The
    read syscalls, Blosc and the crc32c (`crc32c` package) release the GIL, so chunks are read and
    checked in parallel. Each thread gets one share of the chunks, balanced by their cost (largest
    first onto the least loaded share): one task per thread, as a thread pool's per-task overhead
    would cost more than a muon block's small chunks."""
    workers = min(READ_THREADS, len(calls))
    shares: list[list[int]] = [[] for _ in range(max(workers, 1))]
    loads = [0.0] * len(shares)
    for i in sorted(range(len(calls)), key=lambda i: -_cost(calls[i])):
        least = loads.index(min(loads))
        shares[least].append(i)
        loads[least] += _cost(calls[i])

    def work(share: list[int]) -> None:
        for i in share:
            done(i, _call(calls[i]))

    handed = [_HELPERS.submit(k, work, share) for k, share in enumerate(shares[1:]) if share]
    try:
        work(shares[0])
    finally:
        for future in handed:
            future.result()


HELPER_NAME = "cachefeat-chunk-reader"  # the helper threads' names: HELPER_NAME-0, HELPER_NAME-1, ...


class _Helpers:
    """The read helper threads, started on first use and kept (daemon threads, idle on a queue):
    starting a thread per read cost ~0.2 ms on the 2-core VM, a tenth of a whole muon block's
    read. Helper k runs the shares handed to it one after another, so concurrent reads (a stream's
    prefetch thread and the trainer) share the helpers and wait for each other's shares, never
    for more threads than cores. A forked child starts its own (the parent's do not exist there)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queues: list = []
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._queues = []

    def submit(self, k: int, fn, arg) -> Future:
        """Run fn(arg) on helper k (started if needed); its Future holds the result or the error."""
        with self._lock:
            while len(self._queues) <= k:
                tasks: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(tasks,), name=f"{HELPER_NAME}-{len(self._queues)}",
                                 daemon=True).start()
                self._queues.append(tasks)
            tasks = self._queues[k]
        future: Future = Future()
        tasks.put((fn, arg, future))
        return future

    @staticmethod
    def _serve(tasks) -> None:
        while True:
            fn, arg, future = tasks.get()
            error = result = None
            try:
                result = fn(arg)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                error = exc
            # before the caller wakes, drop what refers to the read (its destination arrays,
            # which a read's `ArrayPool` hands out again only once nothing refers to them)
            del fn, arg
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
            del future, result, error


_HELPERS = _Helpers()


def _cost(call: tuple) -> float:
    """A chunk read's relative cost: its destination's bytes, times BLOSC_COST when it is compressed."""
    return call[-1].nbytes * (BLOSC_COST if call[1].blosc else 1)


class StoreChunks:
    """Chunk reads of the arrays of a cache in a zarr Store that is not a local directory (xrootd,
    S3): each chunk is fetched whole with one `get` (one request), up to `concurrency` at a time,
    and decoded and checked by `decode_chunk` as it arrives, straight into the caller's arrays.

    `files` as for `LocalChunks`. Calls run on zarr's event loop (`zarr.core.sync.sync`).
    """

    def __init__(self, store, files: dict[str, list], concurrency: int = 16):
        self.store = store
        self.files = files
        self.concurrency = concurrency
        self._layouts: dict[str, Layout | None] = {}

    def read_into(self, requests: list[tuple[str, slice, np.ndarray]],
                  finish: dict[int, Callable[[], None]] | None = None) -> list[BaseException | None]:
        """Fill each `(array path, rows, out)` request; per request None or the first error
        (NotImplementedError for a layout this module does not read). `finish[i]()` runs once
        request i is filled without error (after all requests); its error is the request's."""
        errors = sync(self._read_into(requests))
        for i in finish or {}:
            if errors[i] is None:
                _finish(finish, i, errors)
        return errors

    async def _get(self, key: str) -> np.ndarray | None:
        """The stored bytes of `key` (uint8, a view of the store's buffer: not copied), None if missing."""
        try:
            buf = await self.store.get(key, prototype=default_buffer_prototype())
        except Exception as exc:
            raise FetchError(f"cannot fetch {key}: {exc}") from exc
        return None if buf is None else buf.as_numpy_array().view(np.uint8).reshape(-1)

    async def _read_into(self, requests) -> list[BaseException | None]:
        errors: list[BaseException | None] = [None] * len(requests)
        unknown = sorted({path for path, _, _ in requests if path not in self._layouts})
        raws = await asyncio.gather(*(self._get(f"{p}/zarr.json") for p in unknown), return_exceptions=True)
        for path, raw in zip(unknown, raws):
            try:
                if isinstance(raw, BaseException):
                    raise raw
                self._layouts[path] = checked_layout(None if raw is None else raw.tobytes(), f"{path}/zarr.json",
                                                     self.files)
            except BaseException as exc:  # noqa: BLE001 - reported per request, not kept
                for i, request in enumerate(requests):
                    if request[0] == path:
                        errors[i] = exc
        calls = []  # (request index, read_chunk arguments)
        for i, (path, rows, out) in enumerate(requests):
            if errors[i] is not None:
                continue
            try:
                layout = self._layouts[path]
                if layout is None:
                    raise NotImplementedError(path)
                calls += [(i, c) for c in chunk_reads(path, layout, rows, out)]
            except BaseException as exc:  # noqa: BLE001 - reported per request
                errors[i] = exc
        limit = asyncio.Semaphore(self.concurrency)

        async def fetch(i, key, layout, index, lo, hi, dest):
            async with limit:
                data = await self._get(key)
            if data is None:
                raise ValueError(f"chunk {key} is missing")
            decode_chunk(data, layout, lo, hi, dest, key)

        results = await asyncio.gather(*(fetch(i, *c) for i, c in calls), return_exceptions=True)
        for (i, _), result in zip(calls, results):
            if isinstance(result, BaseException) and errors[i] is None:
                errors[i] = result
        return errors
