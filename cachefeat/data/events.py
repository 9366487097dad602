"""Event files (HDF5, ragged CSR) and padded batches.

Schema (version `SCHEMA_VERSION`), E events, H hits, P particles in all:

- `hits/<f>` float32 [H] for f in `HIT_FIELDS`; `hits/particle_index` int32 [H], the
  event-local index of the hit's reconstructable particle, -1 for any other hit.
- `particles/<f>` float32 [P] for f in `PARTICLE_FIELDS` (at the vertex).
- `events/hit_offsets`, `events/particle_offsets` int64 [E+1]; `events/event_id` int64 [E].
- attributes: `schema_version`, `hit_fields`, `particle_fields`, `units` (JSON), `generator`
  (JSON), `preset`, `seed`.

Hits of an event are sorted by layer, then by phi, so their order says nothing about truth.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from cachefeat.config import did_you_mean
from cachefeat.errors import UserError

SCHEMA_VERSION = 1
HIT_FIELDS = ("x", "y", "z", "r", "s", "eta", "phi", "u", "v", "layer")
PARTICLE_FIELDS = ("pt", "eta", "phi", "q", "vz")
UNITS = {
    "hits": {"x": "m", "y": "m", "z": "m", "r": "m", "s": "m", "eta": "1", "phi": "rad",
             "u": "1/m", "v": "1/m", "layer": "index", "particle_index": "index"},
    "particles": {"pt": "GeV", "eta": "1", "phi": "rad", "q": "e", "vz": "m"},
}
CHUNK_ROWS = 65536  # HDF5 chunk length of every dataset (256 KiB of float32)
_CACHE_BYTES = 64 << 20  # chunk cache per dataset: random batches reuse decompressed chunks


class EventFile:
    """Read-only view of an event HDF5 file.

    Attributes:
        hit_counts: int64 [E], hits per event.
        particle_counts: int64 [E], reconstructable particles per event.
        event_id: int64 [E].
        metadata: the file's attributes (JSON ones decoded).

    The HDF5 handle is opened lazily again after pickling or in a forked process, so an
    EventFile can be handed to DataLoader workers.
    """

    def __init__(self, path, hit_fields: list[str], particle_fields: list[str], max_hits: int | None = None):
        self.path = Path(path)
        self.hit_fields = list(hit_fields)
        self.particle_fields = list(particle_fields)
        self.max_hits = max_hits
        if not self.path.is_file():
            raise UserError(f"event file not found: {self.path}")
        if not h5py.is_hdf5(self.path):
            raise UserError(f"{self.path} is not an HDF5 file")
        self._file = None
        self._hash = None
        try:
            self._load(self._handle())
        except UserError:
            self.close()
            raise
        except OSError as exc:  # truncated or damaged: h5py's message says which
            self.close()
            raise UserError(f"{self.path} is not a readable HDF5 file ({str(exc).splitlines()[0]})") from exc

    def _load(self, f: h5py.File) -> None:
        """Validate the schema and fields; read the offsets and attributes."""
        version = f.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(
                f"{self.path}: event schema_version {version} is not supported (expected {SCHEMA_VERSION}); "
                "regenerate it with `cachefeat simulate`"
            )
        for name in ("events/hit_offsets", "events/particle_offsets", "events/event_id"):
            if name not in f:
                raise UserError(f"{self.path}: not a cachefeat event file (no {name})")
        for group, names in (("hits", [*self.hit_fields, "particle_index"]), ("particles", self.particle_fields)):
            have = list(f[group]) if group in f else []
            for name in names:
                if name not in have:
                    hint = did_you_mean(name, have)
                    raise UserError(f"{self.path}: no {group[:-1]} field '{name}'{hint} (fields: {', '.join(have)})")
        self._hit_offsets = f["events/hit_offsets"][:].astype(np.int64)
        self._particle_offsets = f["events/particle_offsets"][:].astype(np.int64)
        self.event_id = f["events/event_id"][:].astype(np.int64)
        self.hit_counts = np.diff(self._hit_offsets)
        self.particle_counts = np.diff(self._particle_offsets)
        self.metadata = {k: _decode(v) for k, v in f.attrs.items()}

    def __len__(self) -> int:
        return len(self.event_id)

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r", rdcc_nbytes=_CACHE_BYTES, rdcc_nslots=10007)
            self._pid = os.getpid()
            self._datasets = {}
        return self._file

    def _dataset(self, name: str) -> h5py.Dataset:
        """An open dataset; kept open because HDF5 drops a dataset's chunk cache when it closes."""
        f = self._handle()
        if name not in self._datasets:
            self._datasets[name] = f[name]
        return self._datasets[name]

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_datasets": {}}

    def read(self, indices) -> dict[str, torch.Tensor]:
        """Padded batch of the events `indices` (int [B], any order, repeats allowed), in that order.

        Returns, with M = max hits and P = max particles in the batch (each at least 1):
            event_id int64 [B]; hit_<f> float32 [B, M] (0 in padding); hit_valid bool [B, M];
            hit_particle_index int64 [B, M] (-1 for noise and padding); particle_<f> float32 [B, P];
            particle_valid bool [B, P]; particle_hit_valid bool [B, P, M] (hit m belongs to particle p).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"event index out of range [0, {len(self)}) in {self.path}")
        hit_counts = self.hit_counts[idx]
        if self.max_hits is not None and idx.size and hit_counts.max() > self.max_hits:
            b = int(np.argmax(hit_counts))
            eid = self.event_id[idx[b]]
            raise UserError(f"{self.path}: event {eid} has {hit_counts[b]} hits, more than max_hits={self.max_hits}")
        hits, hit_event, hit_pos, M = self._gather("hits", [*self.hit_fields, "particle_index"], self._hit_offsets, idx)
        parts, part_event, part_pos, P = self._gather("particles", self.particle_fields, self._particle_offsets, idx)
        B = idx.size

        out = {"event_id": torch.from_numpy(self.event_id[idx])}
        for kind, fields, rows, event, pos, width in (
            ("hit", self.hit_fields, hits, hit_event, hit_pos, M),
            ("particle", self.particle_fields, parts, part_event, part_pos, P),
        ):
            for name in fields:
                values = rows[name]
                if not np.isfinite(values).all():
                    eid = self.event_id[idx[event[np.argmin(np.isfinite(values))]]]
                    raise UserError(f"{self.path}: {kind} field '{name}' is NaN or infinite in event {eid}")
                padded = np.zeros(B * width, dtype=np.float32)
                padded[pos] = values
                out[f"{kind}_{name}"] = torch.from_numpy(padded.reshape(B, width))
            valid = np.zeros(B * width, dtype=bool)
            valid[pos] = True
            out[f"{kind}_valid"] = torch.from_numpy(valid.reshape(B, width))

        pidx = hits["particle_index"].astype(np.int64)
        beyond = pidx >= self.particle_counts[idx][hit_event]
        if beyond.any():
            eid = self.event_id[idx[hit_event[np.argmax(beyond)]]]
            raise UserError(f"{self.path}: event {eid} has a hit pointing past its particles (corrupt file?)")
        hit_pidx = np.full(B * M, -1, dtype=np.int64)
        hit_pidx[hit_pos] = pidx
        owned = pidx >= 0
        # Flat [B, P, M] position event*P*M + particle*M + m, with hit_pos = event*M + m.
        mask = np.zeros(B * P * M, dtype=bool)
        mask[hit_event[owned] * (P - 1) * M + pidx[owned] * M + hit_pos[owned]] = True
        out["hit_particle_index"] = torch.from_numpy(hit_pidx.reshape(B, M))
        out["particle_hit_valid"] = torch.from_numpy(mask.reshape(B, P, M))
        return out

    def block_batches(self, start: int, stop: int, batch_size: int) -> Iterator[tuple[np.ndarray, dict]]:
        """The events [start, stop) as padded batches of similar hit counts (`bucketed_batches`, no
        seed): (event indices relative to start, `read` of them) per batch. Extraction's batches."""
        for local in bucketed_batches(self.hit_counts[start:stop], batch_size, seed=None):
            yield local, self.read(start + local)

    def _gather(self, group: str, names: list[str], offsets: np.ndarray, idx: np.ndarray):
        """Rows of events `idx` from `group/<name>`, concatenated in the order of idx.

        One HDF5 read per dataset: the file selection is the union of the runs of contiguous
        rows the events cover (never one read per event).
        Returns ({name: rows}, event, pos, width): row k belongs to batch event event[k] and goes
        to position pos[k] of the flattened [B, width] padded layout, width = max(max count, 1).
        """
        unique = np.unique(idx)
        starts, stops = offsets[unique], offsets[unique + 1]
        first, last = np.ones(unique.size, bool), np.ones(unique.size, bool)
        first[1:] = last[:-1] = starts[1:] != stops[:-1]
        lo, hi = starts[first], stops[last]
        # Where each unique event's first row lands in the buffer holding the runs back to back.
        before = np.cumsum(stops - starts) - (stops - starts)

        counts = offsets[idx + 1] - offsets[idx]
        width = max(int(counts.max(initial=0)), 1)
        event = np.repeat(np.arange(idx.size), counts)
        m = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = before[np.searchsorted(unique, idx)][event] + m
        total = int((stops - starts).sum())
        space = None
        if total:
            space = h5py.h5s.create_simple((int(offsets[-1]),))
            space.select_none()
            for a, z in zip(lo.tolist(), hi.tolist()):
                if z > a:
                    space.select_hyperslab((a,), (z - a,), op=h5py.h5s.SELECT_OR)
        data = {}
        for name in names:
            ds = self._dataset(f"{group}/{name}")
            buf = np.empty(total, dtype=ds.dtype)
            if total:
                try:
                    ds.id.read(h5py.h5s.create_simple((total,)), space, buf)
                except OSError as exc:  # a failed fletcher32 checksum or decompression
                    raise UserError(f"{self.path}: cannot read {group}/{name} (corrupt file?): {exc}") from exc
            data[name] = buf[rows]
        return data, event, event * width + m, width

    def content_hash(self) -> str:
        """sha256 over every dataset's name, dtype, shape and bytes, and the schema version.

        Independent of the path, the modification time and the attributes.
        """
        if self._hash is None:
            f = self._handle()
            names = []
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            h = hashlib.sha256(f"cachefeat-events-v{SCHEMA_VERSION}".encode())
            for name in sorted(names):
                ds = f[name]
                h.update(f"{name}|{ds.dtype.str}|{ds.shape}".encode())
                step = CHUNK_ROWS * 16
                for start in range(0, ds.shape[0], step):
                    h.update(np.ascontiguousarray(ds[start:start + step]).tobytes())
            self._hash = h.hexdigest()
        return self._hash

    def close(self) -> None:
        if self._file is not None:
            self._datasets = {}
            self._file.close()
            self._file = None

    def __enter__(self) -> EventFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value.item() if isinstance(value, np.generic) else value


def bucketed_batches(
    hit_counts: np.ndarray, batch_size: int, seed: int | None = None, epoch: int = 0, bucket_size: int = 64
) -> list[np.ndarray]:
    """Batches of events with similar hit counts (less padding), as int64 event-index arrays.

    Events are taken in file order (seed None) or in a permutation drawn from (seed, epoch);
    each window of `bucket_size * batch_size` consecutive events is sorted by hit count
    (stable) and cut into batches of `batch_size` (only the last batch may be smaller). With a
    seed, the batch order is shuffled too; with seed None nothing is random. Every event
    appears exactly once; the result is a pure function of the arguments.
    """
    if batch_size < 1 or bucket_size < 1:
        raise UserError(f"batch_size and bucket_size must be >= 1 (got {batch_size}, {bucket_size})")
    counts = np.asarray(hit_counts)
    rng = None if seed is None else np.random.default_rng([seed, epoch])
    order = np.arange(counts.size) if rng is None else rng.permutation(counts.size)
    window = bucket_size * batch_size
    batches = []
    for start in range(0, order.size, window):
        part = order[start:start + window]
        part = part[np.argsort(counts[part], kind="stable")]
        batches.extend(part[i:i + batch_size].astype(np.int64) for i in range(0, part.size, batch_size))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
