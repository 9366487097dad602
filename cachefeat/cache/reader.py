"""`CacheReader`: validated reads of a complete cache as `HeadBatch`es.

Opening checks the format version, completeness and (by default) that every file listed in
the block manifests is present with its recorded size, so a deleted or truncated chunk is
refused instead of reading as zeros. A chunk whose bytes changed fails its crc32c when read,
reported as a `UserError` naming the array and the events it covers. Opening reads every
block's per-event arrays (`schema.event_arrays`: offsets, event ids, metrics), so a training run
reads and checks every array the cache stores. The chunks are read by `chunkio`, straight into
the output arrays: from a local directory with direct file reads, from a URL (`store`: xrootd,
S3) with one concurrent request per chunk.

Event order is the input's: cache event i is input event i. Embeddings come back in their
storage dtype (`HeadBatch.float()` widens them, on the device); integer columns as int64.

A reader hands out the whole cache in memory (`load`, a `resident.ResidentCache`) or streams
it block by block (`stream`, see `stream`); `summary.cache_summary` reports on it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from zarr.abc.store import Store

from cachefeat.cache import schema
from cachefeat.cache.chunkio import FetchError, LocalChunks, StoreChunks
from cachefeat.cache.pool import ArrayPool
from cachefeat.cache.resident import ResidentCache
from cachefeat.cache.store import describe, is_url, open_store
from cachefeat.cache.stream import stream_batches, stream_num_batches
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch


class CacheReader:
    """A complete cache, opened read-only.

    Attributes:
        path, fingerprint, settings, raw_fields, particle_fields, dim, embed_dtype,
        num_events (E), num_blocks, block_size, metric_names: from the root attributes.
        metadata_checksummed: whether checksums.json covered the root and manifests (it was checked).
        hit_counts, query_counts, pair_counts, event_id: int64 [E].
    """

    def __init__(self, path, check_files: bool = True):
        self.path = path
        self._where = describe(path)
        if not isinstance(path, Store) and not is_url(path) and not Path(path).is_dir():
            raise UserError(f"no cache at {self._where}")
        self._store, local = open_store(path, read_only=True)
        self._arrays: dict = {}  # arrays opened by earlier reads (see schema.read_arrays)
        metadata = schema.checked_metadata(self._store, self._where)  # the root's and blocks' zarr.json
        self.metadata_checksummed = bool(metadata)  # False: completed before checksums.json existed
        attrs = schema.node_attributes(self._store, [""], metadata)[0]
        if attrs is None and is_url(path):
            raise UserError(f"no cache at {self._where}")
        if attrs is None or "format_version" not in attrs:
            raise UserError(
                f"{self._where} is not a cachefeat cache (no format_version in its root zarr.json)"
            )
        if attrs["format_version"] != schema.FORMAT_VERSION:
            raise UserError(
                f"cache {self._where} has format version {attrs['format_version']}, this cachefeat reads "
                f"version {schema.FORMAT_VERSION}: re-extract it with --overwrite"
            )
        self.attrs = attrs
        for name in ("fingerprint", "settings", *schema.LAYOUT_ATTRS[1:]):
            setattr(self, name, attrs[name])
        self.num_blocks = schema.num_blocks(self.num_events, self.block_size)
        self._manifests = schema.node_attributes(
            self._store, [schema.block_key(b) for b in range(self.num_blocks)], metadata
        )
        committed = [bool(m and m.get("committed")) for m in self._manifests]
        if not attrs.get("complete"):
            raise UserError(
                f"cache {self._where} is incomplete ({sum(committed)}/{self.num_blocks} blocks committed): "
                "resume with `cachefeat extract ... --resume`"
            )
        if not all(committed):
            block = committed.index(False)
            raise UserError(
                f"cache {self._where} is damaged: block {block} is not committed ({self._events_text(block)})"
            )
        if check_files:
            self._check(content=False)
        files = {}  # store key -> [size, crc32c], every block's manifest
        for block, manifest in enumerate(self._manifests):
            files.update(schema.prefixed(schema.block_key(block), manifest["files"]))
        self._chunks = LocalChunks(local, files) if local is not None else StoreChunks(self._store, files)
        self._cols = {"F": len(self.raw_fields), "D": self.dim, "T": len(self.particle_fields)}
        self._read_event_arrays()

    def _read_event_arrays(self) -> None:
        """Read every block's per-event arrays; set the counts, event ids, offsets and metrics."""
        keys = schema.event_arrays(self.metric_names)
        requests = []
        for block in range(self.num_blocks):
            start, stop = schema.block_range(block, self.num_events, self.block_size)
            what = self._events_text(block)
            for key in keys:
                n = stop - start + (key in schema.OFFSET_ARRAYS.values())
                requests.append((f"{schema.block_key(block)}/{key}", slice(0, n), what, np.empty(n, np.int64)))
        self._read_into(requests)
        values = {key: [r[3] for r in requests[i :: len(keys)]] for i, key in enumerate(keys)}
        counts = {}
        for sym, key in schema.OFFSET_ARRAYS.items():
            for block, off in enumerate(values[key]):
                expected = self._manifests[block]["counts"].get(schema.COUNT_NAMES[sym])
                if off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != expected:
                    raise UserError(
                        f"cache {self._where} is damaged: {schema.block_key(block)}/{key} does not end at the "
                        f"manifest's {expected} {schema.COUNT_NAMES[sym]} ({self._events_text(block)}); "
                        "re-extract it with --overwrite"
                    )
            counts[sym] = np.concatenate([np.diff(off) for off in values[key]] or [np.zeros(0, np.int64)])
        self.hit_counts, self.query_counts, self.pair_counts = counts["H"], counts["Q"], counts["P"]
        self._counts = counts

        def joined(key):
            return np.concatenate(values[key] or [np.zeros(0, np.int64)])

        self.event_id = joined(schema.EVENT_ID)
        self._metrics = {m: joined(schema.metric_key(m)) for m in self.metric_names}
        self._offsets = {sym: np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for sym, c in counts.items()}

    # --- validation ---------------------------------------------------------------------------

    def _events_text(self, block: int) -> str:
        start, stop = schema.block_range(block, self.num_events, self.block_size)
        return f"events {start}-{stop - 1}"

    def _check(self, content: bool) -> None:
        """Raise on the first file listed in a manifest that is missing, of the wrong size or
        (with `content`) of the wrong crc32c. Without `content`, the groups' zarr.json (which no
        read opens) are checked whole all the same."""
        parts = [
            (schema.prefixed(schema.block_key(b), m["files"]), self._events_text(b))
            for b, m in enumerate(self._manifests)
        ]
        if content:  # one block at a time, so memory stays at one block's files
            checks = [(schema.check_files(self._store, files, content=True), what) for files, what in parts]
        else:  # all sizes, then the groups' zarr.json, each in one concurrent sweep
            where = {key: what for files, what in parts for key in files}
            problems = schema.check_files(self._store, {k: v for files, _ in parts for k, v in files.items()})
            if not problems:
                groups = {}
                for b, m in enumerate(self._manifests):
                    found = schema.group_metadata(m["files"], self.metric_names)
                    groups.update(schema.prefixed(schema.block_key(b), found))
                problems = schema.check_files(self._store, groups, content=True)
            checks = [([p], where[p.split(" ", 1)[0]]) for p in problems[:1]]
        for problems, what in checks:
            if problems:
                raise UserError(
                    f"cache {self._where} is damaged: {problems[0]} ({what}); re-extract it with --overwrite"
                )

    def verify(self) -> None:
        """Check the crc32c of every file against the manifests (reads the whole cache)."""
        self._check(content=True)

    # --- reading ------------------------------------------------------------------------------

    def _read_into(self, requests: list[tuple[str, slice, str, np.ndarray]],
                   finish: dict | None = None) -> None:
        """Fill each (array path, rows, events text, out) request, then run `finish[i]()` for
        request i (see `chunkio.LocalChunks.read_into`); corruption -> UserError."""
        finish = finish or {}
        errors = self._chunks.read_into([(path, rows, out) for path, rows, _, out in requests], finish)
        other = [i for i, e in enumerate(errors) if isinstance(e, NotImplementedError)]
        if other:  # a layout chunkio does not read: through zarr
            results = schema.read_arrays(self._store, [requests[i][:2] for i in other], self._arrays)
            for i, result in zip(other, results):
                errors[i] = result if isinstance(result, BaseException) else None
                if errors[i] is None:
                    try:
                        np.copyto(requests[i][3], result.reshape(requests[i][3].shape), casting="no")
                        if i in finish:
                            finish[i]()
                    except ValueError as exc:
                        errors[i] = exc
        for (path, _, what, _), exc in zip(requests, errors):
            if isinstance(exc, FetchError):
                raise UserError(f"cannot read {self._where}: {str(exc).splitlines()[0][:300]}") from exc
            if isinstance(exc, (ValueError, RuntimeError, OSError, IndexError)):
                kind = "checksum mismatch" if "checksum" in str(exc) else f"cannot decode ({exc})"
                raise UserError(
                    f"{kind} in {path} ({what}): the cache is corrupted, re-extract with --overwrite"
                ) from exc
            if exc is not None:
                raise exc

    def read_block(self, block: int) -> HeadBatch:
        """The events of `block` (see `read_events`)."""
        return self.read_blocks([block])

    def read_blocks(self, blocks, pool: ArrayPool | None = None) -> HeadBatch:
        """The events of `blocks`, block after block in that order, as one `HeadBatch` (`pool`:
        see `read_events`)."""
        for block in blocks:
            if not 0 <= block < self.num_blocks:
                raise IndexError(f"block {block} outside 0..{self.num_blocks - 1}")
        return self._read_ranges([schema.block_range(b, self.num_events, self.block_size) for b in blocks], pool)

    def read_events(self, start: int, stop: int, pool: ArrayPool | None = None) -> HeadBatch:
        """Events [start, stop) as one `HeadBatch` (batch-global pair rows), across blocks.

        With a `pool` the batch's large arrays are backed by its buffers (reused once no earlier
        batch of the pool refers to them; `cache.pool`), else newly allocated."""
        if not 0 <= start <= stop <= self.num_events:
            raise IndexError(f"events {start}-{stop} outside 0..{self.num_events}")
        return self._read_ranges([(start, stop)], pool)

    def _read_ranges(self, ranges: list[tuple[int, int]], pool: ArrayPool | None = None) -> HeadBatch:
        """The event ranges, one after another, as one `HeadBatch`: every chunk is read (and its
        crc32c checked) straight into the batch's arrays, once."""
        pieces = []  # (block, lo, hi): events [lo, hi) of one block, in output order
        for start, stop in ranges:
            if stop > start:
                for block in range(start // self.block_size, (stop - 1) // self.block_size + 1):
                    b_start, b_stop = schema.block_range(block, self.num_events, self.block_size)
                    pieces.append((block, max(start, b_start), min(stop, b_stop)))
        events = np.concatenate([np.arange(lo, hi) for _, lo, hi in pieces] or [np.zeros(0, np.int64)])
        counts = {sym: c[events] for sym, c in self._counts.items()}
        offsets = {sym: np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for sym, c in counts.items()}
        empty = pool.empty if pool is not None else lambda _key, shape, dtype: np.empty(shape, dtype)
        out_arrays, rebased = {}, {}
        for spec in schema.DATA_ARRAYS:
            shape = (int(offsets[spec.rows][-1]),) + (() if spec.cols is None else (self._cols[spec.cols],))
            out_arrays[spec.key] = empty(spec.key, shape, schema.storage_dtype(spec, self.embed_dtype))
            if spec.field in schema.PAIR_ROWS:
                rebased[spec.field] = empty(f"{spec.key}/rebased", shape, np.int64)
        requests, finish = [], {}
        pos, first_event = {sym: 0 for sym in self._offsets}, 0
        for block, lo, hi in pieces:
            b_start = block * self.block_size
            what = self._events_text(block)
            rows = {}
            for sym, off in self._offsets.items():
                rows[sym] = (int(off[lo] - off[b_start]), int(off[hi] - off[b_start]))
            for spec in schema.DATA_ARRAYS:
                a, b = rows[spec.rows]
                if b > a:
                    dest = out_arrays[spec.key][pos[spec.rows] : pos[spec.rows] + b - a]
                    if spec.field in schema.PAIR_ROWS:  # event-local rows -> batch-global, once read
                        events_here = slice(first_event, first_event + hi - lo)
                        finish[len(requests)] = partial(
                            _rebase, rebased[spec.field][pos["P"] : pos["P"] + b - a], dest,
                            offsets[schema.PAIR_ROWS[spec.field]][events_here], counts["P"][events_here])
                    requests.append((f"{schema.block_key(block)}/{spec.key}", slice(a, b), what, dest))
            for sym, (a, b) in rows.items():
                pos[sym] += b - a
            first_event += hi - lo
        self._read_into(requests, finish)

        out = {
            "event_id": torch.from_numpy(self.event_id[events]),
            "hit_offsets": torch.from_numpy(offsets["H"]),
            "query_offsets": torch.from_numpy(offsets["Q"]),
        }
        for spec in schema.DATA_ARRAYS:
            values = rebased.get(spec.field, out_arrays[spec.key])
            if values.dtype.kind in "iu" and values.dtype != np.int64 and spec.dtype != "embed":
                values = values.astype(np.int64)
            if spec.dtype == "embed" and self.embed_dtype == "bfloat16":
                out[spec.field] = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
            else:
                out[spec.field] = torch.from_numpy(values)
        return HeadBatch(**out)

    def metrics(self) -> dict[str, np.ndarray]:
        """Per-event frozen-task counts, int64 [E] by metric name."""
        return {k: v.copy() for k, v in self._metrics.items()}

    def load(self, device="cpu") -> ResidentCache:
        """Every event in (device) memory."""
        return ResidentCache(self.read_events(0, self.num_events), device)

    def stream(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, buffer_blocks: int = 2,
               prefetch: int = 2, drop_last: bool = True, valid_targets_only: bool = False) -> Iterator[HeadBatch]:
        """Batches read block by block, for caches that do not fit in memory (`stream.stream_batches`)."""
        return stream_batches(self, batch_size, seed, epoch, rank, world, buffer_blocks, prefetch, drop_last,
                              valid_targets_only)

    def stream_num_batches(self, batch_size: int, seed: int, epoch: int, world: int = 1,
                           drop_last: bool = True) -> int:
        """How many batches `stream` yields on every rank for these settings (no data is read)."""
        return stream_num_batches(self, batch_size, seed, epoch, world, drop_last)

    # --- sizes --------------------------------------------------------------------------------

    def nbytes(self) -> dict:
        """{"stored": bytes on disk per array key (plus "metadata"), "decoded": decoded bytes per array key}.

        Arrays are keyed as in a block ("hits/embed").
        """
        stored: dict[str, int] = defaultdict(int)
        for manifest in self._manifests:
            for rel, (size, _) in manifest["files"].items():
                stored["metadata" if rel.endswith("zarr.json") else rel.partition("/c/")[0]] += size
        decoded: dict[str, int] = {}
        totals = {sym: int(off[-1]) for sym, off in self._offsets.items()}
        for spec in schema.DATA_ARRAYS:
            width = 1 if spec.cols is None else self._cols[spec.cols]
            itemsize = np.dtype(schema.storage_dtype(spec, self.embed_dtype)).itemsize
            decoded[spec.key] = totals[spec.rows] * width * itemsize
        for key in schema.event_arrays(self.metric_names):  # all int64; offsets have n+1 rows per block
            decoded[key] = 8 * (self.num_events + (self.num_blocks if key in schema.OFFSET_ARRAYS.values() else 0))
        return {"stored": dict(stored), "decoded": dict(decoded)}


def _rebase(out: np.ndarray, local: np.ndarray, first_rows: np.ndarray, pairs_per_event: np.ndarray) -> None:
    """out (int64 [P]) = event-local rows `local` (int32 [P]) + the first batch row of each pair's
    event (`first_rows` [E], one per event of the P pairs, `pairs_per_event` [E] of them each)."""
    np.add(np.repeat(first_rows, pairs_per_event), local, out=out)
