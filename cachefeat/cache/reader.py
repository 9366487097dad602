"""`CacheReader`: validated reads of a complete cache as `HeadBatch`es; `ResidentCache` in memory.

Opening checks the format version, completeness and (by default) that every file listed in
the block manifests is present with its recorded size, so a deleted or truncated chunk is
refused instead of reading as zeros. A chunk whose bytes changed fails its crc32c when read,
reported as a `UserError` naming the array and the events it covers.

Event order is the input's: cache event i is input event i. Embeddings come back in their
storage dtype (`HeadBatch.float()` widens them, on the device); integer columns as int64.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from zarr.abc.store import Store

from cachefeat.cache import schema
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch, concat

log = logging.getLogger(__name__)


def open_cache(path) -> CacheReader:
    """Open a complete cache for reading (all checks on)."""
    return CacheReader(path)


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

        index = self._read_index(["hit_counts", "query_counts", "pair_counts", "event_id"])
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
            if spec.field == "pair_query":
                values = values.astype(np.int64) + offsets["Q"][pair_event]
            elif spec.field == "pair_hit":
                values = values.astype(np.int64) + offsets["H"][pair_event]
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
            values = self._read_index([f"metrics/{m}" for m in self.metric_names])
            self._metrics = dict(zip(self.metric_names, values))
        return {k: v.copy() for k, v in self._metrics.items()}

    def load(self, device="cpu") -> ResidentCache:
        """Every event in (device) memory."""
        return ResidentCache(self.read_events(0, self.num_events), device)

    def stream(
        self,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        buffer_blocks: int = 2,
        prefetch: int = 2,
        drop_last: bool = True,
    ) -> Iterator[HeadBatch]:
        """Batches read block by block, for caches that do not fit in memory.

        Blocks are visited in a (seed, epoch) permutation; rank r takes blocks[r::world].
        Events are shuffled within a buffer of `buffer_blocks` blocks (leftovers carry into
        the next buffer); a background thread reads `prefetch` buffers ahead. Every rank
        yields the same number of batches: the smallest count over ranks (full batches only
        with `drop_last`, else including each rank's last partial batch). The order is a
        function of (seed, epoch, rank, world, buffer_blocks) only.
        """
        if batch_size < 1 or buffer_blocks < 1 or not 0 <= rank < world:
            raise ValueError("batch_size and buffer_blocks must be >= 1 and 0 <= rank < world")
        order = self._block_order(seed, epoch)
        count = self.stream_num_batches(batch_size, seed, epoch, world, drop_last)
        if count == 0:
            log.warning("stream of %s yields no batch for batch size %d and %d ranks", self._where, batch_size, world)
        mine = order[rank::world]
        groups = [mine[i : i + buffer_blocks].tolist() for i in range(0, len(mine), buffer_blocks)]
        rng = np.random.default_rng((seed, epoch, rank, world))
        return self._stream(groups, batch_size, count, rng, prefetch)

    def _block_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng((seed, epoch)).permutation(self.num_blocks)

    def stream_num_batches(self, batch_size: int, seed: int, epoch: int, world: int = 1,
                           drop_last: bool = True) -> int:
        """How many batches `stream` yields on every rank for these settings (no data is read)."""
        order = self._block_order(seed, epoch)
        bounds = np.minimum(np.arange(self.num_blocks + 1) * self.block_size, self.num_events)
        sizes = np.diff(bounds)  # events per block
        per_rank = [int(sizes[order[r::world]].sum()) for r in range(world)]
        return min(n // batch_size if drop_last else math.ceil(n / batch_size) for n in per_rank)

    def _stream(self, groups, batch_size, count, rng, prefetch) -> Iterator[HeadBatch]:
        if count == 0:
            return
        loader = _Prefetch(lambda group: concat([self.read_block(b) for b in group]), groups, prefetch)
        emitted, carry = 0, None
        try:
            for loaded in loader:
                n_carry = 0 if carry is None else carry.num_events
                buffer = ResidentCache(loaded if carry is None else concat([carry, loaded]))
                order = np.concatenate([np.arange(n_carry), n_carry + rng.permutation(loaded.num_events)])
                pos = 0
                while emitted < count and len(order) - pos >= batch_size:
                    yield buffer.batch(order[pos : pos + batch_size])
                    pos += batch_size
                    emitted += 1
                if emitted == count:
                    return
                carry = buffer.batch(order[pos:])
            if emitted < count and carry is not None and carry.num_events:
                yield carry
        finally:
            loader.close()

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
        for key in schema.OFFSET_ARRAYS.values():
            decoded[key] = 8 * (self.num_events + self.num_blocks)
        metrics = [f"metrics/{m}" for m in self.metric_names]
        index = [
            schema.index_key(n) for n in ["hit_counts", "query_counts", "pair_counts", "event_id", *metrics]
        ]
        for key in [schema.EVENT_ID, *(f"events/{m}" for m in metrics), *index]:
            decoded[key] = 8 * self.num_events
        return {"stored": dict(stored), "decoded": dict(decoded)}


class ResidentCache:
    """All events of a cache in (device) memory; batches are vectorised ragged gathers.

    Holds flat CSR tensors like `HeadBatch`, with pair rows event-local (so that a batch
    re-bases them on its own offsets) and pair offsets [E+1].
    """

    def __init__(self, hb: HeadBatch, device="cpu"):
        hb = hb.to(device)
        self.device = torch.device(device)
        self.num_events = hb.num_events
        self.event_id = hb.event_id
        self.hit_offsets, self.query_offsets = hb.hit_offsets, hb.query_offsets
        pair_event = hb.query_event()[hb.pair_query]
        counts = torch.bincount(pair_event, minlength=self.num_events)
        self.pair_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.pair_query = hb.pair_query - hb.query_offsets[pair_event]
        self.pair_hit = hb.pair_hit - hb.hit_offsets[pair_event]
        self._rows = {name: getattr(hb, name) for name in ("hit_raw", "hit_embed")}
        self._queries = {
            name: getattr(hb, name)
            for name in (
                "query_embed",
                "query_valid_logit",
                "query_slot",
                "target_index",
                "targets",
                "target_valid",
            )
        }
        self.pair_logit = hb.pair_logit

    def batch(self, indices) -> HeadBatch:
        """The events at `indices` (any order, repeats allowed) as one `HeadBatch`."""
        if not isinstance(indices, torch.Tensor):
            indices = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        idx = indices.to(self.device, torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_events):
            raise IndexError(f"event indices outside 0..{self.num_events - 1}")
        hit_rows, hit_off = _ragged_rows(self.hit_offsets, idx)
        query_rows, query_off = _ragged_rows(self.query_offsets, idx)
        pair_rows, pair_off = _ragged_rows(self.pair_offsets, idx)
        pair_event = torch.repeat_interleave(
            torch.arange(len(idx), device=self.device), pair_off.diff(), output_size=len(pair_rows)
        )
        return HeadBatch(
            event_id=self.event_id[idx],
            hit_offsets=hit_off,
            query_offsets=query_off,
            **{name: t[hit_rows] for name, t in self._rows.items()},
            **{name: t[query_rows] for name, t in self._queries.items()},
            pair_query=self.pair_query[pair_rows] + query_off[pair_event],
            pair_hit=self.pair_hit[pair_rows] + hit_off[pair_event],
            pair_logit=self.pair_logit[pair_rows],
        )

    def epoch_batches(
        self, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, drop_last: bool = True
    ) -> Iterator[HeadBatch]:
        """Batches over a `default_rng((seed, epoch))` permutation; rank r takes batches r, r+world, ...

        Every rank gets the same number of batches; without `drop_last` the tail is split as
        evenly as possible over the ranks (a rank may get an empty last batch).
        """
        order = np.random.default_rng((seed, epoch)).permutation(self.num_events)
        for indices in rank_batches(order, batch_size, rank, world, drop_last):
            yield self.batch(indices)


def rank_batches(
    order: np.ndarray, batch_size: int, rank: int, world: int, drop_last: bool
) -> Iterator[np.ndarray]:
    """Rank `rank`'s slices of `order`: global batch b holds world*batch_size events, rank r gets share r."""
    if batch_size < 1 or not 0 <= rank < world:
        raise ValueError("batch_size must be >= 1 and 0 <= rank < world")
    step = batch_size * world
    full = len(order) // step
    for b in range(full):
        yield order[b * step + rank * batch_size : b * step + (rank + 1) * batch_size]
    if not drop_last and len(order) > full * step:
        yield np.array_split(order[full * step :], world)[rank]


def _ragged_rows(offsets: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the events `idx` in a CSR layout with `offsets` [E+1], and the batch's offsets [B+1]."""
    starts = offsets[idx]
    counts = offsets[idx + 1] - starts
    new = torch.zeros(len(idx) + 1, dtype=torch.long, device=offsets.device)
    new[1:] = counts.cumsum(0)
    total = int(new[-1])
    shift = torch.repeat_interleave(starts - new[:-1], counts, output_size=total)
    return torch.arange(total, device=offsets.device) + shift, new


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


def cache_summary(reader: CacheReader) -> dict:
    """What a cache holds and what it costs, as JSON-ready numbers (used by `cachefeat info`).

    "dense_float32" is the size of the padded float32 layout the cache replaces: per event
    n_valid_hits x (F + D) + N x (D + 1 + T) + N x n_valid_hits, where n_valid_hits is the
    per-event metric of that name and N is `settings["num_queries"]` when present, else the
    stored query count. It is None when the cache has no `n_valid_hits` metric.
    """
    E = reader.num_events
    sizes = reader.nbytes()
    stored, decoded = sizes["stored"], sizes["decoded"]
    data = [k for k in decoded if k in stored]
    stored_total, decoded_total = sum(stored.values()), sum(decoded[k] for k in data)
    counts = {}
    for name, values in (
        ("hits", reader.hit_counts),
        ("queries", reader.query_counts),
        ("pairs", reader.pair_counts),
    ):
        counts[name] = {
            "total": int(values.sum()),
            "per_event": float(values.mean()) if E else 0.0,
            "max": int(values.max()) if E else 0,
        }
    dense = None
    metrics = reader.metrics()
    if "n_valid_hits" in metrics:
        valid = metrics["n_valid_hits"]
        n_queries = reader.settings.get("num_queries")
        queries = np.full(E, n_queries, np.int64) if isinstance(n_queries, int) else reader.query_counts
        F, D, T = len(reader.raw_fields), reader.dim, len(reader.particle_fields)
        dense_bytes = int(4 * (valid * (F + D) + queries * (D + 1 + T) + queries * valid).sum())
        dense = {
            "bytes": dense_bytes,
            "per_event": dense_bytes / E if E else 0.0,
            "cache_over_dense": stored_total / dense_bytes if dense_bytes else None,
        }
    dtypes = {
        spec.key: (reader.embed_dtype if spec.dtype == "embed" else spec.dtype) for spec in schema.DATA_ARRAYS
    }
    return {
        "path": schema.describe(reader.path),
        "complete": True,
        "format_version": reader.attrs["format_version"],
        "num_events": E,
        "num_blocks": reader.num_blocks,
        "block_size": reader.block_size,
        "counts": counts,
        "raw_fields": reader.raw_fields,
        "particle_fields": reader.particle_fields,
        "dim": reader.dim,
        "embed_dtype": reader.embed_dtype,
        "dtypes": dtypes,
        "bytes": {
            "stored": stored,
            "decoded": decoded,
            "stored_total": stored_total,
            "decoded_total": decoded_total,
            "per_event": stored_total / E if E else 0.0,
            "compression_ratio": decoded_total / sum(stored[k] for k in data) if data and E else None,
        },
        "dense_float32": dense,
        "metric_totals": {k: int(v.sum()) for k, v in metrics.items()},
        "fingerprint": reader.fingerprint,
        "settings": reader.settings,
    }
