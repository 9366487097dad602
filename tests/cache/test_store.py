"""CacheWriter/CacheReader round trips against a per-event numpy reference, on disk and in memory.

The reference (`reference_batch`) concatenates per-event arrays with a Python loop; nothing
in it comes from the cache code or `cachefeat.head.inputs.concat`.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from zarr.storage import MemoryStore

from cachefeat.cache import CacheReader, CacheWriter, chunkio, pool, schema
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch

F, D, T, N = 3, 4, 2, 2
RAW, PARTICLES = ["x", "y", "z"], ["pt", "eta"]
METRICS = ["n_valid_hits", "n_pred"]
BLOCK = 5
E = 23  # 5 blocks, the last one partial
ZERO_PAIR_BLOCK = 2  # every event of this block has no pair
FIELDS = [
    "event_id",
    "hit_offsets",
    "query_offsets",
    "hit_raw",
    "hit_embed",
    "query_embed",
    "query_valid_logit",
    "query_slot",
    "target_index",
    "targets",
    "target_valid",
    "pair_query",
    "pair_hit",
    "pair_logit",
]
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_events(seed: int = 0, num_events: int = E) -> list[dict]:
    """Ragged events with event-local pairs; event 0 has no hit, event 1 no query, block 2 no pair."""
    rng = np.random.default_rng(seed)
    events = []
    for e in range(num_events):
        h = 0 if e == 0 else int(rng.integers(0, 7))
        q = 0 if e == 1 else int(rng.integers(1, N + 1))
        pairs = [(a, b) for a in range(q) for b in range(h) if rng.random() < 0.5]
        if e // BLOCK == ZERO_PAIR_BLOCK or e == 3:
            pairs = []
        events.append(
            {
                "event_id": 1000 + 7 * e,
                "hit_raw": rng.normal(size=(h, F)).astype(np.float32),
                "hit_embed": rng.normal(size=(h, D)).astype(np.float32),
                "query_embed": rng.normal(size=(q, D)).astype(np.float32),
                "query_valid_logit": rng.normal(size=q).astype(np.float32),
                "query_slot": rng.permutation(N)[:q].astype(np.int64),
                "target_index": rng.integers(-1, 5, size=q).astype(np.int64),
                "targets": rng.normal(size=(q, T)).astype(np.float32),
                "target_valid": rng.random(q) < 0.5,
                "pair_query": np.array([a for a, _ in pairs], dtype=np.int64),
                "pair_hit": np.array([b for _, b in pairs], dtype=np.int64),
                "pair_logit": rng.normal(size=len(pairs)).astype(np.float32),
                "metrics": {"n_valid_hits": h + int(rng.integers(0, 4)), "n_pred": int(rng.integers(0, 3))},
            }
        )
    return events


def reference_batch(events: list[dict], embed_dtype: str = "float32") -> HeadBatch:
    """Brute-force concatenation: offsets from a running count, pair rows shifted per event."""
    out = {name: [] for name in FIELDS}
    hit_base = query_base = 0
    out["hit_offsets"], out["query_offsets"] = [0], [0]
    for ev in events:
        h, q = len(ev["hit_raw"]), len(ev["query_embed"])
        out["event_id"].append(ev["event_id"])
        for name in (
            "hit_raw",
            "hit_embed",
            "query_embed",
            "query_valid_logit",
            "query_slot",
            "target_index",
            "targets",
            "target_valid",
            "pair_logit",
        ):
            out[name].extend(list(ev[name]))
        out["pair_query"].extend(int(i) + query_base for i in ev["pair_query"])
        out["pair_hit"].extend(int(i) + hit_base for i in ev["pair_hit"])
        hit_base += h
        query_base += q
        out["hit_offsets"].append(hit_base)
        out["query_offsets"].append(query_base)

    def stack(name, dtype, width=None):
        values = out[name]
        if width is not None:
            return torch.from_numpy(np.array(values, dtype=dtype).reshape(len(values), width))
        return torch.from_numpy(np.array(values, dtype=dtype))

    embed = TORCH_DTYPE[embed_dtype]
    return HeadBatch(
        event_id=stack("event_id", np.int64),
        hit_offsets=stack("hit_offsets", np.int64),
        query_offsets=stack("query_offsets", np.int64),
        hit_raw=stack("hit_raw", np.float32, F),
        hit_embed=stack("hit_embed", np.float32, D).to(embed),
        query_embed=stack("query_embed", np.float32, D).to(embed),
        query_valid_logit=stack("query_valid_logit", np.float32),
        query_slot=stack("query_slot", np.int64),
        target_index=stack("target_index", np.int64),
        targets=stack("targets", np.float32, T),
        target_valid=stack("target_valid", bool),
        pair_query=stack("pair_query", np.int64),
        pair_hit=stack("pair_hit", np.int64),
        pair_logit=stack("pair_logit", np.float32),
    )


def block_metrics(events: list[dict]) -> dict[str, np.ndarray]:
    return {m: np.array([ev["metrics"][m] for ev in events], dtype=np.int64) for m in METRICS}


def make_writer(
    location, mode="create", fingerprint=None, embed_dtype="float32", num_events=E, **kw
) -> CacheWriter:
    return CacheWriter(
        location,
        fingerprint=fingerprint or {"checkpoint_sha256": "ab" * 32, "input_hash": "in1"},
        settings={"floor": 0.05, "keep_hits": "assigned"},
        raw_fields=RAW,
        particle_fields=PARTICLES,
        dim=D,
        embed_dtype=embed_dtype,
        num_events=num_events,
        metric_names=METRICS,
        block_size=BLOCK,
        mode=mode,
        **kw,
    )


def write_blocks(writer: CacheWriter, events: list[dict], blocks=None, embed_dtype="float32") -> None:
    for block in writer.pending_blocks() if blocks is None else blocks:
        start, stop = writer.block_range(block)
        writer.write_block(block, reference_batch(events[start:stop]), block_metrics(events[start:stop]))


def write_cache(location, events, embed_dtype="float32", **kw):
    writer = make_writer(location, embed_dtype=embed_dtype, num_events=len(events), **kw)
    write_blocks(writer, events)
    writer.finalize()
    return location


def assert_batches_equal(got: HeadBatch, want: HeadBatch) -> None:
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.equal(a, b), name


def manifests(location) -> dict:
    """Every file of a cache's blocks with [size, crc32c], from the manifests."""
    reader = CacheReader(location)
    out = {
        f"{schema.block_key(b)}/{k}": v
        for b, m in enumerate(reader._manifests)
        for k, v in m["files"].items()
    }
    return out


@pytest.fixture(scope="module")
def events():
    return make_events()


@pytest.fixture(scope="module")
def caches(tmp_path_factory, events):
    """Complete caches of `events` by (store, embed dtype), written once per module on first use."""
    made = {}

    def get(kind: str = "local", embed_dtype: str = "float32"):
        if (kind, embed_dtype) not in made:
            location = (
                tmp_path_factory.mktemp("caches") / f"{embed_dtype}.zarr"
                if kind == "local"
                else MemoryStore()
            )
            made[kind, embed_dtype] = write_cache(location, events, embed_dtype=embed_dtype)
        return made[kind, embed_dtype]

    return get


# --- round trips ------------------------------------------------------------------------------


def test_schema_names_cover_head_batch():
    """The schema's row fields are HeadBatch's fields: every field but the event ids and offsets is one
    stored array, the per-query ones are head.inputs.QUERY_FIELDS, the pair rows point at query and hit rows."""
    from dataclasses import fields

    from cachefeat.head.inputs import QUERY_FIELDS

    stored = [field for rows in schema.ROW_FIELDS.values() for field in rows]
    assert sorted(stored) == sorted(f.name for f in fields(HeadBatch) if f.name not in
                                    ("event_id", "hit_offsets", "query_offsets"))
    assert schema.ROW_FIELDS["Q"] == QUERY_FIELDS
    assert set(schema.PAIR_ROWS) <= set(schema.ROW_FIELDS["P"])
    assert schema.event_arrays(["m"]) == ["events/hit_offsets", "events/query_offsets", "events/pair_offsets",
                                          "events/event_id", "events/metrics/m"]


@pytest.mark.parametrize(
    "kind, embed_dtype",
    [
        ("local", "float32"),
        ("local", "float16"),
        ("local", "bfloat16"),
        ("memory", "float32"),
        ("memory", "bfloat16"),
    ],
)
def test_round_trip(caches, events, kind, embed_dtype):
    reader = CacheReader(caches(kind, embed_dtype))
    assert reader.num_events == E and reader.num_blocks == 5 and reader.embed_dtype == embed_dtype
    assert reader.raw_fields == RAW and reader.particle_fields == PARTICLES and reader.metric_names == METRICS
    np.testing.assert_array_equal(reader.hit_counts, [len(ev["hit_raw"]) for ev in events])
    np.testing.assert_array_equal(reader.query_counts, [len(ev["query_embed"]) for ev in events])
    np.testing.assert_array_equal(reader.pair_counts, [len(ev["pair_logit"]) for ev in events])
    np.testing.assert_array_equal(reader.event_id, [ev["event_id"] for ev in events])
    for name, values in reader.metrics().items():
        assert values.dtype == np.int64
        np.testing.assert_array_equal(values, [ev["metrics"][name] for ev in events])
    for block in range(reader.num_blocks):
        lo, hi = block * BLOCK, min(E, (block + 1) * BLOCK)
        assert_batches_equal(reader.read_block(block), reference_batch(events[lo:hi], embed_dtype))
    assert reader.read_block(ZERO_PAIR_BLOCK).pair_logit.shape == (0,)
    for start, stop in [(0, E), (3, 17), (9, 10), (10, 10), (0, 1), (22, 23)]:
        assert_batches_equal(
            reader.read_events(start, stop), reference_batch(events[start:stop], embed_dtype)
        )


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_layouts_outside_the_direct_reader_are_read_through_zarr(caches, events, kind, monkeypatch):
    """Arrays whose layout `chunkio` does not read (here: pair rows and hit embeddings, as if another
    writer had stored them) are read through zarr into the same batch, pair rows rebased alike."""
    direct = chunkio.parse_layout

    def only_some(meta):
        layout = direct(meta)
        return None if layout is not None and layout.dtype == np.int32 or meta["shape"][1:] == [D] else layout

    monkeypatch.setattr(chunkio, "parse_layout", only_some)
    reader = CacheReader(caches(kind))
    assert reader.read_events(0, E).num_events == E
    assert {path.rsplit("/", 2)[-2] + "/" + path.rsplit("/", 1)[-1] for path, layout in
            reader._chunks._layouts.items() if layout is None} >= {"pairs/query", "pairs/hit", "hits/embed"}
    for start, stop in [(0, E), (3, 17), (9, 10)]:
        assert_batches_equal(reader.read_events(start, stop), reference_batch(events[start:stop]))


def test_concurrent_reads_share_the_helper_threads(caches, events):
    """Reads from several threads at once (a stream's prefetch thread and the trainer, sweep workers)
    hand their shares to the same kept helper threads: each gets its own brute-force batch."""
    from concurrent.futures import ThreadPoolExecutor

    reader = CacheReader(caches())
    ranges = [(0, E), (3, 17), (9, 10), (5, 23)] * 4
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: reader.read_events(*r), ranges))
    for (start, stop), batch in zip(ranges, got):
        assert_batches_equal(batch, reference_batch(events[start:stop]))
    assert len([t for t in threading.enumerate() if t.name.startswith(chunkio.HELPER_NAME)]) <= chunkio.READ_THREADS - 1


def _read_in_child(path, start, stop, out) -> None:
    out.put(CacheReader(path).read_events(start, stop).hit_embed.numpy().tobytes())


@pytest.mark.skipif(chunkio.READ_THREADS < 2, reason="one usable core: reads start no helper thread")
def test_a_forked_child_reads_with_its_own_helpers(caches):
    """A child forked after the parent's reads started the helper threads (which do not exist in the
    child) reads as the parent does instead of handing its shares to threads that are not there."""
    import multiprocessing

    path = caches()
    parent = CacheReader(path).read_events(0, E).hit_embed.numpy().tobytes()
    assert any(t.name.startswith(chunkio.HELPER_NAME) for t in threading.enumerate())
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(path, 0, E, out))
    child.start()
    try:
        got = out.get(timeout=60)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0 and got == parent


def test_a_helper_threads_error_reaches_the_caller():
    def boom(arg):
        raise RuntimeError(f"share {arg} failed")

    with pytest.raises(RuntimeError, match="share 7 failed"):
        chunkio._HELPERS.submit(0, boom, 7).result()


def test_chunks_read_in_pieces_equal_brute_force_and_a_flip_in_any_piece_is_caught(tmp_path, caches, events,
                                                                                   monkeypatch):
    """Chunk files read in pieces with a running crc32c (here 16-byte pieces, so the test cache's
    chunks span many) give the brute-force batch; one byte changed in the last piece of a chunk
    read in place, or of a Blosc chunk, is refused with the checksum message; a file that ends before
    its body does is refused."""
    import shutil

    from crc32c import crc32c

    monkeypatch.setattr(chunkio, "PIECE_BYTES", 16)
    root = caches("local")
    for start, stop in [(0, E), (3, 17), (9, 10)]:
        assert_batches_equal(CacheReader(root).read_events(start, stop), reference_batch(events[start:stop]))
    block = schema.block_key(0)
    for key in (f"{block}/hits/embed/c/0/0", f"{block}/pairs/hit/c/0"):  # raw, read in place / Blosc
        copy = tmp_path / key.replace("/", "_")
        shutil.copytree(root, copy)
        chunk = copy / key
        data = bytearray(chunk.read_bytes())
        assert len(data) > 2 * 16 + 4
        data[-6] ^= 0x10  # in the body's last piece: only the running crc32c sees it
        chunk.write_bytes(bytes(data))
        with pytest.raises(UserError, match="checksum mismatch"):
            CacheReader(copy, check_files=False).read_events(0, BLOCK)
    short = tmp_path / "short"
    short.write_bytes(b"x" * 100)
    with open(short, "rb", buffering=0) as f, pytest.raises(ValueError, match="read 100 of 150 bytes"):
        chunkio._read_crc(f.fileno(), np.empty(150, np.uint8), "short")
    with open(short, "rb", buffering=0) as f:
        assert chunkio._read_crc(f.fileno(), np.empty(100, np.uint8), "short") == crc32c(b"x" * 100)


def test_checksums_are_zarrs_crc32c(caches):
    """The crc32c cachefeat computes (the `crc32c` package: manifests, chunk checks) is the one zarr's
    codec writes (google-crc32c): every manifest entry equals google-crc32c over the file, and every
    chunk's last 4 bytes, written by zarr, equal `crc32c` over the rest."""
    import google_crc32c
    from crc32c import crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    big = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)  # above the GIL-release size
    assert crc32c(big) == google_crc32c.value(big.tobytes())
    root = caches("local")
    chunks = 0
    for key, (size, crc) in manifests(root).items():
        data = (root / key).read_bytes()
        assert [len(data), google_crc32c.value(data)] == [size, crc], key
        if "/c/" in key:
            chunks += 1
            assert crc32c(data[:-4]) == int.from_bytes(data[-4:], "little"), key
    assert chunks > 20


@pytest.mark.parametrize("embed_dtype", ["float16", "bfloat16"])
def test_low_precision_is_torch_rounding(caches, events, embed_dtype):
    """float16/bfloat16 storage is exactly torch's rounding of the float32 embeddings."""
    got = CacheReader(caches("local", embed_dtype)).read_events(0, E)
    exact = torch.from_numpy(np.concatenate([ev["hit_embed"] for ev in events]))
    assert got.hit_embed.dtype == TORCH_DTYPE[embed_dtype]
    assert torch.equal(got.hit_embed, exact.to(TORCH_DTYPE[embed_dtype]))
    rel = 2.0 ** (-11 if embed_dtype == "float16" else -8)
    torch.testing.assert_close(got.float().hit_embed, exact, rtol=rel, atol=1e-6)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_resident_batch_matches_brute_force(caches, events, kind):
    resident = CacheReader(caches(kind)).load()
    assert resident.num_events == E
    rng = np.random.default_rng(1)
    for size in (1, 4, 11, 30):
        indices = rng.integers(0, E, size)  # repeats allowed
        assert_batches_equal(resident.batch(indices), reference_batch([events[i] for i in indices]))
    assert_batches_equal(
        resident.batch(torch.tensor([0, 1, 3])), reference_batch([events[i] for i in (0, 1, 3)])
    )
    assert resident.batch([]).num_events == 0


def _event_index(batch: HeadBatch) -> list[int]:
    return [(int(i) - 1000) // 7 for i in batch.event_id]


@pytest.fixture
def pool_everything(monkeypatch):
    """Arrays of any size come from an `ArrayPool` where a read is given one (these caches are tiny)."""
    monkeypatch.setattr(pool, "MIN_POOLED_BYTES", 0)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_pooled_reads_equal_the_brute_force_and_spare_a_held_batch(caches, events, kind, pool_everything):
    """Reads through one `ArrayPool`: each equals the brute force, a dropped batch's memory is reused
    by the next read, and a batch still held (or a tensor viewing it) is never written over."""
    reader = CacheReader(caches(kind))
    arrays = pool.ArrayPool()
    held = reader.read_events(0, E, arrays)
    view, kept = held.hit_embed[2:5], held.pair_logit  # a view of one array, another array whole
    del held
    for start, stop in [(3, 17), (0, E), (9, 10), (0, E), (22, 23)]:
        got = reader.read_events(start, stop, arrays)
        assert not np.shares_memory(got.hit_embed.numpy(), view.numpy())
        assert not np.shares_memory(got.pair_logit.numpy(), kept.numpy())
        assert_batches_equal(got, reference_batch(events[start:stop]))
    want = reference_batch(events)
    assert torch.equal(view, want.hit_embed[2:5]) and torch.equal(kept, want.pair_logit)
    del got
    kept_bytes = arrays.nbytes()
    for _ in range(3):  # nothing is held between these reads: each one reuses the pool's buffers
        assert_batches_equal(reader.read_events(0, E, arrays), reference_batch(events))
        assert arrays.nbytes() == kept_bytes


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_stream_partition_equal_counts_and_determinism(caches, events, kind, pool_everything):
    reader = CacheReader(caches(kind))

    def run(epoch, world, drop_last=True, batch_size=3, buffer_blocks=2):
        return [
            list(
                reader.stream(
                    batch_size,
                    seed=5,
                    epoch=epoch,
                    rank=r,
                    world=world,
                    buffer_blocks=buffer_blocks,
                    drop_last=drop_last,
                )
            )
            for r in range(world)
        ]

    # one rank, no drop: every event exactly once, each batch equal to the brute force
    (batches,) = run(0, 1, drop_last=False)
    ids = [i for b in batches for i in _event_index(b)]
    assert sorted(ids) == list(range(E))
    for batch in batches:
        assert_batches_equal(batch, reference_batch([events[i] for i in _event_index(batch)]))
    assert [b.num_events for b in batches] == [3] * 7 + [2]

    # two ranks: equal counts, disjoint events, each rank only from its blocks order[r::2]
    per_rank = run(0, 2)
    blocks = np.random.default_rng((5, 0)).permutation(5)
    rank_events = [
        sum((list(range(b * BLOCK, min(E, (b + 1) * BLOCK))) for b in blocks[r::2]), []) for r in range(2)
    ]
    expected = min(len(rank_events[0]), len(rank_events[1])) // 3
    assert [len(b) for b in per_rank] == [expected, expected]
    for r, batches in enumerate(per_rank):
        ids = [i for b in batches for i in _event_index(b)]
        assert len(ids) == len(set(ids)) == 3 * expected
        assert set(ids) <= set(rank_events[r])
        for batch in batches:
            assert_batches_equal(batch, reference_batch([events[i] for i in _event_index(batch)]))

    def flat(runs):
        return [[i for b in batches for i in _event_index(b)] for batches in runs]

    assert flat(run(0, 2)) == flat(per_rank)
    assert flat(run(1, 2)) != flat(per_rank)
    assert flat(run(0, 1, buffer_blocks=1)) != flat(run(0, 1, buffer_blocks=3))


@pytest.mark.parametrize("buffer_blocks", [1, 2])
def test_stream_of_valid_targets_is_the_masked_brute_force(caches, events, buffer_blocks, pool_everything):
    """`stream(..., valid_targets_only=True)` (what training streams): each batch, carried events
    included, is the brute-force batch of its events masked by `with_valid_targets_only`."""
    reader = CacheReader(caches())
    batches = list(reader.stream(4, seed=3, epoch=1, buffer_blocks=buffer_blocks, drop_last=False,
                                 valid_targets_only=True))
    assert sorted(i for b in batches for i in _event_index(b)) == list(range(E))
    dropped = 0
    for batch in batches:
        full = reference_batch([events[i] for i in _event_index(batch)])
        assert_batches_equal(batch, full.with_valid_targets_only())
        dropped += len(full.query_embed) - len(batch.query_embed)
    assert dropped > 0  # some queries without a valid target were left out


def test_stream_stops_its_prefetch_thread(caches):
    def running() -> set[str]:  # the chunk reader's helper threads are kept by design
        return {t.name for t in threading.enumerate() if not t.name.startswith(chunkio.HELPER_NAME)}

    reader = CacheReader(caches())
    before = running()
    stream = reader.stream(2, seed=0, epoch=0, buffer_blocks=1, prefetch=1)
    next(stream)
    stream.close()
    assert running() == before


# --- writer modes, resume, ranks ----------------------------------------------------------------


def test_create_refuses_existing_and_overwrite_replaces(tmp_path, events):
    path = write_cache(tmp_path / "c.zarr", events[:7])
    with pytest.raises(UserError, match="exists; use --overwrite"):
        make_writer(path, num_events=7)
    other = make_events(seed=9, num_events=7)
    write_cache(path, other, mode="overwrite")
    assert_batches_equal(CacheReader(path).read_events(0, 7), reference_batch(other))
    assert not (path / ".lock").exists()

    (tmp_path / "notacache").mkdir()
    (tmp_path / "notacache" / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a cachefeat cache; refusing"):
        make_writer(tmp_path / "notacache", mode="overwrite")
    with pytest.raises(UserError, match="not empty"):
        make_writer(tmp_path / "notacache")
    assert (tmp_path / "notacache" / "precious.txt").read_text() == "keep me"


def test_resume_skips_committed_blocks_and_gives_identical_files(tmp_path, caches, events):
    once = caches()
    path = tmp_path / "resumed.zarr"
    writer = make_writer(path)
    write_blocks(writer, events, blocks=[0, 1, 3])
    writer.close()  # killed before finalize
    (path / "blocks" / "000002" / "hits").mkdir(parents=True)  # debris of a block that never committed
    (path / "blocks" / "000002" / "hits" / "junk").write_bytes(b"xx")

    with pytest.raises(UserError, match="incomplete; use --resume or --overwrite"):
        make_writer(path)
    with pytest.raises(
        UserError, match=r"checkpoint weights differ.*input data differs.*settings.floor: 0.05 vs 0.1"
    ):
        CacheWriter(
            path,
            fingerprint={"checkpoint_sha256": "cd" * 32, "input_hash": "in2"},
            settings={"floor": 0.1, "keep_hits": "assigned"},
            raw_fields=RAW,
            particle_fields=PARTICLES,
            dim=D,
            embed_dtype="float32",
            num_events=E,
            metric_names=METRICS,
            block_size=BLOCK,
            mode="resume",
        )
    with pytest.raises(UserError, match="block_size: 5 vs 4"):
        CacheWriter(
            path,
            fingerprint={"checkpoint_sha256": "ab" * 32, "input_hash": "in1"},
            settings={"floor": 0.05, "keep_hits": "assigned"},
            raw_fields=RAW,
            particle_fields=PARTICLES,
            dim=D,
            embed_dtype="float32",
            num_events=E,
            metric_names=METRICS,
            block_size=4,
            mode="resume",
        )

    writer = make_writer(path, mode="resume")
    assert writer.pending_blocks() == [2, 4]
    write_blocks(writer, events)
    writer.finalize()
    assert manifests(path) == manifests(once)
    assert not (path / "blocks" / "000002" / "hits" / "junk").exists()
    assert_batches_equal(CacheReader(path).read_events(0, E), reference_batch(events))


def test_resume_of_nothing_starts_the_cache(tmp_path, caches, events):
    """A retried job passes --resume from its first try on: with nothing there it creates the cache."""
    once = caches()
    path = tmp_path / "retried.zarr"
    writer = make_writer(path, mode="resume")
    write_blocks(writer, events)
    writer.finalize()
    assert manifests(path) == manifests(once)


def test_resume_removes_orphaned_partial_files(tmp_path, caches, events):
    """zarr writes each file as `<name>.<uuid>.partial` and renames it; a SIGKILL in between leaves
    the temporary: resume deletes every such orphan, committed blocks' included, and the cache
    ends as an uninterrupted one."""
    once = caches()
    path = tmp_path / "orphans.zarr"
    writer = make_writer(path)
    write_blocks(writer, events, blocks=[0, 1])
    writer.close()
    orphans = [path / "blocks" / "000000" / "hits" / "embed.4f2a.partial",
               path / "blocks" / "000003" / "zarr.json.91bc.partial", path / "zarr.json.77aa.partial"]
    for orphan in orphans:
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"half a file")
    writer = make_writer(path, mode="resume")
    write_blocks(writer, events)
    writer.finalize()
    assert not list(path.rglob("*.partial"))
    assert manifests(path) == manifests(once)


def test_two_ranks_equal_one_writer(tmp_path, caches, events):
    once = caches()
    path = tmp_path / "ranks.zarr"
    rank0 = make_writer(path, rank=0, world=2)
    rank1 = make_writer(path, rank=1, world=2)  # after rank 0 (the caller's barrier)
    assert rank0.my_blocks() == [0, 1] and rank1.my_blocks() == [2, 3, 4]
    with pytest.raises(ValueError, match="not one of rank 1's blocks"):
        rank1.write_block(0, reference_batch(events[:BLOCK]), block_metrics(events[:BLOCK]))
    threads = [threading.Thread(target=write_blocks, args=(w, events)) for w in (rank1, rank0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rank1.close()
    rank0.close()
    rank0.finalize()
    assert manifests(path) == manifests(once)
    assert_batches_equal(CacheReader(path).read_events(0, E), reference_batch(events))


def test_rank_without_root_and_finalize_with_missing_blocks(tmp_path, events):
    with pytest.raises(RuntimeError, match="rank 0 must construct"):
        make_writer(tmp_path / "nothing.zarr", rank=1, world=2)
    writer = make_writer(tmp_path / "c.zarr")
    write_blocks(writer, events, blocks=[0, 1])
    with pytest.raises(UserError, match=r"3/5 blocks are not committed \(first: block 2\)"):
        writer.finalize()


def test_write_block_validates_its_input(tmp_path, events):
    writer = make_writer(tmp_path / "c.zarr")
    good = reference_batch(events[:BLOCK])
    with pytest.raises(ValueError, match="holds events 0-4"):
        writer.write_block(0, reference_batch(events[:4]), block_metrics(events[:4]))
    with pytest.raises(ValueError, match="metrics must be exactly"):
        writer.write_block(0, good, {"n_pred": np.zeros(BLOCK, np.int64)})
    pair_event = torch.searchsorted(good.query_offsets, good.pair_query, right=True) - 1
    other_hit = int(good.hit_offsets[pair_event[0] + 1]) % good.hit_raw.shape[0]  # a hit of another event
    bad = HeadBatch(
        **{**good.__dict__, "pair_hit": torch.cat([torch.tensor([other_hit]), good.pair_hit[1:]])}
    )
    with pytest.raises(ValueError, match="same event"):
        writer.write_block(0, bad, block_metrics(events[:BLOCK]))
    writer.close()


def _root_attrs(path) -> dict:
    import json

    return json.loads((path / "zarr.json").read_text())["attributes"]


def test_pending_input_hash_is_stored_before_the_first_commit(tmp_path, caches, events):
    """A hash still computing when the writer opens (`input_hash`, a Future): the root says it is
    pending, block 0 waits for it uncommitted, and the finished cache holds the hash, with the
    same block files as a writer given the hash up front."""
    from concurrent.futures import Future

    once = caches()
    path = tmp_path / "pending.zarr"
    future = Future()
    writer = make_writer(path, fingerprint={"checkpoint_sha256": "ab" * 32, "input_hash": "ignored"},
                         input_hash=future)
    assert _root_attrs(path)["input_hash_pending"] is True
    assert _root_attrs(path)["fingerprint"]["input_hash"] is None
    write_blocks(writer, events, blocks=[0])
    time.sleep(0.5)  # time for block 0 to commit, were it not waiting for the hash
    assert "committed" not in (schema.node_attributes(writer._store, [schema.block_key(0)])[0] or {})
    future.set_result("in1")
    write_blocks(writer, events, blocks=[1, 2, 3, 4])
    writer.finalize()
    attrs = _root_attrs(path)
    assert attrs["input_hash_pending"] is False and attrs["fingerprint"]["input_hash"] == "in1"
    assert CacheReader(path).fingerprint == CacheReader(once).fingerprint
    assert manifests(path) == manifests(once)


def test_resume_restarts_a_cache_whose_hash_never_arrived(tmp_path, caches, events, caplog):
    """The hash failed (or the run was killed) before any commit: the root stays pending; a plain
    run is refused as incomplete, `resume` starts the cache again and ends as an uninterrupted one."""
    from concurrent.futures import Future

    once = caches()
    path = tmp_path / "no-hash.zarr"
    future = Future()
    future.set_exception(OSError("cannot read the input"))
    writer = make_writer(path, input_hash=future)
    write_blocks(writer, events, blocks=[0])
    with pytest.raises(OSError, match="cannot read the input"):
        writer.close()
    assert _root_attrs(path)["input_hash_pending"] is True
    assert not (path / schema.LOCK_NAME).exists()
    with pytest.raises(UserError, match="incomplete; use --resume or --overwrite"):
        make_writer(path)
    with caplog.at_level("INFO", logger="cachefeat.cache.writer"):
        writer = make_writer(path, mode="resume")
    assert "no committed block yet; starting it again" in caplog.text
    assert writer.pending_blocks() == [0, 1, 2, 3, 4]
    write_blocks(writer, events)
    writer.finalize()
    assert manifests(path) == manifests(once)
    assert CacheReader(path).fingerprint == CacheReader(once).fingerprint


def test_resume_with_a_pending_hash_compares_it(tmp_path, events):
    """Resuming a started cache waits for the pending hash and refuses another input's."""
    from concurrent.futures import Future

    path = tmp_path / "started.zarr"
    writer = make_writer(path)
    write_blocks(writer, events, blocks=[0, 1])
    writer.close()
    for value, error in (("in2", "input data differs"), ("in1", None)):
        future = Future()
        future.set_result(value)
        if error:
            with pytest.raises(UserError, match=error):
                make_writer(path, mode="resume", input_hash=future)
        else:
            writer = make_writer(path, mode="resume", input_hash=future)
            assert writer.pending_blocks() == [2, 3, 4]
            write_blocks(writer, events)
            writer.finalize()
    assert CacheReader(path).fingerprint["input_hash"] == "in1"
    with pytest.raises(ValueError, match="world size 1"):
        make_writer(tmp_path / "ranks.zarr", world=2, input_hash=Future())


def test_float_arrays_written_with_blosc_still_read(tmp_path, events, monkeypatch):
    """Caches written before the 1-D float arrays and the targets were stored raw (Blosc on them)
    read back as the reference."""
    import json

    monkeypatch.setattr(schema, "RAW_KEYS", frozenset({"hits/raw", "hits/embed", "queries/embed"}))
    path = write_cache(tmp_path / "older.zarr", events)
    monkeypatch.undo()
    for key in ("queries/valid_logit", "queries/targets", "pairs/logit"):
        meta = json.loads((path / "blocks" / "000000" / key / "zarr.json").read_text())
        assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc", "crc32c"], key
    assert_batches_equal(CacheReader(path).read_events(0, E), reference_batch(events))
    assert_batches_equal(CacheReader(path).read_events(3, 17), reference_batch(events[3:17]))
