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


def test_s3_sizes_come_from_one_listing(s3_server, cache, monkeypatch):
    """On S3 the sizes of many keys (a reader's open, a writer's check of a block) come from a listing
    of their common folder, not a HEAD each: the sizes of the local files, None for a missing key."""
    from cachefeat.cache.schema import file_sizes
    from cachefeat.cache.store import open_store

    url = upload(s3_server, cache)
    store, _ = open_store(url, read_only=True)
    keys = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    block = [k for k in keys if k.startswith("blocks/000001/")]
    assert len(block) > 10

    async def no_head(key):
        raise AssertionError(f"a HEAD request for {key}")

    monkeypatch.setattr(store, "getsize", no_head)
    for wanted in (keys, block, block[:2] + ["blocks/000001/hits/embed/c/9/0"]):
        assert file_sizes(store, wanted) == [(cache / k).stat().st_size if (cache / k).exists() else None
                                             for k in wanted]


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


# --- evaluate, sweep and multi-process extraction against a URL ----------------------------------


@pytest.fixture(scope="module")
def head_ckpt(cache, config_file, tmp_path_factory):
    """A head trained for 2 steps over the local cache (its fingerprint: the cache's)."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("remote-head")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert main(["train", "--config", str(config_file), "--cache", str(cache), "--val-cache", str(cache),
                     "--output", str(out / "run"), "--max-steps", "2", "--batch-size", "16", "--device", "cpu"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return out / "run" / "head.ckpt"


def _h5_columns(path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f} | {f"attr.{k}": v for k, v in f.attrs.items()}


def test_evaluate_from_url(remote, cache, config_file, head_ckpt, tmp_path, run_cli, monkeypatch):
    """evaluate over a cache at a URL writes the predictions and metrics that the local copy gives.
    The plots (seconds of matplotlib, drawn from these same columns) are left out of both runs."""
    import cachefeat.evaluation.plots

    monkeypatch.setattr(cachefeat.evaluation.plots, "make_plots", lambda columns, out: None)
    url = upload(remote, cache)
    for name, location in (("local", cache), ("remote", url)):
        rc, out, err = run_cli(["evaluate", "--config", config_file, "--head", head_ckpt, "--cache", location,
                                "--output", tmp_path / name, "--bz", "2.0", "--batch-size", "20",
                                "--device", "cpu", "--no-progress"])
        assert rc == 0, err
    local, there = (_h5_columns(tmp_path / name / "predictions.h5") for name in ("local", "remote"))
    assert local.keys() == there.keys() and len(local["event_id"]) == 2 * 48
    for key in local:
        np.testing.assert_array_equal(there[key], local[key], err_msg=key)
    assert (tmp_path / "remote" / "metrics.json").read_text() == (tmp_path / "local" / "metrics.json").read_text()


def test_evaluate_missing_cache(remote, config_file, head_ckpt, tmp_path, assert_cli_error):
    assert_cli_error(["evaluate", "--config", config_file, "--head", head_ckpt, "--cache", fresh(remote, "nothing"),
                      "--output", tmp_path / "eval", "--bz", "2.0", "--device", "cpu"], "no cache at")
    assert not (tmp_path / "eval").exists()


def test_local_outputs_refuse_a_url(cache, config_file, head_ckpt, tmp_path, monkeypatch, assert_cli_error):
    """train, sweep and evaluate write local files: a URL --output is one line, exit 2, and leaves no
    local directory `s3:/...` behind (it used to become one)."""
    monkeypatch.chdir(tmp_path)
    caches = ["--cache", cache, "--val-cache", cache]
    for argv in (["train", "--config", config_file, *caches, "--output", "s3://bucket/run"],
                 ["sweep", "--config", config_file, *caches, "--output", "root://host//runs/sweep"],
                 ["evaluate", "--config", config_file, "--head", head_ckpt, "--cache", cache, "--bz", "2.0",
                  "--output", "s3://bucket/eval"]):
        assert_cli_error(argv, f"--output {argv[-1]} is a URL, but `cachefeat {argv[0]}` writes local files only")
    assert list(tmp_path.iterdir()) == []


def test_sweep_from_url(remote, cache, config_file, tmp_path, run_cli):
    """sweep over caches at a URL, streamed (prefetch threads read the URL) with the variants stepped on
    2 worker threads, gives the per-step losses, validation history and heads of the local sweep."""
    import yaml
    from accelerate.state import AcceleratorState

    url = upload(remote, cache)
    config = yaml.safe_load(Path(config_file).read_text())
    config["sweep"] = {"grid": {"head.init_args.hidden_dim": [8, 16]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        for name, location in (("local", cache), ("remote", url)):
            AcceleratorState._reset_state(reset_partial_state=True)
            rc, out, err = run_cli(["sweep", "--config", path, "--cache", location, "--val-cache", location,
                                    "--output", tmp_path / name, "--data", "stream", "--max-steps", "4",
                                    "--batch-size", "16", "--workers", "2", "--device", "cpu"])
            assert rc == 0, err
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    local, there = (json.loads((tmp_path / name / "sweep.json").read_text()) for name in ("local", "remote"))
    assert there["shared"]["workers"] == 2 and there["shared"]["data_mode"] == "stream"
    assert local["variants"].keys() == there["variants"].keys() == {"hidden_dim8", "hidden_dim16"}
    timing = ("events_per_s", "train_s")
    for name, run in local["variants"].items():
        assert len(run["step_losses"]) == 4
        assert there["variants"][name]["step_losses"] == run["step_losses"], name
        strip = [{k: v for k, v in h.items() if k not in timing} for h in run["history"]]
        assert [{k: v for k, v in h.items() if k not in timing} for h in there["variants"][name]["history"]] == strip
        a, b = (torch.load(tmp_path / side / name / "head.ckpt", map_location="cpu", weights_only=False)
                for side in ("local", "remote"))
        for key in a["state_dict"]:
            torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=0, msg=key)
    assert [{k: v for k, v in r.items() if k not in timing} for r in there["rows"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in local["rows"]]


@pytest.mark.slow
def test_extract_two_processes_to_url(remote, cache, config_file, checkpoint, events_file, ref):
    """torchrun with 2 CPU processes (gloo) extracting to the URL: rank 0 takes the lock and creates the
    cache, each rank writes its blocks (rank 0: block 0, rank 1: blocks 1-2), rank 0 finalizes; the same
    arrays and bytes as the local cache."""
    url = fresh(remote, "two")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    args = ref.extract_args(config_file, checkpoint, events_file, url)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "cachefeat", "extract", *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("extracted 48 events") == 1, result.stderr[-3000:]  # one summary, from rank 0
    local, there = ref.cache_arrays(cache), ref.cache_arrays(url)
    for key in local:
        np.testing.assert_array_equal(there[key], local[key], err_msg=key)
    assert manifests(url) == manifests(cache)
    assert remote.get(url[len(remote.base) + 1 :], ".lock") is None


@pytest.mark.slow
def test_sweep_two_processes_from_url(xrootd_server, cache, config_file, tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 8 each, sweeping over a cache at root://: each
    variant's head equals the one-process sweep over the local cache with batch 16."""
    import yaml

    from cachefeat.training.sweep import sweep

    url = upload(xrootd_server, cache)
    config = yaml.safe_load(Path(config_file).read_text())
    config["head"]["init_args"]["dropout"] = 0.0
    config["sweep"] = {"grid": {"head.init_args.hidden_dim": [8, 16]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cachefeat",
         "sweep", "--config", str(path), "--cache", url, "--val-cache", url, "--output", str(tmp_path / "two"),
         "--batch-size", "8", "--max-steps", "3", "--data", "memory"],
        env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        sweep(config, tmp_path / "one", cache=cache, val_cache=cache, batch_size=16, data_mode="memory",
              device="cpu", max_steps=3, workers=1)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    for name in ("hidden_dim8", "hidden_dim16"):
        a, b = (torch.load(tmp_path / side / name / "head.ckpt", map_location="cpu", weights_only=False)["state_dict"]
                for side in ("one", "two"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
