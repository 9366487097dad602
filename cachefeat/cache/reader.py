"""`CacheReader`: validated reads of a complete cache as `HeadBatch`es.

Opening checks the format version, completeness and (by default) that every file listed in
the block manifests is present with its recorded size, so a deleted or truncated chunk is
refused instead of reading as zeros. A chunk whose bytes changed fails its crc32c when read,
reported as a `UserError` naming the array and the events it covers.

Event order is the input's: cache event i is input event i. Embeddings come back in their
storage dtype (`HeadBatch.float()` widens them, on the device); integer columns as int64.

A reader hands out the whole cache in memory (`load`, a `resident.ResidentCache`) or streams
it block by block (`stream`, see `stream`); `summary.cache_summary` reports on it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from zarr.abc.store import Store

from cachefeat.cache import schema
from cachefeat.cache.resident import ResidentCache
from cachefeat.cache.stream import stream_batches, stream_num_batches
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch


class CacheReader:
    """A complete cache, opened read-only.

    Attributes:
        path, fingerprint, settings, raw_fields, particle_fields, dim, embed_dtype,
        num_events (E), num_blocks, block_size, metric_names: from the root attributes.
        hit_counts, query_counts, pair_counts, event_id: int64 [E].
    """

    def __init__(self, path, check_files: bool = True):
        self.path = path
        self._where = schema.describe(path)
        if not isinstance(path, Store) and not Path(path).is_dir():
            raise UserError(f"no cache at {self._where}")
        self._store, _ = schema.open_store(path, read_only=True)
        self._arrays: dict = {}  # arrays opened by earlier reads (see schema.read_arrays)
        attrs = schema.node_attributes(self._store, [""])[0]
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
            self._store, [schema.block_key(b) for b in range(self.num_blocks)]
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

        index = self._read_index([*schema.COUNT_INDEX.values(), schema.EVENT_ID_INDEX])
        self.hit_counts, self.query_counts, self.pair_counts, self.event_id = index
        self._offsets = {
            sym: np.concatenate([[0], np.cumsum(c)]).astype(np.int64)
            for sym, c in zip("HQP", (self.hit_counts, self.query_counts, self.pair_counts))
        }
        self._cols = {"F": len(self.raw_fields), "D": self.dim, "T": len(self.particle_fields)}
        self._metrics: dict[str, np.ndarray] | None = None

    # --- validation ---------------------------------------------------------------------------

    def _events_text(self, block: int) -> str:
        start, stop = schema.block_range(block, self.num_events, self.block_size)
        return f"events {start}-{stop - 1}"

    def _check(self, content: bool) -> None:
        """Raise on the first file listed in a manifest that is missing, of the wrong size or
        (with `content`) of the wrong crc32c."""
        parts = [
            (schema.prefixed(schema.block_key(b), m["files"]), self._events_text(b))
            for b, m in enumerate(self._manifests)
        ]
        parts.append(
            (schema.prefixed(schema.INDEX, self.attrs.get("index_files") or {}), "the per-event index")
        )
        if content:  # one block at a time, so memory stays at one block's files
            checks = [(schema.check_files(self._store, files, content=True), what) for files, what in parts]
        else:  # all sizes in one concurrent sweep
            where = {key: what for files, what in parts for key in files}
            problems = schema.check_files(self._store, {k: v for files, _ in parts for k, v in files.items()})
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

    def _read_index(self, names: list[str]) -> list[np.ndarray]:
        values = self._gather([(schema.index_key(n), slice(None), "the per-event index") for n in names])
        return [v.astype(np.int64) for v in values]

    def _gather(self, requests: list[tuple[str, slice, str]]) -> list[np.ndarray]:
        """Read (array path, rows, events text) requests concurrently; corruption -> UserError."""
        results = schema.read_arrays(self._store, [(path, rows) for path, rows, _ in requests], self._arrays)
        for (path, _, what), result in zip(requests, results):
            if isinstance(result, (ValueError, RuntimeError, OSError)):
                kind = "checksum mismatch" if "checksum" in str(result) else f"cannot decode ({result})"
                raise UserError(
                    f"{kind} in {path} ({what}): the cache is corrupted, re-extract with --overwrite"
                ) from result
            if isinstance(result, BaseException):
                raise result
        return results

    def read_block(self, block: int) -> HeadBatch:
        """The events of `block` (see `read_events`)."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} outside 0..{self.num_blocks - 1}")
        return self.read_events(*schema.block_range(block, self.num_events, self.block_size))

    def read_events(self, start: int, stop: int) -> HeadBatch:
        """Events [start, stop) as one `HeadBatch` (batch-global pair rows), across blocks."""
        if not 0 <= start <= stop <= self.num_events:
            raise IndexError(f"events {start}-{stop} outside 0..{self.num_events}")
        requests, keys = [], []
        first = start // self.block_size
        last = (stop - 1) // self.block_size if stop > start else first - 1
        for block in range(first, last + 1):
            b_start, b_stop = schema.block_range(block, self.num_events, self.block_size)
            lo, hi = max(start, b_start), min(stop, b_stop)
            what = self._events_text(block)
            for spec in schema.DATA_ARRAYS:
                off = self._offsets[spec.rows]
                rows = slice(int(off[lo] - off[b_start]), int(off[hi] - off[b_start]))
                requests.append((f"{schema.block_key(block)}/{spec.key}", rows, what))
                keys.append(spec)
        parts = defaultdict(list)
        for spec, values in zip(keys, self._gather(requests)):
            parts[spec.key].append(values)

        n = stop - start
        offsets = {sym: off[start : stop + 1] - off[start] for sym, off in self._offsets.items()}
        pair_event = np.repeat(np.arange(n), self.pair_counts[start:stop])
        out = {
            "event_id": torch.from_numpy(self.event_id[start:stop].copy()),
            "hit_offsets": torch.from_numpy(offsets["H"]),
            "query_offsets": torch.from_numpy(offsets["Q"]),
        }
        for spec in schema.DATA_ARRAYS:
            if parts[spec.key]:
                values = np.concatenate(parts[spec.key])
            else:
                shape = (0,) if spec.cols is None else (0, self._cols[spec.cols])
                values = np.zeros(shape, schema.storage_dtype(spec, self.embed_dtype))
            if spec.field in schema.PAIR_ROWS:  # event-local rows -> batch-global
                values = values.astype(np.int64) + offsets[schema.PAIR_ROWS[spec.field]][pair_event]
            elif values.dtype.kind in "iu" and spec.dtype != "embed":
                values = values.astype(np.int64)
            if spec.dtype == "embed" and self.embed_dtype == "bfloat16":
                out[spec.field] = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
            else:
                out[spec.field] = torch.from_numpy(values)
        return HeadBatch(**out)

    def metrics(self) -> dict[str, np.ndarray]:
        """Per-event frozen-task counts, int64 [E] by metric name."""
        if self._metrics is None:
            values = self._read_index([schema.index_metric(m) for m in self.metric_names])
            self._metrics = dict(zip(self.metric_names, values))
        return {k: v.copy() for k, v in self._metrics.items()}

    def load(self, device="cpu") -> ResidentCache:
        """Every event in (device) memory."""
        return ResidentCache(self.read_events(0, self.num_events), device)

    def stream(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, buffer_blocks: int = 2,
               prefetch: int = 2, drop_last: bool = True) -> Iterator[HeadBatch]:
        """Batches read block by block, for caches that do not fit in memory (`stream.stream_batches`)."""
        return stream_batches(self, batch_size, seed, epoch, rank, world, buffer_blocks, prefetch, drop_last)

    def stream_num_batches(self, batch_size: int, seed: int, epoch: int, world: int = 1,
                           drop_last: bool = True) -> int:
        """How many batches `stream` yields on every rank for these settings (no data is read)."""
        return stream_num_batches(self, batch_size, seed, epoch, world, drop_last)

    # --- sizes --------------------------------------------------------------------------------

    def nbytes(self) -> dict:
        """{"stored": bytes on disk per array key (plus "metadata"), "decoded": decoded bytes per array key}.

        Block arrays are keyed as in a block ("hits/embed"), index arrays as "index/<name>".
        """
        stored: dict[str, int] = defaultdict(int)
        manifests = [("", m["files"]) for m in self._manifests]
        manifests.append(("index/", self.attrs.get("index_files") or {}))
        for prefix, files in manifests:
            for rel, (size, _) in files.items():
                stored["metadata" if rel.endswith("zarr.json") else prefix + rel.partition("/c/")[0]] += size
        decoded: dict[str, int] = {}
        totals = {sym: int(off[-1]) for sym, off in self._offsets.items()}
        for spec in schema.DATA_ARRAYS:
            width = 1 if spec.cols is None else self._cols[spec.cols]
            itemsize = np.dtype(schema.storage_dtype(spec, self.embed_dtype)).itemsize
            decoded[spec.key] = totals[spec.rows] * width * itemsize
        index = schema.index_sources(self.metric_names)  # all int64; block offsets have n+1 rows per block
        for key in index.values():
            decoded[key] = 8 * (self.num_events + (self.num_blocks if key in schema.OFFSET_ARRAYS.values() else 0))
        for name in index:
            decoded[schema.index_key(name)] = 8 * self.num_events
        return {"stored": dict(stored), "decoded": dict(decoded)}
