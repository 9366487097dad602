"""`cache_summary`: what a cache holds and what it costs, the report of `cachefeat info`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cachefeat.cache import schema

if TYPE_CHECKING:
    from cachefeat.cache.reader import CacheReader


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
        "metadata_checksummed": reader.metadata_checksummed,
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
