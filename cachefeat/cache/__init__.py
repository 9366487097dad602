"""The Zarr v3 cache of the frozen backbone's head inputs (layout in `schema`).

`CacheWriter` commits blocks of `HeadBatch` events; `CacheReader` reads them back (validated),
whole into memory as a `ResidentCache` (`resident`) or block by block (`stream`);
`cache_summary` (`summary`) reports what a cache holds; `make_fingerprint`, `check_cache` and
`fingerprint_diff` (`fingerprint`) tell whether a cache matches a config.
"""

from cachefeat.cache.fingerprint import cache_differences, check_cache, fingerprint_diff, make_fingerprint
from cachefeat.cache.reader import CacheReader
from cachefeat.cache.resident import ResidentCache
from cachefeat.cache.schema import FORMAT_VERSION
from cachefeat.cache.summary import cache_summary
from cachefeat.cache.writer import CacheWriter

__all__ = [
    "CacheReader",
    "CacheWriter",
    "FORMAT_VERSION",
    "ResidentCache",
    "cache_summary",
    "cache_differences",
    "check_cache",
    "fingerprint_diff",
    "make_fingerprint",
]
