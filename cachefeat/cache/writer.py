"""`CacheWriter`: commit blocks of `HeadBatch` events to a Zarr v3 cache (layout in `schema`).

Events are grouped into fixed blocks of `block_size` consecutive events; a block is written
by one process in one piece and committed by writing its manifest last, so a killed run
leaves only uncommitted blocks, which `mode="resume"` rewrites. Writes go through one
background thread with a bounded queue, so the caller's forward pass overlaps the disk.

Multi-process protocol (ranks write disjoint, contiguous block ranges; no file is shared):

1. rank 0 constructs its writer first: it takes `<cache>/.lock`, applies `mode` and
   creates (or checks) the root;
2. barrier; ranks r > 0 construct theirs: they open the existing root (their arguments must
   match it), take no lock, and ignore `mode`;
3. every rank writes `write_block(b, ...)` for b in `pending_blocks()`, then `close()`;
4. barrier; rank 0 calls `finalize()`, which checks every block and marks the cache complete.

A single process is the world-size-1 case: construct, write, `finalize()` (which closes).
There the input's content hash may still be computing when the writer is constructed
(`input_hash`, a Future): the root then records `"input_hash_pending": true` and the hash is
stored before the first block commits, so a cache whose hash is pending holds no committed
block, and `resume` starts it again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import socket
import threading
from concurrent.futures import Future

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from cachefeat.cache import schema
from cachefeat.cache.fingerprint import fingerprint_diff
from cachefeat.cache.store import create_exclusive, describe, open_store, supports_lock
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch

log = logging.getLogger(__name__)

MODES = ("create", "resume", "overwrite")
_TORCH_EMBED = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Lock:
    """`<cache>/.lock` holding {"pid", "host"}, created only if absent (`store.create_exclusive`:
    the storage decides, also on xrootd and S3). A lock whose host is this one and whose pid is
    not running is stale and taken over; a lock from another host cannot be checked from here."""

    def __init__(self, store, where: str):
        self.store = store
        self.where = where
        self.path = f"{where.rstrip('/')}/{schema.LOCK_NAME}"
        self.held = False

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(schema.read_bytes(self.store, [schema.LOCK_NAME])[0] or b"")
        except ValueError:
            return None
        return holder if isinstance(holder, dict) else None

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for attempt in range(2):
            if create_exclusive(self.store, schema.LOCK_NAME, json.dumps(me).encode()):
                self.held = True
                return
            holder = self._holder()
            if holder is None:
                raise UserError(
                    f"cache {self.where} has an unreadable lock {self.path}; delete it if no writer is running"
                )
            if attempt == 0 and holder.get("host") == me["host"] and not _pid_alive(holder.get("pid")):
                log.warning("taking over the stale lock of %s (pid %s is not running)", self.where, holder.get("pid"))
                sync(self.store.delete(schema.LOCK_NAME))
                continue
            raise UserError(
                f"cache {self.where} is locked by pid {holder.get('pid')} on {holder.get('host')}: "
                f"another writer is running (if not, delete {self.path})"
            )

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                sync(self.store.delete(schema.LOCK_NAME))
            self.held = False


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json(value):
    """The value as it reads back from zarr attributes (lists, not tuples)."""
    return json.loads(json.dumps(value))


class CacheWriter:
    """Write a cache of `num_events` events, one commit block at a time.

    Args:
        path: cache directory, URL (`store`: root://..., s3://...) or a zarr Store (no lock is
            taken on a Store other than a local, xrootd or obstore one, e.g. MemoryStore).
        fingerprint: `make_fingerprint(...)` of the extraction (any JSON dict).
        settings: all extraction settings (JSON), stored for `info`.
        raw_fields, particle_fields: F raw hit fields and T target fields, in column order.
        dim: D, the embedding size. embed_dtype: storage dtype of hit/query embeddings.
        num_events: E; cache event i is input event i.
        metric_names: names of the int64 per-event counts passed to `write_block`.
        block_size: events per commit block (layout, not content).
        mode: "create" (nothing there), "resume" (same fingerprint and layout; committed blocks
            are kept, orphaned `*.partial` files removed; nothing there: created) or "overwrite"
            (delete an existing cache). Only rank 0 applies it.
        rank, world: this process and the number of writer processes (see the module docs).
        queue_depth: blocks that may wait for the writer thread.
        input_hash: a Future of the fingerprint's "input_hash" (world 1 only), for a hash computed
            alongside the extraction: waited for before the first block commits, at `close`, or
            at opening when an existing cache must be compared with it. The fingerprint's own
            "input_hash" is then ignored.
    """

    def __init__(
        self,
        path,
        *,
        fingerprint: dict,
        settings: dict,
        raw_fields: list[str],
        particle_fields: list[str],
        dim: int,
        embed_dtype: str,
        num_events: int,
        metric_names: list[str],
        block_size: int = 4096,
        mode: str = "create",
        rank: int = 0,
        world: int = 1,
        queue_depth: int = 2,
        input_hash: Future | None = None,
    ):
        if embed_dtype not in schema.EMBED_DTYPES:
            raise UserError(
                f"embed_dtype must be one of {', '.join(schema.EMBED_DTYPES)}, not {embed_dtype!r}"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        if input_hash is not None and world != 1:
            raise ValueError("a pending input_hash needs world size 1 (other ranks compare the root with theirs)")
        if block_size < 1 or num_events < 0:
            raise ValueError("block_size must be >= 1 and num_events >= 0")
        if len(set(metric_names)) != len(metric_names) or any("/" in m or not m for m in metric_names):
            raise ValueError(f"metric names must be unique, non-empty and without '/': {metric_names}")
        self.path = path
        self.rank, self.world = rank, world
        self.block_size, self.num_events = block_size, num_events
        self.num_blocks = schema.num_blocks(num_events, block_size)
        self.embed_dtype, self.dim = embed_dtype, dim
        self.raw_fields, self.particle_fields = list(raw_fields), list(particle_fields)
        self.metric_names = list(metric_names)
        self.bytes_written = 0
        self._where = describe(path)
        self._input_hash = input_hash
        if input_hash is not None:
            fingerprint = {**fingerprint, "input_hash": None}
        self._attrs = _json(
            {
                "format_version": schema.FORMAT_VERSION,
                "fingerprint": fingerprint,
                "input_hash_pending": input_hash is not None,
                "settings": settings,
                "raw_fields": self.raw_fields,
                "particle_fields": self.particle_fields,
                "dim": dim,
                "embed_dtype": embed_dtype,
                "num_events": num_events,
                "block_size": block_size,
                "metric_names": self.metric_names,
                "num_blocks": self.num_blocks,
                "complete": False,
            }
        )
        try:
            self._store, local = open_store(path, read_only=False)
        except (FileExistsError, NotADirectoryError) as exc:
            raise UserError(f"cannot create cache {self._where}: {exc}") from exc
        self._local = local
        self._lock = _Lock(self._store, self._where) if supports_lock(self._store) and rank == 0 else None
        if rank == 0:
            self._open_main(mode)
        else:
            self._open_other()
        self._root = zarr.open_group(self._store, mode="r+", use_consolidated=False)
        self._error: BaseException | None = None
        self._closed = False
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_depth))
        self._thread = threading.Thread(target=self._run, name="cachefeat-cache-writer", daemon=True)
        self._thread.start()

    # --- opening ------------------------------------------------------------------------------

    def _remove_orphans(self) -> None:
        """Delete the `*.partial` files a killed writer left (zarr's LocalStore and `XRootDStore`
        write each file under a temporary `<name>.<uuid>.partial` name, then rename it): no live
        writer holds them, the lock says so. S3 writes objects whole and leaves none."""
        if self._local is not None:
            orphans = [str(p.relative_to(self._local)) for p in self._local.rglob("*.partial")]
        else:
            orphans = [k for k in schema.list_keys(self._store, "") if k.endswith(".partial")]
        schema.delete_keys(self._store, orphans)
        for orphan in orphans:
            log.debug("removed %s, left by an interrupted write", orphan)

    def _open_main(self, mode: str) -> None:
        if self._lock is not None:
            self._lock.acquire()
        try:
            existing = schema.node_attributes(self._store, [""])[0]
            is_cache = existing is not None and "format_version" in existing
            others = [k for k in schema.list_keys(self._store, "") if k != schema.LOCK_NAME]
            if mode == "create":
                if is_cache and existing.get("complete"):
                    raise UserError(f"cache {self._where} exists; use --overwrite")
                if is_cache:
                    raise UserError(f"cache {self._where} is incomplete; use --resume or --overwrite")
                if others:
                    raise UserError(f"{self._where} exists and is not empty; choose another path")
                self._create_root()
            elif mode == "resume" and not is_cache:
                # nothing to resume yet: start it, so a retried job can always pass --resume
                if others:
                    raise UserError(f"cannot resume {self._where}: it is not a cachefeat cache")
                self._create_root()
            elif mode == "resume" and existing.get("input_hash_pending"):
                # killed before its first commit (the hash is stored before it): nothing to keep
                log.info("cache %s has no committed block yet; starting it again", self._where)
                schema.delete_prefix(self._store, "", keep=(schema.LOCK_NAME,))
                self._create_root()
            elif mode == "resume":
                self._store_input_hash(root=None)
                self._check_matches(existing, "resume")
                self._remove_orphans()
                # incomplete again until `finalize`, which re-checks every block and records the
                # metadata's checksums anew
                schema.delete_keys(self._store, [schema.METADATA_SUMS])
                zarr.open_group(self._store, mode="r+", use_consolidated=False).update_attributes(
                    {"complete": False}
                )
            else:
                if others and not is_cache:
                    raise UserError(
                        f"{self._where} exists and is not a cachefeat cache; refusing to delete it"
                    )
                schema.delete_prefix(self._store, "", keep=(schema.LOCK_NAME,))
                self._create_root()
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _create_root(self) -> None:
        root = zarr.create_group(self._store, attributes=self._attrs, overwrite=False)
        root.create_group(schema.BLOCKS)

    def _store_input_hash(self, root) -> None:
        """Wait for a pending input hash and put it in the fingerprint (and in `root`'s
        attributes, when given); a no-op once done. A failed hash raises here."""
        if self._input_hash is None:
            return
        fingerprint = {**self._attrs["fingerprint"], "input_hash": self._input_hash.result()}
        self._attrs.update(fingerprint=fingerprint, input_hash_pending=False)
        if root is not None:
            root.update_attributes({"fingerprint": fingerprint, "input_hash_pending": False})
        self._input_hash = None

    def _open_other(self) -> None:
        existing = schema.node_attributes(self._store, [""])[0]
        if existing is None or "format_version" not in existing:
            raise RuntimeError(
                f"rank {self.rank}: no cache root at {self._where}; rank 0 must construct "
                "its CacheWriter before the other ranks (barrier in between)"
            )
        self._check_matches(existing, f"write rank {self.rank} of")

    def _check_matches(self, existing: dict, action: str) -> None:
        diffs = [
            f"{k}: {existing.get(k)} vs {self._attrs[k]}"
            for k in schema.LAYOUT_ATTRS
            if existing.get(k) != self._attrs[k]
        ]
        stale, warnings = fingerprint_diff(existing.get("fingerprint") or {}, self._attrs["fingerprint"])
        old, new = existing.get("settings") or {}, self._attrs["settings"]
        diffs += stale + [
            f"settings.{k}: {old.get(k)} vs {new.get(k)}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
        for w in warnings:
            log.warning("cache %s was written with %s", self._where, w)
        if diffs:
            raise UserError(
                f"cannot {action} {self._where}, it differs (cache vs now): "
                + "; ".join(dict.fromkeys(diffs))
            )

    # --- blocks -------------------------------------------------------------------------------

    def block_range(self, block: int) -> tuple[int, int]:
        """[start, stop) event range of `block`."""
        return schema.block_range(block, self.num_events, self.block_size)

    def my_blocks(self) -> list[int]:
        """This rank's blocks: a contiguous range, the split as even as possible over `world`."""
        return list(
            range(self.rank * self.num_blocks // self.world, (self.rank + 1) * self.num_blocks // self.world)
        )

    def pending_blocks(self) -> list[int]:
        """`my_blocks()` minus those committed with all their files present."""
        states = self._block_states(self.my_blocks())
        for block, state in states.items():
            if state not in (None, "not committed"):
                log.warning("block %d of %s is damaged (%s); it will be rewritten", block, self._where, state)
        return [block for block, state in states.items() if state is not None]

    def _block_states(self, blocks: list[int]) -> dict[int, str | None]:
        """None for each block committed with every listed file at its size, else what is wrong."""
        manifests = schema.node_attributes(self._store, [schema.block_key(b) for b in blocks])
        states, expected, owner = {}, {}, {}
        for block, manifest in zip(blocks, manifests):
            if not (
                manifest
                and manifest.get("committed")
                and manifest.get("events") == list(self.block_range(block))
            ):
                states[block] = "not committed"
                continue
            states[block] = None
            files = schema.prefixed(schema.block_key(block), manifest["files"])
            expected.update(files)
            owner.update(dict.fromkeys(files, block))
        for problem in schema.check_files(self._store, expected):
            block = owner[problem.split(" ", 1)[0]]
            states[block] = states[block] or problem
        return states

    def write_block(self, block: int, hb: HeadBatch, metrics: dict[str, np.ndarray]) -> None:
        """Queue `block` for writing.

        `hb` holds exactly the block's events, in order, as CPU tensors (pairs event-major,
        batch-global rows as `HeadBatch` defines them); `metrics` maps every metric name to
        int [n]. Embeddings are converted to the storage dtype here; other arrays may be
        written from the caller's memory, so do not modify `hb` in place afterwards. Raises
        the writer thread's error, if an earlier block failed.
        """
        if self._closed:
            raise RuntimeError("write_block after close()")
        if self._error is not None:
            raise self._error
        if block not in self.my_blocks():
            raise ValueError(f"block {block} is not one of rank {self.rank}'s blocks {self.my_blocks()}")
        arrays = self._encode(block, hb, metrics)
        self._queue.put((block, arrays))

    def _encode(self, block: int, hb: HeadBatch, metrics: dict) -> dict[str, np.ndarray]:
        """The block's arrays by schema key, validated, with event-local pair rows."""
        start, stop = self.block_range(block)
        n = stop - start
        if hb.num_events != n:
            raise ValueError(
                f"block {block} holds events {start}-{stop - 1} ({n}), got {hb.num_events} events"
            )
        if set(metrics) != set(self.metric_names):
            raise ValueError(f"metrics must be exactly {self.metric_names}, got {sorted(metrics)}")

        def host(t):
            return t.detach().cpu()

        out: dict[str, np.ndarray] = {}
        offsets = {
            "H": host(hb.hit_offsets).numpy().astype(np.int64),
            "Q": host(hb.query_offsets).numpy().astype(np.int64),
        }
        counts = {"H": hb.hit_raw.shape[0], "Q": hb.query_embed.shape[0], "P": hb.pair_logit.shape[0]}
        for sym in ("H", "Q"):
            off = offsets[sym]
            if off.shape != (n + 1,) or off[0] != 0 or off[-1] != counts[sym] or np.any(np.diff(off) < 0):
                raise ValueError(
                    f"{schema.OFFSET_ARRAYS[sym]}: offsets must be [n+1], non-decreasing "
                    f"from 0 to {counts[sym]}"
                )

        pair_query = host(hb.pair_query).numpy().astype(np.int64)
        pair_hit = host(hb.pair_hit).numpy().astype(np.int64)
        if pair_query.size and (
            pair_query.min() < 0
            or pair_query.max() >= counts["Q"]
            or pair_hit.min() < 0
            or pair_hit.max() >= counts["H"]
        ):
            raise ValueError("pair rows outside the batch's hit or query rows")
        query_event = np.repeat(np.arange(n), np.diff(offsets["Q"]))
        hit_event = np.repeat(np.arange(n), np.diff(offsets["H"]))
        pair_event = query_event[pair_query]
        if np.any(np.diff(pair_event) < 0) or not np.array_equal(hit_event[pair_hit], pair_event):
            raise ValueError("pairs must be event-major and join a query and a hit of the same event")
        offsets["P"] = np.concatenate([[0], np.cumsum(np.bincount(pair_event, minlength=n))]).astype(np.int64)
        for sym, key in schema.OFFSET_ARRAYS.items():
            out[key] = offsets[sym]
        out[schema.EVENT_ID] = host(hb.event_id).numpy().astype(np.int64)
        for name in self.metric_names:
            value = np.asarray(
                host(metrics[name]) if isinstance(metrics[name], torch.Tensor) else metrics[name]
            )
            if value.shape != (n,) or not (np.issubdtype(value.dtype, np.integer) or value.dtype == bool):
                raise ValueError(f"metric {name!r} must be integer [{n}], got {value.dtype} {value.shape}")
            out[schema.metric_key(name)] = value.astype(np.int64)

        batch_rows = {"pair_query": pair_query, "pair_hit": pair_hit}
        local = {name: batch_rows[name] - offsets[rows][pair_event] for name, rows in schema.PAIR_ROWS.items()}
        cols = {"F": len(self.raw_fields), "D": self.dim, "T": len(self.particle_fields)}
        for spec in schema.DATA_ARRAYS:
            dtype = schema.storage_dtype(spec, self.embed_dtype)
            if spec.field in local:
                out[spec.key] = local[spec.field].astype(dtype)
                continue
            tensor = host(getattr(hb, spec.field))
            shape = (counts[spec.rows],) if spec.cols is None else (counts[spec.rows], cols[spec.cols])
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{spec.field} must have shape {shape}, got {tuple(tensor.shape)}")
            if spec.dtype == "embed":
                tensor = tensor.to(_TORCH_EMBED[self.embed_dtype])
                if self.embed_dtype == "bfloat16":  # no numpy bfloat16: keep the bits
                    tensor = tensor.view(torch.int16)
                out[spec.key] = np.ascontiguousarray(tensor.numpy()).view(dtype)
            else:
                out[spec.key] = np.ascontiguousarray(tensor.numpy(), dtype=dtype)
        return out

    # --- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain, so that a producer never blocks on a full queue
            block, arrays = item
            try:
                self._write(block, arrays)
            except BaseException as exc:  # re-raised in the caller's thread
                self._error = self._wrap(exc)
                try:
                    schema.delete_prefix(self._store, schema.block_key(block))
                except OSError as cleanup:
                    log.warning(
                        "could not remove the partial block %d of %s: %s", block, self._where, cleanup
                    )

    def _wrap(self, exc: BaseException) -> BaseException:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            err = UserError(f"disk full while writing {self._where}: {exc}")
            err.__cause__ = exc
            return err
        return exc

    def _write(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        self._store_input_hash(self._root)  # before any block commits
        prefix = schema.block_key(block)
        start, stop = self.block_range(block)
        group = self._root.create_group(prefix, overwrite=True)  # drops a partial block from a killed run
        bf16 = {"logical_dtype": "bfloat16"} if self.embed_dtype == "bfloat16" else None
        schema.write_arrays(
            self._store, prefix, {k: (v, bf16 if k.endswith("/embed") else None) for k, v in arrays.items()}
        )
        files = schema.manifest_files(self._store, prefix)
        counts = {schema.COUNT_NAMES[s]: int(arrays[k][-1]) for s, k in schema.OFFSET_ARRAYS.items()}
        group.update_attributes(schema.block_manifest(start, stop, counts, files))
        self.bytes_written += sum(size for size, _ in files.values())
        log.debug("committed block %d (events %d-%d) of %s", block, start, stop - 1, self._where)

    # --- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush the queue, join the writer thread, release the lock; re-raise a write error."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        try:
            if self._error is None:
                self._store_input_hash(self._root)  # a run that committed no block
        finally:
            if self._lock is not None:
                self._lock.release()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:
            log.exception("while closing %s after an error", self._where)

    def finalize(self) -> None:
        """Rank 0, after every rank closed: check every block is committed with its files
        present and mark the cache complete (there is no index to build: readers read the
        blocks' `events/*` arrays)."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 finalizes a cache")
        self.close()
        if self._lock is not None:
            self._lock.acquire()
        try:
            self._finalize()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _finalize(self) -> None:
        states = self._block_states(list(range(self.num_blocks)))
        missing = [b for b, state in states.items() if state == "not committed"]
        if missing:
            raise UserError(
                f"cannot finalize {self._where}: {len(missing)}/{self.num_blocks} blocks are not "
                f"committed (first: block {missing[0]}); run the missing ranks or resume"
            )
        for block, state in states.items():
            if state is not None:
                start, stop = self.block_range(block)
                raise UserError(
                    f"cannot finalize {self._where}: {state} (events {start}-{stop - 1}); resume to rewrite"
                )
        self._root.update_attributes({"complete": True})  # readers accept the cache from here
        # then the checksums of the metadata as it now is (a run killed in between leaves a complete
        # cache without them, read as one completed before they existed)
        schema.write_metadata_sums(self._store, self.num_blocks)
        log.info("cache %s complete: %d events in %d blocks", self._where, self.num_events, self.num_blocks)
