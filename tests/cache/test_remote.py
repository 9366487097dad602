"""Caches at a URL: `root://` on a real xrootd server and `s3://` on a local S3 server (moto),
both started by the session fixtures of the root conftest (skipped when their packages are missing).

The reference is always the local cache of the same input, read from disk: a cache extracted to
a URL must hold the same arrays and the same bytes (block manifests), and a local cache copied
to the server with the server's own client must read back as the local one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cachefeat.cache import CacheReader
from cachefeat.cache.schema import list_keys, node_attributes
from cachefeat.cli import main
from cachefeat.errors import UserError


@pytest.fixture(params=["xrootd", "s3"])
def remote(request):
    return request.getfixturevalue(f"{request.param}_server")


_names = iter(range(10**6))


def fresh(remote, what: str) -> str:
    """A location on `remote` that nothing has used."""
    return remote.url(f"{what}-{next(_names)}.zarr")


def upload(remote, local: Path) -> str:
    """Copy a local cache, file by file, with the server's own client; its URL."""
    url = fresh(remote, "copy")
    name = url[len(remote.base) + 1 :]
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        remote.put(name, path.relative_to(local).as_posix(), path.read_bytes())
    return url


def manifests(location) -> list[dict]:
    """Every block's manifest (files with sizes and crc32c, events, counts), as the cache stores it."""
    reader = CacheReader(location)
    return [node_attributes(reader._store, [f"blocks/{b:06d}"])[0] for b in range(reader.num_blocks)]


def test_copied_cache_reads_as_local(remote, cache, ref):
    """A cache uploaded by the server's client reads back (train/verify/info's reader) as the local one."""
    url = upload(remote, cache)
    local, there = ref.cache_arrays(cache), ref.cache_arrays(url)
    assert local.keys() == there.keys()
    for key in local:
        np.testing.assert_array_equal(there[key], local[key], err_msg=key)
    CacheReader(url).verify()


def test_extract_to_url(remote, cache, config_file, checkpoint, events_file, ref, run_cli):
    """extract writes to the URL the same cache as to local disk; info and verify read it."""
    url = fresh(remote, "extract")
    assert main(["extract", *ref.extract_args(config_file, checkpoint, events_file, url)]) == 0
    local, there = ref.cache_arrays(cache), ref.cache_arrays(url)
    for key in local:
        np.testing.assert_array_equal(there[key], local[key], err_msg=key)
    assert manifests(url) == manifests(cache)  # the same files, sizes and crc32c
    assert remote.get(url[len(remote.base) + 1 :], ".lock") is None  # released
    rc, out, err = run_cli(["info", url, "--json", "--verify"])
    assert rc == 0, err
    rc_local, out_local, _ = run_cli(["info", str(cache), "--json"])
    info, info_local = json.loads(out), json.loads(out_local)
    assert info.pop("path") == url
    info_local.pop("path")
    assert info == info_local
    rc, out, err = run_cli(["verify", url, "--config", config_file, "--checkpoint", checkpoint,
                            "--input", events_file, "--events", "8"])
    assert rc == 0, out + err


def test_train_from_url(remote, cache, config_file, tmp_path, run_cli):
    """train over a cache at a URL, streamed block by block (reads from prefetch threads), gives the
    head that training over the local copy gives (memory mode reads as `cache_arrays` does)."""
    url = upload(remote, cache)
    heads = []
    for name, location in (("local", cache), ("remote", url)):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        rc, out, err = run_cli(["train", "--config", config_file, "--cache", location, "--val-cache", location,
                                "--output", tmp_path / name, "--data", "stream", "--max-steps", "3",
                                "--batch-size", "8", "--device", "cpu"])
        assert rc == 0, err
        heads.append(torch.load(tmp_path / name / "head.ckpt", map_location="cpu", weights_only=False))
    AcceleratorState._reset_state(reset_partial_state=True)
    local, there = (h["state_dict"] if "state_dict" in h else h for h in heads)
    assert local.keys() == there.keys()
    for key in local:
        if isinstance(local[key], torch.Tensor):
            torch.testing.assert_close(there[key], local[key], rtol=0, atol=0, msg=key)


def test_flipped_byte_is_caught(remote, cache, assert_cli_error):
    """One flipped byte in a chunk object: the reader's crc32c check and `info --verify` name it."""
    url = upload(remote, cache)
    name = url[len(remote.base) + 1 :]
    key = "blocks/000001/hits/embed/c/0/0"
    data = bytearray(remote.get(name, key))
    data[len(data) // 2] ^= 0x10
    remote.put(name, key, bytes(data))
    with pytest.raises(UserError, match="checksum mismatch in blocks/000001/hits/embed"):
        CacheReader(url).read_block(1)
    assert_cli_error(["info", url, "--verify"], "blocks/000001/hits/embed/c/0/0 has the wrong crc32c")


@pytest.mark.slow
def test_kill_then_resume(remote, cache, config_file, checkpoint, events_file, ref):
    """SIGKILL of an extraction to a URL after its first commit; --resume then gives the local cache."""
    url = fresh(remote, "killed")
    name = url[len(remote.base) + 1 :]
    args = ref.extract_args(config_file, checkpoint, events_file, url)

    def committed() -> bool:
        raw = remote.get(name, "blocks/000000/zarr.json")
        return raw is not None and json.loads(raw).get("attributes", {}).get("committed", False)

    ref.kill_when(args, committed)
    assert remote.get(name, ".lock") is not None  # the killed writer's lock: stale (same host, dead pid)
    with pytest.raises(UserError, match="incomplete"):
        CacheReader(url)
    assert main(["extract", *args, "--resume"]) == 0
    assert not [k for k in list_keys(CacheReader(url)._store, "") if k.endswith(".partial") or k == ".lock"]
    local, there = ref.cache_arrays(cache), ref.cache_arrays(url)
    for key in local:
        np.testing.assert_array_equal(there[key], local[key], err_msg=key)
    assert manifests(url) == manifests(cache)


def test_lock_held(remote, config_file, checkpoint, events_file, ref, assert_cli_error):
    """A lock of a live writer (here: pid 1 on this host) stops a second writer with one line."""
    url = fresh(remote, "locked")
    remote.put(url[len(remote.base) + 1 :], ".lock", json.dumps({"pid": 1, "host": socket.gethostname()}).encode())
    assert_cli_error(["extract", *ref.extract_args(config_file, checkpoint, events_file, url)],
                     "is locked by pid 1")


def test_missing_cache(remote, assert_cli_error):
    assert_cli_error(["info", fresh(remote, "nothing")], "no cache at")


def test_unreachable_xrootd():
    """In a fresh process: the xrootd client reads its settings once, on load. With its default
    retries (XRD_CONNECTIONRETRY=5 times XRD_CONNECTIONWINDOW) a refused connection is reported
    only after minutes; one retry makes it immediate."""
    pytest.importorskip("XRootD.client", reason="the xrootd client: pip install -e '.[remote]'")
    url = "root://127.0.0.1:1//nothing.zarr"
    proc = subprocess.run([sys.executable, "-m", "cachefeat", "info", url], capture_output=True, text=True,
                          env={**os.environ, "XRD_CONNECTIONRETRY": "1"}, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"cachefeat info: error: cannot reach {url}"), proc.stderr


def test_unreachable_s3(assert_cli_error, monkeypatch):
    pytest.importorskip("obstore", reason="the S3 client: pip install -e '.[remote]'")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert_cli_error(["info", "s3://bucket/nothing.zarr"], "cannot reach s3://bucket/nothing.zarr")


def test_missing_bucket(s3_server, config_file, checkpoint, events_file, ref, assert_cli_error):
    url = "s3://no-such-bucket/cache.zarr"
    assert_cli_error(["extract", *ref.extract_args(config_file, checkpoint, events_file, url)],
                     f"cannot create {url}/.lock: FileNotFoundError")


def test_xrootd_store_answers_as_a_memory_store(xrootd_server):
    """XRootDStore against zarr's MemoryStore (the reference) on the same operations: gets (whole,
    ranges, missing), listings, sizes, deletes; then its exclusive create (MemoryStore has none)."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.buffer.cpu import Buffer
    from zarr.core.sync import sync
    from zarr.storage import MemoryStore

    from cachefeat.cache.store import create_exclusive
    from cachefeat.cache.xrootd import XRootDStore

    stores = [XRootDStore(fresh(xrootd_server, "store")), MemoryStore()]
    proto = default_buffer_prototype()
    keys = {"zarr.json": b"{}", "a/zarr.json": b"[1]", "a/c/0": bytes(range(200)), "a/c/1": b"", "b/x": b"xyz"}

    def run(store):
        async def ops():
            for key, data in keys.items():
                await store.set(key, Buffer.from_bytes(data))
            out = {}
            for rng in (None, RangeByteRequest(10, 20), RangeByteRequest(5, 5), OffsetByteRequest(190),
                        SuffixByteRequest(7)):
                got = await store.get("a/c/0", proto, rng)
                out[repr(rng)] = got.to_bytes()
            out["missing"] = await store.get("a/c/9", proto)
            out["empty"] = (await store.get("a/c/1", proto)).to_bytes()
            out["all"] = sorted([k async for k in store.list()])
            out["prefix"] = sorted([k async for k in store.list_prefix("a/")])
            out["dir"] = sorted([k async for k in store.list_dir("a")])
            out["size"] = await store.getsize("a/c/0")
            out["exists"] = [await store.exists(k) for k in ("b/x", "b", "nope")]
            await store.delete("b/x")
            await store.delete("b/never")
            out["after delete"] = sorted([k async for k in store.list_prefix("b")])
            return out

        return sync(ops())

    there, reference = (run(s) for s in stores)
    assert there == reference
    xrootd = stores[0]
    assert [create_exclusive(xrootd, "lock", b"1"), create_exclusive(xrootd, "lock", b"2")] == [True, False]
    assert sync(xrootd.get("lock", proto)).to_bytes() == b"1"
