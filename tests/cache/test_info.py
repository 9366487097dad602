"""`cachefeat info`: the table, the JSON, and its numbers against hand counts and the files on disk."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from cachefeat.cache import CacheWriter
from cachefeat.cli import main
from cachefeat.head.inputs import HeadBatch

E, BLOCK, F, D, T, N = 7, 4, 2, 4, 1, 2
HITS = [e % 4 for e in range(E)]  # 0, 1, 2, 3, 0, 1, 2 hits; every query pairs with every hit


def batch(events: list[int]) -> HeadBatch:
    hits = [HITS[e] for e in events]
    hit_off = np.concatenate([[0], np.cumsum(hits)])
    pair_query = [N * i + q for i, h in enumerate(hits) for q in range(N) for _ in range(h)]
    pair_hit = [hit_off[i] + m for i, h in enumerate(hits) for _ in range(N) for m in range(h)]
    H, Q = int(hit_off[-1]), N * len(events)
    return HeadBatch(
        event_id=torch.tensor(events),
        hit_offsets=torch.from_numpy(hit_off),
        query_offsets=torch.arange(len(events) + 1) * N,
        hit_raw=torch.ones(H, F),
        hit_embed=torch.ones(H, D),
        query_embed=torch.ones(Q, D),
        query_valid_logit=torch.zeros(Q),
        query_slot=torch.arange(N).repeat(len(events)),
        target_index=torch.zeros(Q, dtype=torch.long),
        targets=torch.zeros(Q, T),
        target_valid=torch.ones(Q, dtype=torch.bool),
        pair_query=torch.tensor(pair_query, dtype=torch.long),
        pair_hit=torch.tensor(pair_hit, dtype=torch.long),
        pair_logit=torch.zeros(len(pair_query)),
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("info") / "cache.zarr"
    writer = CacheWriter(
        path,
        fingerprint={"checkpoint_sha256": "ab" * 32, "input_hash": "in"},
        settings={"floor": 0.05, "keep_hits": "assigned"},
        raw_fields=["x", "y"],
        particle_fields=["pt"],
        dim=D,
        embed_dtype="float16",
        num_events=E,
        metric_names=["n_valid_hits", "n_pred"],
        block_size=BLOCK,
    )
    for block in writer.pending_blocks():
        start, stop = writer.block_range(block)
        events = list(range(start, stop))
        writer.write_block(
            block,
            batch(events),
            {
                "n_valid_hits": np.array([HITS[e] + 1 for e in events]),
                "n_pred": np.ones(len(events), np.int64),
            },
        )
    writer.finalize()
    return path


def test_json_numbers(cache, capsys):
    assert main(["info", str(cache), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["num_events"] == E and s["num_blocks"] == 2 and s["block_size"] == BLOCK and s["complete"]
    assert s["counts"]["hits"] == {"total": sum(HITS), "per_event": sum(HITS) / E, "max": 3}
    assert s["counts"]["queries"]["total"] == N * E
    assert s["counts"]["pairs"]["total"] == N * sum(HITS)
    assert s["embed_dtype"] == "float16" and s["dtypes"]["hits/embed"] == "float16"
    assert s["fingerprint"]["checkpoint_sha256"] == "ab" * 32 and s["settings"]["floor"] == 0.05
    assert s["metric_totals"] == {"n_valid_hits": sum(HITS) + E, "n_pred": E}

    # decoded sizes by hand: hits/embed is float16 [H, D], pairs/logit float32 [P]
    assert s["bytes"]["decoded"]["hits/embed"] == 2 * D * sum(HITS)
    assert s["bytes"]["decoded"]["pairs/logit"] == 4 * N * sum(HITS)

    # bytes on disk = every file but the root/group zarr.json files that hold the manifests themselves
    # and checksums.json, which records those
    on_disk = 0
    for root, _, files in os.walk(cache):
        rel = os.path.relpath(root, cache)
        for name in files:
            manifest_holder = name == "zarr.json" and (
                rel in (".", "blocks") or os.path.dirname(rel) == "blocks"
            )
            if not manifest_holder and name not in (".lock", "checksums.json"):
                on_disk += os.path.getsize(os.path.join(root, name))
    assert s["bytes"]["stored_total"] == on_disk
    assert s["bytes"]["per_event"] == pytest.approx(on_disk / E)

    # dense float32 layout: valid hits x (F + D) + N x (D + 1 + T) + N x valid hits, per event
    dense = sum(4 * ((h + 1) * (F + D) + N * (D + 1 + T) + N * (h + 1)) for h in HITS)
    assert s["dense_float32"]["bytes"] == dense
    assert s["dense_float32"]["cache_over_dense"] == pytest.approx(on_disk / dense)


def test_table(cache, capsys):
    assert main(["info", str(cache), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"events       {E} in 2 blocks of {BLOCK}" in out
    assert "(complete, format 2, metadata checksummed)" in out
    assert f"hits         {sum(HITS)} total, {sum(HITS) / E:.2f} per event (max 3)" in out
    assert "hits/embed" in out and "float16" in out and "dense f32" in out
    assert "checkpoint_sha256" in out and "floor=0.05" in out


def test_incomplete_cache_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "c.zarr"
    CacheWriter(
        path,
        fingerprint={},
        settings={},
        raw_fields=["x"],
        particle_fields=["pt"],
        dim=D,
        embed_dtype="float32",
        num_events=3,
        metric_names=[],
        block_size=2,
    ).close()
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is incomplete (0/2 blocks committed)" in err
