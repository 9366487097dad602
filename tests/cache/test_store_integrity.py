"""A damaged, incomplete, foreign or locked cache is refused with one clear line; never read as zeros."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess

import numpy as np
import pytest
import torch
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

from cachefeat.cache import CacheReader, CacheWriter, schema
from cachefeat.cache.store import open_store
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch

E, BLOCK, HITS, QUERIES, D = 20, 5, 3, 2, 4


def tiny_batch(n: int, seed: int) -> HeadBatch:
    """n events of HITS hits and QUERIES queries; every query pairs with every hit of its event."""
    g = torch.Generator().manual_seed(seed)
    q_event = torch.arange(n).repeat_interleave(QUERIES)
    pair_query = torch.arange(n * QUERIES).repeat_interleave(HITS)
    pair_hit = (q_event.repeat_interleave(HITS) * HITS) + torch.arange(HITS).repeat(n * QUERIES)
    return HeadBatch(
        event_id=torch.arange(n) + seed,
        hit_offsets=torch.arange(n + 1) * HITS,
        query_offsets=torch.arange(n + 1) * QUERIES,
        hit_raw=torch.randn(n * HITS, 2, generator=g),
        hit_embed=torch.randn(n * HITS, D, generator=g),
        query_embed=torch.randn(n * QUERIES, D, generator=g),
        query_valid_logit=torch.randn(n * QUERIES, generator=g),
        query_slot=torch.arange(QUERIES).repeat(n),
        target_index=torch.zeros(n * QUERIES, dtype=torch.long),
        targets=torch.randn(n * QUERIES, 1, generator=g),
        target_valid=torch.ones(n * QUERIES, dtype=torch.bool),
        pair_query=pair_query,
        pair_hit=pair_hit,
        pair_logit=torch.randn(len(pair_query), generator=g),
    )


def writer(location, mode="create", **kw) -> CacheWriter:
    return CacheWriter(
        location,
        fingerprint={"input_hash": "x"},
        settings={},
        raw_fields=["a", "b"],
        particle_fields=["pt"],
        dim=D,
        embed_dtype="float32",
        num_events=E,
        metric_names=["n_pred"],
        block_size=BLOCK,
        mode=mode,
        **kw,
    )


def write(location, blocks=None, finalize=True, mode="create"):
    w = writer(location, mode=mode)
    for block in w.pending_blocks() if blocks is None else blocks:
        w.write_block(block, tiny_batch(BLOCK, seed=block * BLOCK), {"n_pred": np.ones(BLOCK, np.int64)})
    if finalize:
        w.finalize()
    else:
        w.close()
    return location


@pytest.fixture
def small_chunks(monkeypatch):
    """Small chunks, so that hits/embed (15 x 4 float32 per block) is 4 chunks of 4 rows (the last padded)."""
    monkeypatch.setattr(schema, "CHUNK_BYTES", 64)


def flip_byte(store, key: str, at: int) -> None:
    data = bytearray(sync(store.get(key, prototype=default_buffer_prototype())).to_bytes())
    data[at] ^= 0xFF
    sync(store.set(key, Buffer.from_bytes(bytes(data))))


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_flipped_byte_names_array_and_events(tmp_path, small_chunks, kind):
    location = write(tmp_path / "c.zarr" if kind == "local" else MemoryStore())
    store, _ = open_store(location, read_only=False)
    flip_byte(store, "blocks/000001/hits/embed/c/0/0", 20)  # inside the first chunk (uncompressed)
    flip_byte(store, "blocks/000002/pairs/logit/c/0", 20)  # a Blosc-compressed array
    reader = CacheReader(location)  # sizes are unchanged: opening works
    reader.read_block(0)
    with pytest.raises(
        UserError, match=r"checksum mismatch in blocks/000001/hits/embed \(events 5-9\): .*--overwrite"
    ):
        reader.read_block(1)
    with pytest.raises(UserError, match=r"checksum mismatch in blocks/000001/hits/embed \(events 5-9\)"):
        reader.read_events(3, 7)
    with pytest.raises(UserError, match=r"checksum mismatch in blocks/000002/pairs/logit \(events 10-14\)"):
        reader.read_block(2)
    with pytest.raises(UserError, match="checksum mismatch"):
        reader.load()
    with pytest.raises(
        UserError, match=r"blocks/000001/hits/embed/c/0/0 has the wrong crc32c \(events 5-9\)"
    ):
        reader.verify()


def test_flipped_byte_in_padded_edge_chunk_and_checksum(tmp_path, small_chunks):
    path = write(tmp_path / "c.zarr")
    chunk = path / "blocks/000003/hits/embed/c/3/0"  # rows 12-14 and one padding row, then the crc32c
    flip_byte(LocalStore(path), "blocks/000003/hits/embed/c/3/0", chunk.stat().st_size - 6)  # padding
    with pytest.raises(UserError, match=r"in blocks/000003/hits/embed \(events 15-19\)"):
        CacheReader(path).read_block(3)
    flip_byte(LocalStore(path), "blocks/000003/hits/embed/c/3/0", chunk.stat().st_size - 6)  # undo
    CacheReader(path).read_block(3)
    flip_byte(LocalStore(path), "blocks/000003/hits/embed/c/3/0", chunk.stat().st_size - 1)  # the crc32c
    with pytest.raises(UserError, match=r"in blocks/000003/hits/embed \(events 15-19\)"):
        CacheReader(path).read_events(18, 20)  # a partial read of that chunk


@pytest.mark.parametrize(
    "key",
    [
        "blocks/000001/hits/embed/c/0/0",
        "blocks/000002/queries/targets/c/0/0",
        "blocks/000000/events/metrics/n_pred/c/0",
    ],
)
def test_deleted_or_truncated_file_is_refused_on_open(tmp_path, small_chunks, key):
    path = write(tmp_path / "c.zarr")
    block = int(key.split("/")[1])
    events = f"events {block * BLOCK}-{block * BLOCK + BLOCK - 1}"
    size = (path / key).stat().st_size
    with open(path / key, "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(
        UserError, match=rf"cache .* is damaged: {key} has {size - 3} bytes, expected {size} \({events}\)"
    ):
        CacheReader(path)
    (path / key).unlink()
    with pytest.raises(UserError, match=rf"is damaged: {key} is missing \({events}\)"):
        CacheReader(path)


def test_deleted_event_array_file_is_refused(tmp_path):
    path = write(tmp_path / "c.zarr")
    (path / "blocks/000002/events/hit_offsets/c/0").unlink()
    with pytest.raises(UserError, match=r"blocks/000002/events/hit_offsets/c/0 is missing \(events 10-14\)"):
        CacheReader(path)


def test_incomplete_cache_is_refused_with_resume_hint(tmp_path):
    path = write(tmp_path / "c.zarr", blocks=[0, 2], finalize=False)
    with pytest.raises(
        UserError,
        match=r"is incomplete \(2/4 blocks committed\): resume with `cachefeat extract \.\.\. --resume`",
    ):
        CacheReader(path)


def test_other_format_version_and_foreign_paths_are_refused(tmp_path):
    path = write(tmp_path / "c.zarr")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = schema.FORMAT_VERSION - 1  # a cache of the previous layout
    (path / "zarr.json").write_text(json.dumps(meta))
    (path / schema.METADATA_SUMS).unlink()  # format 1 had none
    with pytest.raises(
        UserError,
        match=rf"has format version {schema.FORMAT_VERSION - 1}, this cachefeat reads version "
        rf"{schema.FORMAT_VERSION}: re-extract it with --overwrite$",
    ):
        CacheReader(path)
    with pytest.raises(UserError, match="no cache at"):
        CacheReader(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a cachefeat cache"):
        CacheReader(tmp_path / "empty")


def test_live_lock_refuses_and_stale_lock_is_taken_over(tmp_path, caplog):
    path = tmp_path / "c.zarr"
    path.mkdir()
    lock = path / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(UserError, match=rf"locked by pid {os.getpid()} on .*another writer is running"):
        writer(path)
    assert lock.exists()

    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="cachefeat.cache.writer"):
        w = writer(path)
    assert f"stale lock of {path} (pid {dead.pid}" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    w.close()
    assert not lock.exists()


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    first = writer(tmp_path / "c.zarr")
    with pytest.raises(UserError, match=f"locked by pid {os.getpid()}"):
        writer(tmp_path / "c.zarr", mode="overwrite")
    first.close()


def test_disk_full_is_a_user_error_and_commits_nothing(tmp_path, monkeypatch):
    path = tmp_path / "c.zarr"
    original = LocalStore.set

    async def failing_set(self, key, value):
        if key.startswith("blocks/000001/") and "/c/" in key:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", failing_set)
    w = writer(path)
    for block in (0, 1, 2):
        w.write_block(block, tiny_batch(BLOCK, seed=block * BLOCK), {"n_pred": np.ones(BLOCK, np.int64)})
    with pytest.raises(UserError, match=rf"disk full while writing {path}: .*No space left"):
        w.close()
    assert not (path / ".lock").exists()
    assert not (path / "blocks/000001").exists()

    monkeypatch.setattr(LocalStore, "set", original)
    w = writer(path, mode="resume")
    assert w.pending_blocks() == [1, 2, 3]  # block 2 was queued behind the failure and dropped
    for block in w.pending_blocks():
        w.write_block(block, tiny_batch(BLOCK, seed=block * BLOCK), {"n_pred": np.ones(BLOCK, np.int64)})
    w.finalize()
    got = CacheReader(path).read_events(0, E)
    assert torch.equal(got.event_id, torch.arange(E))
