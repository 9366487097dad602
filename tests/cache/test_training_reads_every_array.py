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
import torch

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


def _flipped(path, key: str, at: int | None = None, mask: int = 0x5A):
    """A context that flips one byte of file `key` (the middle one by default; XOR `mask`) and restores it."""

    class Flip:
        def __enter__(self):
            self.data = (path / key).read_bytes()
            damaged = bytearray(self.data)
            damaged[len(damaged) // 2 if at is None else at] ^= mask
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


def metadata_files(path) -> list[str]:
    """Every file of a cache that is not a chunk: the zarr.json of the root, the groups and the
    arrays, and checksums.json."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and "/c/" not in p.as_posix())


def test_a_flipped_byte_in_any_metadata_file_fails_training_reads(cache):
    """Issue 15's target: every single-byte corruption of a finished cache is caught by training.
    Array chunks and array zarr.json are covered above; here the files that hold the root
    attributes, the manifests and the groups, and checksums.json itself, all checked when a
    training run opens the cache: for each file, byte positions spread over it (every byte of the
    small ones), each flipped with a pseudo-random mask, and at whitespace bytes also the masks that
    turn it into other whitespace (the parsed JSON is then unchanged; only a check of the bytes
    catches it)."""
    import random

    rng = random.Random(15)
    files = [f for f in metadata_files(cache) if f == schema.METADATA_SUMS or json.loads(
        (cache / f).read_bytes()).get("node_type") == "group"]
    assert {"zarr.json", schema.METADATA_SUMS, "blocks/zarr.json", "blocks/000000/zarr.json",
            "blocks/000000/hits/zarr.json", "blocks/000000/events/metrics/zarr.json"} <= set(files)
    flips = 0
    for key in files:
        data = (cache / key).read_bytes()
        step = 1 if key in (schema.METADATA_SUMS, "blocks/000001/hits/zarr.json") else 41
        for at in range(rng.randrange(step), len(data), step):
            masks = [rng.randrange(1, 256)]
            if data[at] in b" \n\t\r":
                masks += [data[at] ^ w for w in b" \n\t\r" if w != data[at]]
            for mask in masks:
                with _flipped(cache, key, at, mask), pytest.raises(UserError, match="the cache is|is damaged"):
                    CacheReader(cache)
                flips += 1
    assert flips > 500
    CacheReader(cache).load()  # undamaged again


def test_a_cache_completed_before_checksums_json_is_still_read(cache, tmp_path):
    """A cache completed before checksums.json existed (or by a run killed between marking it
    complete and writing it) is read as before, without the metadata check."""
    import shutil

    copy = tmp_path / "old.zarr"
    shutil.copytree(cache, copy)
    (copy / schema.METADATA_SUMS).unlink()
    old, new = CacheReader(copy), CacheReader(cache)
    assert not old.metadata_checksummed and new.metadata_checksummed
    got, want = old.read_events(0, old.num_events), new.read_events(0, new.num_events)
    for name, value in vars(want).items():
        assert torch.equal(getattr(got, name), value), name
