"""Every array a cache stores is read and checked by the training read path.

`cachefeat train` opens a `CacheReader` and reads the cache either whole (`load`, --data memory)
or block by block (`stream`, --data stream). A flipped byte in any stored array (its chunks or
its zarr.json) must fail both with a `UserError` naming the array and the events: nothing is
stored that training does not read. The arrays come from the schema, and the test first checks
that they are exactly the arrays found on disk, so a new array cannot escape it.
"""

from __future__ import annotations

import json
import re

import pytest

from cachefeat.cache import CacheReader, schema
from cachefeat.errors import UserError
from tests.cache.test_store_integrity import BLOCK, write

METRICS = ["n_pred"]  # test_store_integrity.writer's metric names
BLOCK_UNDER_TEST = 1


def schema_arrays() -> list[str]:
    """Every per-block array the schema stores."""
    return [spec.key for spec in schema.DATA_ARRAYS] + schema.event_arrays(METRICS)


def stored_arrays(path) -> set[str]:
    """The arrays on disk (zarr.json with node_type array), keyed relative to their block."""
    found = set()
    for meta in path.rglob("zarr.json"):
        if json.loads(meta.read_text()).get("node_type") == "array":
            rel = meta.parent.relative_to(path).as_posix()
            block, _, key = rel.removeprefix(f"{schema.BLOCKS}/").partition("/")
            assert rel.startswith(f"{schema.BLOCKS}/") and block.isdigit(), f"{rel} is not in a block"
            found.add(key)
    return found


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write(tmp_path_factory.mktemp("every-array") / "c.zarr")


def test_schema_lists_every_stored_array(cache):
    assert stored_arrays(cache) == set(schema_arrays())


def _flipped(path, key: str, at: int | None = None):
    """A context that flips one byte of file `key` (the middle one by default) and restores it."""

    class Flip:
        def __enter__(self):
            self.data = (path / key).read_bytes()
            damaged = bytearray(self.data)
            damaged[len(damaged) // 2 if at is None else at] ^= 0x5A
            (path / key).write_bytes(bytes(damaged))

        def __exit__(self, *exc):
            (path / key).write_bytes(self.data)

    return Flip()


def _training_reads(path) -> list:
    """What `cachefeat train` reads of a training cache: memory mode, then stream mode."""
    return [
        lambda: CacheReader(path).load(),
        lambda: list(CacheReader(path).stream(batch_size=3, seed=0, epoch=0)),
    ]


@pytest.mark.parametrize("array", schema_arrays())
def test_a_flipped_byte_in_any_array_fails_training_reads(cache, array):
    prefix = f"{schema.block_key(BLOCK_UNDER_TEST)}/{array}"
    chunks = sorted(p.relative_to(cache).as_posix() for p in (cache / prefix / "c").rglob("*") if p.is_file())
    assert chunks, f"{prefix} has no chunk"
    start = BLOCK_UNDER_TEST * BLOCK
    named = re.escape(f"in {prefix} (events {start}-{start + BLOCK - 1})")
    for key in [*chunks, f"{prefix}/zarr.json"]:
        for read in _training_reads(cache):
            with _flipped(cache, key), pytest.raises(UserError, match=rf"{named}: the cache is corrupted"):
                read()
    for read in _training_reads(cache):  # undamaged again
        read()
