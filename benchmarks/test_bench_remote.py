"""Caches at a URL. Reads: the full read of the float32 training cache through `CacheReader` from a local
xrootd server and a local S3 server (moto), against a raw read of the same chunk objects from
the same server with its plain client (no decoding, no checks), as many requests in flight.

The servers are the root conftest's session fixtures (skipped without their packages). Rounds
alternate raw and cache reads, so that drifts of this shared machine hit both; medians are
reported. Keys: `remote_read` (per server: raw and cache MB/s of the stored bytes, decoded
GB/s) and `remote_read_vs_raw` (per server: raw time / cache time, the issue's target >= 0.5
on xrootd). Writes: `remote_write` (per server: CacheWriter's MB/s there and to a local directory).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

ROUNDS = 9
IN_FLIGHT = 16  # as chunkio.StoreChunks


def _upload(server, local) -> tuple[str, str]:
    name = f"bench-{local.name}"
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        server.put(name, path.relative_to(local).as_posix(), path.read_bytes())
    return name, server.url(name)


def _raw_reader(server, name: str):
    """A function that reads the given keys of cache `name` with the server's plain client, IN_FLIGHT at a time."""
    if server.kind == "s3":
        import os

        import obstore
        from obstore.store import S3Store

        store = S3Store(server.base[len("s3://"):], prefix=name, client_options={"allow_http": True},
                        endpoint=os.environ["AWS_ENDPOINT_URL"])

        async def get(key):
            return await (await obstore.get_async(store, key)).bytes_async()
    else:
        from XRootD import client
        from XRootD.client.flags import OpenFlags

        async def call(method, *args):
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            method(*args, callback=lambda s, r, h: loop.call_soon_threadsafe(done.set_result, (s, r)))
            return await done

        async def get(key):
            f = client.File()
            status, _ = await call(f.open, f"{server.base}/{name}/{key}", OpenFlags.READ)
            assert status.ok, status.message
            status, data = await call(f.read, 0, 0)
            await call(f.close)
            return data

    def read(keys) -> int:
        async def run():
            limit = asyncio.Semaphore(IN_FLIGHT)

            async def one(key):
                async with limit:
                    return len(await get(key))

            return sum(await asyncio.gather(*(one(k) for k in keys)))

        return asyncio.run(run())

    return read


@pytest.mark.parametrize("kind", ["xrootd", "s3"])
def test_remote_read(kind, request, bench_data, results):
    from cachefeat.cache.reader import CacheReader
    from cachefeat.cache.schema import DATA_ARRAYS, block_key

    server = request.getfixturevalue(f"{kind}_server")
    name, url = _upload(server, bench_data.caches["float32"])
    reader = CacheReader(url)
    data_keys = [f"{block_key(b)}/{key}" for b, m in enumerate(reader._manifests) for key in m["files"]
                 if key.rsplit("/c/", 1)[0] in {spec.key for spec in DATA_ARRAYS} and "/c/" in key]
    raw_read = _raw_reader(server, name)
    stored = raw_read(data_keys)  # warm-up of both paths
    decoded = sum(t.nbytes for t in vars(reader.read_events(0, reader.num_events)).values())
    raw_s, cache_s = [], []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        assert raw_read(data_keys) == stored
        raw_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        hb = reader.read_events(0, reader.num_events)
        cache_s.append(time.perf_counter() - started)
        assert hb.num_events == reader.num_events
    raw, cache = statistics.median(raw_s), statistics.median(cache_s)
    results.setdefault("remote_read", {})[kind] = {
        "stored_bytes": stored, "chunk_objects": len(data_keys), "raw_MBps": stored / raw / 1e6,
        "cache_MBps": stored / cache / 1e6, "cache_decoded_GBps": decoded / cache / 1e9,
        "raw_s_median": raw, "cache_s_median": cache, "rounds": ROUNDS,
    }
    results.setdefault("remote_read_vs_raw", {})[kind] = raw / cache


@pytest.mark.parametrize("kind", ["xrootd", "s3"])
def test_remote_write(kind, request, bench_data, results):
    """The writer's rate to a server: the float32 cache's blocks (read from disk first) through
    CacheWriter to a fresh URL, against the same writes to a local directory; 3 alternating rounds."""
    import tempfile

    from cachefeat.cache.reader import CacheReader
    from cachefeat.cache.writer import CacheWriter

    server = request.getfixturevalue(f"{kind}_server")
    source = CacheReader(bench_data.caches["float32"])
    blocks = [(b, source.read_block(b)) for b in range(source.num_blocks)]
    metrics = source.metrics()
    args = dict(fingerprint=source.fingerprint, settings=source.settings, raw_fields=source.raw_fields,
                particle_fields=source.particle_fields, dim=source.dim, embed_dtype=source.embed_dtype,
                num_events=source.num_events, metric_names=source.metric_names, block_size=source.block_size)

    def write(location) -> tuple[float, int]:
        started = time.perf_counter()
        writer = CacheWriter(location, **args)
        for block, hb in blocks:
            lo, hi = writer.block_range(block)
            writer.write_block(block, hb, {k: v[lo:hi] for k, v in metrics.items()})
        writer.finalize()
        return time.perf_counter() - started, writer.bytes_written

    remote_s, local_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(3):
            seconds, nbytes = write(server.url(f"bench-write-{i}.zarr"))
            remote_s.append(seconds)
            local_s.append(write(f"{tmp}/local-{i}.zarr")[0])
    remote, local = statistics.median(remote_s), statistics.median(local_s)
    results.setdefault("remote_write", {})[kind] = {
        "stored_bytes": nbytes, "remote_MBps": nbytes / remote / 1e6, "local_MBps": nbytes / local / 1e6,
        "remote_s_median": remote, "local_s_median": local, "rounds": 3,
    }
