"""The cache layout: names, dtypes, shape symbols, codecs, chunking, manifests, FORMAT_VERSION.

The one module that knows how a cache is laid out; the writer, the reader, `cachefeat info`
and the tests import it. A cache is a Zarr v3 hierarchy::

    <cache>/zarr.json                  root attributes: format_version, fingerprint, settings,
                                       raw_fields, particle_fields, dim, embed_dtype, num_events,
                                       block_size, num_blocks, metric_names and `complete`, set True last
    <cache>/.lock                      present while a writer holds the cache
    <cache>/checksums.json             [size, crc32c] of the zarr.json files no manifest lists (the
                                       root's, blocks/', each block's), written when the cache completes
    <cache>/blocks/<b:06d>/            one commit block: events [b*block_size, min(E, (b+1)*block_size))
        events/{hit,query,pair}_offsets   int64 [n+1], block-local CSR offsets
        events/event_id                   int64 [n]
        events/metrics/<name>             int64 [n], per-event frozen-task counts
        hits/raw [H, F], hits/embed [H, D]
        queries/embed [Q, D], valid_logit [Q], slot [Q], target_index [Q], targets [Q, T], target_valid [Q]
        pairs/query [P], pairs/hit [P] (event-local rows), pairs/logit [P]

There is no separate index: a reader opens the cache by reading every block's `events/*` arrays
(so a training run reads, and checks the crc32c of, every array the cache stores).

Symbols: n events in a block, E events in the cache, H hits, Q queries, P pairs,
D embedding dim, F raw hit fields, T particle (target) fields.

A block is committed when its group's attributes hold the manifest (`block_manifest`); the
manifest lists every file of the block with its size and crc32c, so a missing or truncated
file is found on open. Every chunk carries its own crc32c (last codec, after compression),
so a flipped byte fails the read of that chunk; a reader checks each array's zarr.json against
the manifest's crc32c before it reads the array (`chunkio`), and the groups' zarr.json on open.
The zarr.json files that hold the manifests and the root attributes are covered by
`checksums.json` (`METADATA_SUMS`, compact JSON: any changed byte in it breaks its JSON or changes
a size, a crc or a name), written once the root says `complete` and checked by every reader on
open; caches completed before it existed have none and are read without that check.

Format 2 (format 1 sharded every multi-chunk array and Blosc-compressed all of them, and kept a
root `index/` that duplicated the blocks' `events/*` arrays): float arrays are stored
uncompressed, chunks are not sharded. Format-2 caches written before December 2026 have Blosc
on the query valid logits, targets and pair logits; each array's zarr.json names its codecs,
so they read the same.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
import zarr.api.asynchronous
from crc32c import crc32c
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

from cachefeat.cache.store import describe
from cachefeat.errors import UserError

FORMAT_VERSION = 2

# Extraction settings that change the content (recorded in the fingerprint), and their choices.
EMBED_DTYPES = ("float32", "float16", "bfloat16")
KEEP_HITS = ("assigned", "all")  # hits used by a kept pair, or every valid hit
KEEP_QUERIES = ("all", "matched")  # the N queries of every event, or matched ones only
PRECISIONS = ("fp32", "bf16")  # the frozen forward: float32, or under bfloat16 autocast
# bfloat16 has no numpy dtype: its raw 16 bits are stored as uint16, with the array attribute
# `logical_dtype: bfloat16`; the reader reinterprets them with torch's `.view(torch.bfloat16)`.
STORAGE_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}

# Blosc + byte shuffle, for the arrays that it pays on (integers, bools, 1-D and narrow floats).
# On a muon-like cache (float32, about 30 hits, 2 queries, 40 pairs per event, D=32) zstd level 3
# stored 4.5% fewer bytes than lz4 level 5 (4.88 vs 5.12 kB/event) but wrote about 1.7x and read
# about 1.4x slower: model features barely compress, so lz4. Measured on the 2,048-event muon
# benchmark block (2-core VM): hits/embed [92304, 32] compresses 1.18x and decodes at 3.2 GB/s
# (a copy runs at 11 GB/s, crc32c at 20 GB/s), hits/raw 1.23x; so the wide float arrays are
# stored raw (`ArraySpec.compressed`), which costs about 1.3 kB/event and makes their read a
# read syscall plus a crc32c. Pair rows and slots compress 10-110x: Blosc. The other float
# arrays (query valid logits, targets, pair logits) compress 1.13-1.33x and are stored raw too:
# rewriting the benchmark caches so made a whole read 3% faster for +0.5% bytes (muon, 2,048
# events) and 11% faster for +3% (TrackML CPU stage 1, 16 events, 1,100 queries per event;
# 2-core AMD EPYC VM, medians of 25 alternating rounds).
CNAME = "lz4"
CLEVEL = 5
CHUNK_BYTES = 4 << 20  # target decoded size of one chunk

LOCK_NAME = ".lock"
METADATA_SUMS = "checksums.json"
BLOCKS = "blocks"
# Root attributes that fix the layout: a resumed or second-rank writer must match them.
LAYOUT_ATTRS = (
    "format_version",
    "raw_fields",
    "particle_fields",
    "dim",
    "embed_dtype",
    "num_events",
    "block_size",
    "metric_names",
)


@dataclass(frozen=True)
class ArraySpec:
    """One per-block data array.

    key: path inside the block group; rows: row symbol ("H", "Q" or "P"); cols: column symbol
    ("F", "D", "T") or None for 1-D; dtype: storage dtype, "embed" for the cache's embedding
    storage dtype (STORAGE_DTYPE); field: the `HeadBatch` attribute it holds; compressed:
    Blosc before the crc32c (else the chunk is the raw bytes and their crc32c).
    """

    key: str
    rows: str
    cols: str | None
    dtype: str
    field: str
    compressed: bool = True


# Integer columns are stored narrower than HeadBatch's int64 (the reader widens them):
# query slots, particle indices and event-local pair rows all fit in int32.
DATA_ARRAYS = (
    ArraySpec("hits/raw", "H", "F", "float32", "hit_raw", compressed=False),
    ArraySpec("hits/embed", "H", "D", "embed", "hit_embed", compressed=False),
    ArraySpec("queries/embed", "Q", "D", "embed", "query_embed", compressed=False),
    ArraySpec("queries/valid_logit", "Q", None, "float32", "query_valid_logit", compressed=False),
    ArraySpec("queries/slot", "Q", None, "int32", "query_slot"),
    ArraySpec("queries/target_index", "Q", None, "int32", "target_index"),
    ArraySpec("queries/targets", "Q", "T", "float32", "targets", compressed=False),
    ArraySpec("queries/target_valid", "Q", None, "bool", "target_valid"),
    ArraySpec("pairs/query", "P", None, "int32", "pair_query"),
    ArraySpec("pairs/hit", "P", None, "int32", "pair_hit"),
    ArraySpec("pairs/logit", "P", None, "float32", "pair_logit", compressed=False),
)
# The `HeadBatch` fields of each row kind ("H" hits, "Q" queries, "P" pairs), in DATA_ARRAYS order.
ROW_FIELDS = {rows: tuple(spec.field for spec in DATA_ARRAYS if spec.rows == rows) for rows in ("H", "Q", "P")}
# Pair fields that hold a row of another kind: event-local in the cache, batch-global in a HeadBatch.
PAIR_ROWS = {"pair_query": "Q", "pair_hit": "H"}
OFFSET_ARRAYS = {"H": "events/hit_offsets", "Q": "events/query_offsets", "P": "events/pair_offsets"}
EVENT_ID = "events/event_id"
COUNT_NAMES = {"H": "hits", "Q": "queries", "P": "pairs"}


def metric_key(name: str) -> str:
    """Per-block key of a metric array (int64 [n])."""
    return f"events/metrics/{name}"


def event_arrays(metric_names) -> list[str]:
    """Per-block keys of the per-event arrays (int64), which a reader reads on open: the offsets
    (in OFFSET_ARRAYS order, "H", "Q", "P"), the event ids, the metrics."""
    return [*OFFSET_ARRAYS.values(), EVENT_ID, *(metric_key(m) for m in metric_names)]


# Block arrays stored without a compressor (see CNAME).
RAW_KEYS = frozenset(spec.key for spec in DATA_ARRAYS if not spec.compressed)


def block_key(block: int) -> str:
    return f"{BLOCKS}/{block:06d}"


def storage_dtype(spec: ArraySpec, embed_dtype: str) -> str:
    return STORAGE_DTYPE[embed_dtype] if spec.dtype == "embed" else spec.dtype


def num_blocks(num_events: int, block_size: int) -> int:
    return math.ceil(num_events / block_size)


def block_range(block: int, num_events: int, block_size: int) -> tuple[int, int]:
    """[start, stop) event range of a block."""
    start = block * block_size
    return start, min(num_events, start + block_size)


def compressors(compressed: bool = True) -> list:
    """Bytes-to-bytes codecs of a chunk: Blosc with byte shuffle (when `compressed`), then
    crc32c (last, so that it covers the stored bytes)."""
    blosc = [BloscCodec(cname=CNAME, clevel=CLEVEL, shuffle=BloscShuffle.shuffle)] if compressed else []
    return [*blosc, Crc32cCodec()]


def chunking(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks for an array of `shape`: about CHUNK_BYTES each along axis 0, whole rows, equal
    sizes (so the padded edge chunk is short by fewer rows than there are chunks). Unsharded:
    sharding cost about 30% of a full read here, and a block array is a few files at most."""
    rows = shape[0]
    row_bytes = itemsize * math.prod(shape[1:])
    nchunks = max(1, math.ceil(rows * row_bytes / CHUNK_BYTES))
    chunk_rows = max(1, math.ceil(rows / nchunks))
    return (chunk_rows, *shape[1:])


def write_arrays(store: Store, prefix: str, arrays: dict[str, tuple[np.ndarray, dict | None]]) -> None:
    """Write each `key: (data, attributes)` as a new checksummed array `<prefix>/<key>`,
    concurrently (chunking from `chunking`; no compressor for RAW_KEYS). The group `prefix` must
    exist and hold none of the keys.

    The arrays' metadata is built in memory and written in one `create_hierarchy` call with the
    groups between `prefix` and the keys: about 3 store round trips per array, where creating each
    array on its own (existence checks, every parent group re-created) took about 12; the files
    are the same.
    """

    async def _metadata(key, data, attributes):
        # the metadata `create_array` would write, built on a throw-away in-memory store
        array = await zarr.api.asynchronous.create_array(
            MemoryStore(),
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunking(data.shape, data.dtype.itemsize),
            shards=None,
            compressors=compressors(key not in RAW_KEYS),
            fill_value=0,
            attributes=attributes or {},
        )
        return array.metadata

    async def _all():
        nodes = {f"{prefix}/{key}": await _metadata(key, data, attrs) for key, (data, attrs) in arrays.items()}
        created = {path: node async for path, node in zarr.api.asynchronous.create_hierarchy(store=store, nodes=nodes)}

        async def _fill(key, data):
            if data.size:
                array = created[f"{prefix}/{key}"].with_config({"write_empty_chunks": True})
                await array.setitem(Ellipsis, data)

        # every write finishes (or fails) before the first error is raised: no write outlives the call
        results = await asyncio.gather(*(_fill(k, d) for k, (d, _) in arrays.items()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    sync(_all())


def read_arrays(store: Store, requests: list[tuple[str, slice]],
                opened: dict | None = None) -> list[np.ndarray | Exception]:
    """Read `(array path, rows)` requests concurrently; a failed read returns its exception.

    `opened` (path -> array), when given, keeps the opened arrays for the next call: a complete
    cache does not change, and re-reading each array's metadata was about a quarter of a read.
    """

    async def _read(path, rows):
        array = opened.get(path) if opened is not None else None
        if array is None:
            array = await zarr.api.asynchronous.open_array(store=store, path=path, mode="r")
            if opened is not None:
                opened[path] = array
        return np.asarray(await array.getitem(rows))

    async def _all():
        return await asyncio.gather(*(_read(p, r) for p, r in requests), return_exceptions=True)

    return sync(_all())


# --- manifests ----------------------------------------------------------------------------


def block_manifest(start: int, stop: int, counts: dict[str, int], files: dict[str, list]) -> dict:
    """Attributes that commit a block: `files` maps block-relative keys to [size_bytes, crc32c]."""
    return {"committed": True, "events": [start, stop], "counts": counts, "files": files}


# --- store access -------------------------------------------------------------------------


def list_keys(store: Store, prefix: str) -> list[str]:
    """All keys under `prefix` ("" for all)."""

    async def _list():
        return [key async for key in store.list_prefix(prefix)]

    return sync(_list())


def read_bytes(store: Store, keys: list[str]) -> list[bytes | None]:
    """Contents of `keys` (None where missing), fetched concurrently."""

    async def _get(key):
        buf = await store.get(key, prototype=default_buffer_prototype())
        return None if buf is None else buf.to_bytes()

    async def _all():
        return await asyncio.gather(*(_get(k) for k in keys))

    return sync(_all())


def file_sizes(store: Store, keys: list[str]) -> list[int | None]:
    """Sizes of `keys` in bytes (None where missing), fetched concurrently. On an object store
    (S3) several keys are sized by one listing of their common folder (a request per 1,000 objects,
    where a size each is a HEAD request per key)."""
    from zarr.storage import ObjectStore

    if isinstance(store, ObjectStore) and len(keys) > 1:
        return sync(_listed_sizes(store, keys))

    async def _size(key):
        try:
            return await store.getsize(key)
        except (FileNotFoundError, KeyError):
            return None

    async def _all():
        return await asyncio.gather(*(_size(k) for k in keys))

    return sync(_all())


async def _listed_sizes(store, keys: list[str]) -> list[int | None]:
    """`file_sizes` of an obstore-backed `ObjectStore` from one listing of the keys' common folder."""
    import obstore

    folders = os.path.commonprefix([key.split("/")[:-1] for key in keys])  # element-wise over the path parts
    prefix = "/".join(folders) or None
    sizes = {}
    async for batch in obstore.list(store.store, prefix=prefix, chunk_size=1000):
        sizes.update((meta["path"], meta["size"]) for meta in batch)
    return [sizes.get(key) for key in keys]


def node_attributes(store: Store, keys: list[str], raws: dict[str, bytes] | None = None) -> list[dict | None]:
    """Attributes of the groups at `keys` (read from their zarr.json, or taken from `raws`, by
    zarr.json key, where it has them; None where missing).

    A zarr.json that is not a JSON object is a UserError naming it (a damaged cache)."""
    names = [f"{k}/zarr.json" if k else "zarr.json" for k in keys]
    raws = raws or {}
    fetched = iter(read_bytes(store, [n for n in names if n not in raws]))
    out = []
    for name in names:
        raw = raws[name] if name in raws else next(fetched)
        try:
            node = None if raw is None else json.loads(raw)
        except ValueError as exc:
            raise UserError(f"{describe(store)}: {name} is not valid JSON ({exc}); the cache is damaged: "
                            "re-extract it with --overwrite") from exc
        if node is not None and not isinstance(node, dict):
            raise UserError(f"{describe(store)}: {name} is not a JSON object; the cache is damaged")
        out.append(None if node is None else node.get("attributes", {}))
    return out


def metadata_keys(num_blocks: int) -> list[str]:
    """The zarr.json files no block manifest lists, which `METADATA_SUMS` covers."""
    return ["zarr.json", f"{BLOCKS}/zarr.json", *(f"{block_key(b)}/zarr.json" for b in range(num_blocks))]


def write_metadata_sums(store: Store, num_blocks: int) -> None:
    """Write `METADATA_SUMS` for the zarr.json files as they are now (the cache is complete), as
    compact JSON with no whitespace, in one piece (a local file is written aside and renamed)."""
    keys = metadata_keys(num_blocks)
    sums = {k: [len(c), crc32c(c)] for k, c in zip(keys, read_bytes(store, keys))}
    data = json.dumps(sums, separators=(",", ":"), sort_keys=True).encode()
    if isinstance(store, LocalStore):
        tmp = Path(store.root) / f"{METADATA_SUMS}.partial"
        tmp.write_bytes(data)
        os.replace(tmp, Path(store.root) / METADATA_SUMS)
        return
    sync(store.set(METADATA_SUMS, default_buffer_prototype().buffer.from_bytes(data)))


def checked_metadata(store: Store, where: str) -> dict[str, bytes]:
    """The zarr.json files `METADATA_SUMS` covers, by key, after checking each against it: {} for
    a cache without it (completed before it existed, or not complete). Raises a UserError naming
    the first file that differs, or when it is not the record of exactly the root, the blocks
    group and every block."""
    raw = read_bytes(store, [METADATA_SUMS])[0]
    if raw is None:
        return {}

    def damaged(what: str) -> UserError:
        return UserError(f"cache {where} is damaged: {what}; re-extract it with --overwrite")

    try:
        sums = json.loads(raw)
        ok = isinstance(sums, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v) for v in sums.values())
    except ValueError:
        ok = False
    if not ok or "zarr.json" not in sums:
        raise damaged(f"{METADATA_SUMS} is not a record of the cache's metadata")

    def check(keys: list[str]) -> dict[str, bytes]:
        contents = dict(zip(keys, read_bytes(store, keys)))
        for key, data in contents.items():
            if data is None or [len(data), crc32c(data)] != sums[key]:
                raise damaged(f"{key} differs from its entry in {METADATA_SUMS}")
        return contents

    contents = check(["zarr.json"])
    try:
        attrs = json.loads(contents["zarr.json"])["attributes"]
        keys = metadata_keys(num_blocks(attrs["num_events"], attrs["block_size"]))
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise damaged(f"zarr.json does not describe a cache ({exc})") from exc
    if sorted(sums) != sorted(keys):
        raise damaged(f"{METADATA_SUMS} does not list exactly the root, the blocks group and every block")
    return {**contents, **check(keys[1:])}


def group_metadata(files: dict[str, list], metric_names) -> dict[str, list]:
    """The entries of a block manifest's `files` that are the zarr.json of a group (not of an array)."""
    arrays = {spec.key for spec in DATA_ARRAYS} | set(event_arrays(metric_names))
    return {k: v for k, v in files.items() if k.endswith("zarr.json") and k.rpartition("/")[0] not in arrays}


def manifest_files(store: Store, prefix: str) -> dict[str, list]:
    """{key relative to prefix: [size, crc32c]} for every file under `prefix` but its own zarr.json."""
    keys = [
        k for k in list_keys(store, prefix + "/") if k != f"{prefix}/zarr.json" and not k.endswith(".partial")
    ]
    keys.sort()
    contents = read_bytes(store, keys)
    return {k[len(prefix) + 1 :]: [len(c), crc32c(c)] for k, c in zip(keys, contents)}


def check_files(store: Store, expected: dict[str, list], content: bool = False) -> list[str]:
    """Problems with the files `expected` lists as {key: [size, crc32c]}: missing, of the wrong
    size, and with `content` of the wrong crc32c (reads them all at once: pass one block at a time)."""
    keys = list(expected)
    problems = []
    if content:
        for key, (size, crc), data in zip(keys, expected.values(), read_bytes(store, keys)):
            if data is None:
                problems.append(f"{key} is missing")
            elif len(data) != size:
                problems.append(f"{key} has {len(data)} bytes, expected {size}")
            elif crc32c(data) != crc:
                problems.append(f"{key} has the wrong crc32c")
        return problems
    for key, (size, _), found in zip(keys, expected.values(), file_sizes(store, keys)):
        if found is None:
            problems.append(f"{key} is missing")
        elif found != size:
            problems.append(f"{key} has {found} bytes, expected {size}")
    return problems


def prefixed(prefix: str, files: dict[str, list]) -> dict[str, list]:
    """A manifest's {relative key: entry} as {store key: entry}."""
    return {f"{prefix}/{k}": v for k, v in files.items()}


def delete_prefix(store: Store, prefix: str, keep: tuple[str, ...] = ()) -> None:
    """Delete every key under `prefix` ("" for the whole store) except the top-level names in `keep`."""
    if isinstance(store, LocalStore):
        base = Path(store.root) / prefix
        if not base.is_dir():
            return
        if prefix and not keep:
            shutil.rmtree(base)
            return
        for entry in base.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return
    delete_keys(store, [k for k in list_keys(store, prefix) if k[len(prefix) :].lstrip("/").split("/")[0] not in keep])


def delete_keys(store: Store, keys: list[str]) -> None:
    """Delete `keys` (missing ones are no error), concurrently."""

    async def _all():
        await asyncio.gather(*(store.delete(k) for k in keys))

    sync(_all())
