"""`cachefeat extract`: the cache equals the live frozen backbone, event by event, bit for bit."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from cachefeat.cache.extract import extract, gather_events, resolve_options
from cachefeat.cli import main
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch

# The session config of tests/cache/conftest.py: 48 events, batches of 8, blocks of 16.
NUM_EVENTS, BLOCK = 48, 16


def test_cache_equals_live(ref, cache, live):
    ref.assert_cache_equals_live(cache, live, floor=0.1)


def test_cache_records_fingerprint_and_settings(ref, cache, checkpoint):
    from cachefeat.cache.reader import CacheReader
    from cachefeat.model.checkpoint import load_checkpoint

    reader = CacheReader(cache)
    assert reader.fingerprint["checkpoint_sha256"] == load_checkpoint(checkpoint)["weights_sha256"]
    assert reader.fingerprint["settings"] == {
        "floor": 0.1,
        "embed_dtype": "float32",
        "precision": "fp32",
        "keep_hits": "assigned",
        "keep_queries": "all",
    }
    assert reader.block_size == BLOCK and reader.num_blocks == -(-NUM_EVENTS // BLOCK)
    assert reader.raw_fields == ref.TINY_CONFIG["data"]["hit_fields"]


def test_input_hash_runs_alongside_the_extraction(ref, cache, tiny_config, checkpoint, events_file, tmp_path,
                                                  monkeypatch):
    """The input's content hash (a full pass over the input) does not hold up the pipeline: a hash
    that can only finish once the first batch has been read still gives the cache, which records
    the hash of a fresh `EventFile` of the input and equals the CLI's extraction (`cache`)."""
    from cachefeat.cache.reader import CacheReader
    from cachefeat.data.events import EventFile

    data = tiny_config["data"]
    with EventFile(events_file, data["hit_fields"], data["particle_fields"]) as fresh:
        want = fresh.content_hash()
    first_read = threading.Event()
    content_hash, block_batches = EventFile.content_hash, EventFile.block_batches

    def waiting_hash(self):
        if not first_read.wait(timeout=20):
            raise AssertionError("the extraction waited for the input hash before reading any event")
        return content_hash(self)

    def batches(self, *args, **kwargs):
        for item in block_batches(self, *args, **kwargs):
            first_read.set()
            yield item

    monkeypatch.setattr(EventFile, "content_hash", waiting_hash)
    monkeypatch.setattr(EventFile, "block_batches", batches)
    out = tmp_path / "alongside.zarr"
    extract(tiny_config, checkpoint, events_file, out, progress=False)
    assert CacheReader(out).fingerprint["input_hash"] == want
    assert CacheReader(out).fingerprint == CacheReader(cache).fingerprint
    ref.assert_same_cache(cache, out)


def test_mid_floor_leaves_queries_without_pairs(ref, tiny_config, checkpoint, events_file, live, tmp_path):
    """A floor at the median of the queries' best probabilities leaves some queries without any pair."""
    best = sorted(float(torch.sigmoid(ev["logit"][n]).max()) for ev in live for n in range(ev["logit"].shape[0]))
    floor = float(np.float32(best[len(best) // 2]))
    out = tmp_path / "mid.zarr"
    summary = extract(tiny_config, checkpoint, events_file, out, floor=floor, progress=False)
    ref.assert_cache_equals_live(out, live, floor=floor)
    arrays = ref.cache_arrays(out)
    queries_with_pairs = np.unique(arrays["hb.pair_query"]).size
    assert 0 < queries_with_pairs < arrays["hb.query_slot"].size
    assert summary["events"] == NUM_EVENTS and summary["blocks_written"] == -(-NUM_EVENTS // BLOCK)
    assert summary["valid_hits"] == sum(ev["n_hits"] for ev in live)
    assert summary["pairs"] == sum(int((torch.sigmoid(ev["logit"]) >= floor).sum()) for ev in live)


@pytest.fixture(scope="session")
def edge_live(ref, tiny_config, checkpoint, edge_events_file):
    return ref.live_outputs(tiny_config, checkpoint, edge_events_file, batch_size=4, block_size=8)


def _extract_edge(tiny_config, checkpoint, edge_events_file, out, **options) -> dict:
    return extract(
        tiny_config, checkpoint, edge_events_file, out, batch_size=4, block_size=8, progress=False, **options
    )


def test_edge_events(ref, tiny_config, checkpoint, edge_events_file, edge_live, tmp_path):
    """No hits, no particles, noise only, a whole block of hit-less events (block_size 8)."""
    summary = _extract_edge(tiny_config, checkpoint, edge_events_file, tmp_path / "edge.zarr")
    assert summary["events"] == 24 and summary["blocks_written"] == 3
    ref.assert_cache_equals_live(tmp_path / "edge.zarr", edge_live, floor=0.1)
    arrays = ref.cache_arrays(tmp_path / "edge.zarr")
    assert (arrays["metrics.n_valid_hits"][:8] == 0).all() and (arrays["metrics.n_particles"][:4] == 0).all()
    assert (arrays["metrics.n_particles"][4:8] == 1).all() and (arrays["metrics.n_particles"][8:16] == 0).all()


def test_floor_that_keeps_no_pair(ref, tiny_config, checkpoint, edge_events_file, edge_live, tmp_path):
    """floor 0.999999 with a random model: every block, hence every event, has zero pairs."""
    summary = _extract_edge(tiny_config, checkpoint, edge_events_file, tmp_path / "none.zarr", floor=0.999999)
    assert summary["pairs"] == 0 and summary["hits"] == 0 and summary["queries"] == 48
    ref.assert_cache_equals_live(tmp_path / "none.zarr", edge_live, floor=0.999999)


def test_keep_all_hits_and_matched_queries(ref, tiny_config, checkpoint, edge_events_file, edge_live, tmp_path):
    """keep_hits=all stores every valid hit; keep_queries=matched only the matched queries."""
    out = tmp_path / "all.zarr"
    _extract_edge(tiny_config, checkpoint, edge_events_file, out, keep_hits="all", keep_queries="matched")
    arrays = ref.cache_arrays(out)
    np.testing.assert_array_equal(np.diff(arrays["hb.hit_offsets"]), [ev["n_hits"] for ev in edge_live])
    np.testing.assert_array_equal(arrays["hb.hit_raw"], torch.cat([ev["raw"] for ev in edge_live]).numpy())
    np.testing.assert_array_equal(arrays["hb.hit_embed"], torch.cat([ev["hit_embed"] for ev in edge_live]).numpy())
    matched = [int((ev["target_index"] >= 0).sum()) for ev in edge_live]
    np.testing.assert_array_equal(np.diff(arrays["hb.query_offsets"]), matched)
    assert arrays["hb.target_valid"].all()


def test_float16_storage(ref, tiny_config, checkpoint, edge_events_file, edge_live, tmp_path):
    """float16 storage is the rounding of the float32 embeddings; logits stay float32."""
    out = tmp_path / "f16.zarr"
    _extract_edge(tiny_config, checkpoint, edge_events_file, out, dtype="float16")
    from cachefeat.cache.reader import CacheReader

    hb = CacheReader(out).read_events(0, 24)
    assert hb.query_embed.dtype == torch.float16 and hb.pair_logit.dtype == torch.float32
    want = torch.cat([ev["query_embed"] for ev in edge_live])
    assert torch.equal(hb.query_embed, want.half())
    np.testing.assert_array_equal(hb.query_valid_logit, torch.cat([ev["track_valid"] for ev in edge_live]))


def test_gather_events_against_brute_force():
    """gather_events reorders events of a ragged batch like a per-event rebuild does."""
    rng = np.random.default_rng(0)
    B, D = 7, 3
    hits, queries = rng.integers(0, 4, B), rng.integers(0, 3, B)
    events = []
    for b in range(B):
        pairs = [(q, h) for q in range(queries[b]) for h in range(hits[b]) if rng.random() < 0.6]
        events.append({"hit": rng.normal(size=(hits[b], D)), "query": rng.normal(size=(queries[b], D)), "pairs": pairs})

    def build(order):
        ev = [events[i] for i in order]
        hoff = np.concatenate([[0], np.cumsum([len(e["hit"]) for e in ev])])
        qoff = np.concatenate([[0], np.cumsum([len(e["query"]) for e in ev])])
        pq = [qoff[i] + q for i, e in enumerate(ev) for q, _ in e["pairs"]]
        ph = [hoff[i] + h for i, e in enumerate(ev) for _, h in e["pairs"]]
        t = lambda x, dt=torch.float32: torch.tensor(np.asarray(x), dtype=dt)  # noqa: E731
        hit = t(np.concatenate([e["hit"] for e in ev]).reshape(-1, D))
        query = t(np.concatenate([e["query"] for e in ev]).reshape(-1, D))
        return HeadBatch(
            event_id=t(order, torch.long),
            hit_offsets=t(hoff, torch.long),
            query_offsets=t(qoff, torch.long),
            hit_raw=hit[:, :2],
            hit_embed=hit,
            query_embed=query,
            query_valid_logit=query[:, 0],
            query_slot=(query[:, 2] * 100).long(),
            target_index=(query[:, 1] * 100).long(),
            targets=query[:, :2],
            target_valid=query[:, 0] > 0,
            pair_query=t(pq, torch.long),
            pair_hit=t(ph, torch.long),
            pair_logit=hit[ph, 0] + query[pq, 1],
        )

    perm = rng.permutation(B)
    shuffled = build(perm)
    restored = gather_events(shuffled, torch.from_numpy(np.argsort(perm)))
    expected = build(np.arange(B))
    for name, value in vars(expected).items():
        assert torch.equal(getattr(restored, name), value), name


def test_options_from_config_and_head(ref):
    cfg = {**ref.TINY_CONFIG, "extract": {"batch_size": 5}}
    opts = resolve_options(cfg)
    assert opts["batch_size"] == 5 and opts["block_size"] == 4096 and opts["floor"] == 0.1
    cfg["head"] = {"init_args": {"assignment_threshold": 0.2}}
    assert resolve_options(cfg)["floor"] == 0.2
    assert resolve_options(cfg, floor=0.05, dtype="bfloat16")["dtype"] == "bfloat16"
    with pytest.raises(UserError, match="floor"):
        resolve_options(cfg, floor=1.5)
    with pytest.raises(UserError, match="extract.batch_sise"):
        resolve_options({**cfg, "extract": {"batch_sise": 3}})


# --- errors: exit code 2 and one line ------------------------------------------------------------


def _run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["extract", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err.strip()


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("cachefeat extract: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_checkpoint(capsys, config_file, events_file, tmp_path):
    code, err = _run_cli(
        capsys,
        "--config",
        config_file,
        "--checkpoint",
        tmp_path / "nope.ckpt",
        "--input",
        events_file,
        "--output",
        tmp_path / "c.zarr",
    )
    assert code == 2 and "nope.ckpt" in _error_line(err) and "not found" in err
    assert not (tmp_path / "c.zarr").exists()


def test_checkpoint_of_another_architecture(ref, capsys, config_file, events_file, tmp_path):
    from cachefeat.model.checkpoint import save_checkpoint

    other = {
        **ref.TINY_CONFIG,
        "model": {**ref.TINY_CONFIG["model"], "init_args": {**ref.TINY_CONFIG["model"]["init_args"], "dim": 8}},
    }
    ckpt = tmp_path / "dim8.ckpt"
    save_checkpoint(ckpt, ref.build_model(other), other)
    code, err = _run_cli(
        capsys, "--config", config_file, "--checkpoint", ckpt, "--input", events_file, "--output", tmp_path / "c.zarr"
    )
    line = _error_line(err)
    assert code == 2 and "does not fit this config" in line and "dim8.ckpt" in line


def test_input_without_required_field(ref, capsys, config_file, checkpoint, events_file, tmp_path):
    events = ref.split_events(ref.read_csr(events_file))[:4]
    for e in events:
        del e["hits"]["eta"]
    bad = tmp_path / "no_eta.h5"
    ref.write_events(bad, events)
    code, err = _run_cli(
        capsys, "--config", config_file, "--checkpoint", checkpoint, "--input", bad, "--output", tmp_path / "c.zarr"
    )
    line = _error_line(err)
    assert code == 2 and "'eta'" in line and "no_eta.h5" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys, config_file, checkpoint, events_file, tmp_path):
    code, err = _run_cli(
        capsys,
        "--config",
        config_file,
        "--checkpoint",
        checkpoint,
        "--input",
        events_file,
        "--output",
        tmp_path / "c.zarr",
        "--device",
        "cuda",
    )
    assert code == 2 and "CUDA is not available" in _error_line(err)


def test_existing_cache_and_changed_settings(capsys, cache, config_file, checkpoint, events_file):
    base = ["--config", config_file, "--checkpoint", checkpoint, "--input", events_file, "--output", cache]
    code, err = _run_cli(capsys, *base)
    assert code == 2 and "--overwrite" in _error_line(err)
    code, err = _run_cli(capsys, *base, "--resume", "--floor", "0.2")
    line = _error_line(err)
    assert code == 2 and "floor" in line
    code, err = _run_cli(capsys, *base, "--resume")  # same settings: nothing left to do
    assert code == 0, err


def test_help_has_example(capsys):
    with pytest.raises(SystemExit) as info:
        main(["extract", "--help"])
    assert info.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_cli_overrides_and_options(ref, capsys, caplog, config_file, checkpoint, edge_events_file, tmp_path):
    """--set changes the config (the default floor follows the head's threshold); options win over it."""
    from cachefeat.cache.reader import CacheReader

    caplog.set_level(logging.INFO)
    out = tmp_path / "set.zarr"
    code = main(
        [
            "extract",
            *ref.extract_args(config_file, checkpoint, edge_events_file, out),
            "--set",
            "head.init_args.assignment_threshold=0.3",
            "--set",
            "extract.block_size=16",
            "--dtype",
            "bfloat16",
            "--keep-queries",
            "matched",
        ]
    )
    assert code == 0, capsys.readouterr().err
    reader = CacheReader(out)
    assert reader.settings["floor"] == 0.3 and reader.block_size == 16 and reader.num_blocks == 2
    assert reader.embed_dtype == "bfloat16" and reader.settings["keep_queries"] == "matched"
    assert "extracted 24 events (2 blocks written, 0 already committed)" in caplog.text
