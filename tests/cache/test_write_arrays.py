"""`schema.write_arrays` writes, file for file, what zarr's own `create_array` + `setitem` writes
for each array on its own (the reference: one array at a time, every parent group created by
zarr), for every kind of array a block holds: compressed and raw, 1-D and 2-D, several chunks,
empty, all zeros, with attributes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zarr
import zarr.api.asynchronous
from zarr.core.sync import sync
from zarr.storage import LocalStore

from cachefeat.cache import schema


def block_arrays(rows: int) -> dict[str, tuple[np.ndarray, dict | None]]:
    rng = np.random.default_rng(rows)
    embed = rng.normal(size=(rows, 32)).astype(np.float32)
    return {
        "events/hit_offsets": (np.arange(rows + 1, dtype=np.int64), None),
        "events/metrics/n_fake": (np.zeros(7, dtype=np.int64), None),  # all fill value: still written
        "hits/raw": (rng.normal(size=(rows, 10)).astype(np.float32), None),
        "hits/embed": (embed, None),
        "queries/embed": (embed[:0], None),  # empty: metadata only
        "queries/target_valid": (rng.random(rows) < 0.5, None),
        "pairs/query": (rng.integers(0, 100, rows).astype(np.int32), {"note": "kept"}),
    }


def reference_write(store, prefix: str, arrays) -> None:
    """zarr's one-array-at-a-time creation, with the codecs and chunks the schema names."""

    async def _all():
        for key, (data, attributes) in arrays.items():
            array = await zarr.api.asynchronous.create_array(
                store, name=f"{prefix}/{key}", shape=data.shape, dtype=data.dtype,
                chunks=schema.chunking(data.shape, data.dtype.itemsize), shards=None,
                compressors=schema.compressors(key not in schema.RAW_KEYS), fill_value=0,
                attributes=attributes or {}, config={"write_empty_chunks": True},
            )
            if data.size:
                await array.setitem(Ellipsis, data)

    sync(_all())


def files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("rows", [5, 40_000])  # 40,000 x 32 float32: 5 MB, two chunks of hits/embed
def test_files_equal_zarrs_own_creation(tmp_path, rows):
    arrays = block_arrays(rows)
    written = {}
    for name, write in (("ours", schema.write_arrays), ("zarr", reference_write)):
        store = LocalStore(tmp_path / name)
        zarr.create_group(store).create_group("blocks/000003")
        write(store, "blocks/000003", arrays)
        written[name] = files(tmp_path / name)
    assert sorted(written["ours"]) == sorted(written["zarr"])
    assert "blocks/000003/hits/embed/c/1/0" in written["ours"] or rows < 40_000
    assert "blocks/000003/events/metrics/n_fake/c/0" in written["ours"]
    for key, content in written["zarr"].items():
        assert written["ours"][key] == content, key
    group = zarr.open_group(tmp_path / "ours", mode="r")
    for key, (data, _) in arrays.items():
        np.testing.assert_array_equal(group[f"blocks/000003/{key}"][...], data)


def test_an_existing_array_is_refused(tmp_path):
    store = LocalStore(tmp_path / "c")
    zarr.create_group(store).create_group("b")
    arrays = block_arrays(5)
    schema.write_arrays(store, "b", arrays)
    with pytest.raises(zarr.errors.ContainsArrayError):
        schema.write_arrays(store, "b", {"hits/raw": arrays["hits/raw"]})


def test_every_write_settles_before_an_error(tmp_path, monkeypatch):
    """A failing chunk write raises only after the other arrays' writes have finished."""
    store = LocalStore(tmp_path / "c")
    zarr.create_group(store).create_group("b")
    finished = []
    real_set = LocalStore.set

    async def set_(self, key, value):
        if key.endswith("hits/raw/c/0/0"):
            raise OSError("disk failed")
        await asyncio.sleep(0.01)
        await real_set(self, key, value)
        finished.append(key)

    monkeypatch.setattr(LocalStore, "set", set_)
    with pytest.raises(OSError, match="disk failed"):
        schema.write_arrays(store, "b", block_arrays(5))
    assert "b/hits/embed/c/0/0" in finished
