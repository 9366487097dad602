"""The Zarr v3 cache of the frozen backbone's head inputs (layout in `schema`).

`CacheWriter` commits blocks of `HeadBatch` events, `CacheReader`/`open_cache` read them
back (validated), `ResidentCache` holds a whole cache in (device) memory, and
`make_fingerprint`/`fingerprint_diff` tell whether a cache matches a config.
"""

from cachefeat.cache.fingerprint import fingerprint_diff, make_fingerprint
from cachefeat.cache.reader import CacheReader, ResidentCache, cache_summary, open_cache
from cachefeat.cache.schema import FORMAT_VERSION
from cachefeat.cache.writer import CacheWriter

__all__ = [
    "CacheReader",
    "CacheWriter",
    "FORMAT_VERSION",
    "ResidentCache",
    "cache_summary",
    "fingerprint_diff",
    "make_fingerprint",
    "open_cache",
]
