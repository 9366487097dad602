"""`cachefeat verify`: passes on correct float32 and float16 caches, flags a tampered field,
refuses a cache made from another checkpoint, and fails on a corrupted chunk.

The comparison rule is checked by hand on small tensors; the float16 case is checked against
the bound of float16 rounding, which does not depend on the verify code.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cachefeat.cache.reader import CacheReader
from cachefeat.cache.tolerance import EMBED_FIELDS, EXACT_FIELDS, FIELDS, Tolerance, field_tolerances
from cachefeat.cache.verify import compare, sample_events, verify_cache
from cachefeat.cli import main

MUON_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "muon.yaml"
ROWS = {"fingerprint", "checksums", *FIELDS, "head loss", "head gradients"}


def _cli(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def small_events(tmp_path_factory):
    """16 simulated muon events (seed 31)."""
    from cachefeat.data.presets import get_preset
    from cachefeat.data.simulate import write_event_file

    path = tmp_path_factory.mktemp("verify") / "small.h5"
    write_event_file(path, get_preset("muon"), 16, 31)
    return path


@pytest.fixture(scope="module")
def cache16(muon_config, stage1_checkpoint, small_events, tmp_path_factory):
    """float16 cache of `small_events` (extraction batches of 8)."""
    from cachefeat.cache.extract import extract

    out = tmp_path_factory.mktemp("verify") / "small16.zarr"
    extract(muon_config, stage1_checkpoint, small_events, out, batch_size=8, block_size=8, dtype="float16",
            device="cpu", progress=False)
    return out


def _verify_args(cache, config_path, checkpoint, events_path, *extra):
    return ["verify", cache, "--config", config_path, "--checkpoint", checkpoint, "--input", events_path,
            "--device", "cpu", *extra]


# --- the comparison rule, by hand -------------------------------------------------------------


def test_compare_by_hand():
    live = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    cached = torch.tensor([1.0, -2.0 + 1e-4, 4.0], dtype=torch.float64)
    # allowed at index 1: 1e-5 * 2 + 5e-5 * 4 = 2.2e-4 >= 1e-4
    row = compare(cached, live, Tolerance(1e-5, 5e-5))
    assert row["ok"] and row["max_abs"] == pytest.approx(1e-4) and row["max_rel"] == pytest.approx(1e-4 / 4)
    # allowed at index 1: 1e-5 * 2 + 1e-5 * 4 = 6e-5 < 1e-4
    row = compare(cached, live, Tolerance(1e-5, 1e-5))
    assert not row["ok"] and "(1,)" in row["detail"]
    assert not compare(cached, live, Tolerance())["ok"]
    assert compare(live, live, Tolerance())["ok"]


def test_compare_shapes_nan_empty():
    a = torch.zeros(3, 2)
    row = compare(a, torch.zeros(4, 2), Tolerance(1e-5, 1e-5))
    assert not row["ok"] and "shape (3, 2) in the cache, (4, 2) live" in row["detail"]
    assert not compare(torch.tensor([math.nan]), torch.tensor([1.0]), Tolerance(1.0, 1.0))["ok"]
    assert compare(torch.zeros(0, 4), torch.zeros(0, 4), Tolerance())["ok"]
    exact = compare(torch.tensor([3, 4]), torch.tensor([3, 5]), Tolerance())
    assert not exact["ok"] and exact["max_abs"] == 1


def test_gradient_rule_is_the_2_norm(monkeypatch):
    """A gradient element going from 0 to 4e-5 fails any element-wise rtol, but the difference's
    2-norm is 4e-5 against |g| = 5: relative 8e-6, within 1e-5 and not within 5e-6."""
    import cachefeat.cache.verify as verify

    cached = {"a": torch.tensor([3.0, 4e-5]), "b": torch.tensor([4.0])}
    live = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    for rtol, ok in ((1e-5, True), (5e-6, False)):
        results = iter([(torch.tensor(1.0), cached), (torch.tensor(1.0), live)])
        monkeypatch.setattr(verify, "head_loss_and_grads", lambda head, hb, device, results=results: next(results))
        row = verify.compare_head(None, None, None, Tolerance(rtol), "cpu")["head gradients"]
        assert row["ok"] is ok and row["max_rel"] == pytest.approx(4e-5 / 5, rel=1e-5)
        assert row["max_abs"] == pytest.approx(4e-5) and row["detail"] == "largest share: a"


def test_tolerances_by_dtype():
    f32, f16, bf16 = (field_tolerances(d) for d in ("float32", "float16", "bfloat16"))
    for name in EXACT_FIELDS:
        assert str(f16[name]) == "exact"
    assert f16["hit_embed"].rtol == pytest.approx(1e-5 + 2**-10)
    assert bf16["query_embed"].rtol == pytest.approx(1e-5 + 2**-7)
    # logits are float32 in every cache
    assert f16["pair_logit"] == bf16["pair_logit"] == f32["pair_logit"]
    assert f32["head gradients"].rtol == 1e-5


def test_sample_is_seeded_and_distinct():
    a, b = sample_events(100, 30, seed=4), sample_events(100, 30, seed=4)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 30 and a.min() >= 0 and a.max() < 100
    assert not np.array_equal(a, sample_events(100, 30, seed=5))
    assert sorted(sample_events(7, 64, seed=0).tolist()) == list(range(7))


# --- whole caches ---------------------------------------------------------------------------


def test_float32_cache_passes(cache32, muon_config, stage1_checkpoint, muon_events):
    report = verify_cache(muon_config, cache32.path, stage1_checkpoint, muon_events, events=6, seed=1,
                          batch_size=3)
    assert report["ok"], report["fields"]
    assert set(report["fields"]) == ROWS
    assert report["batch_sizes"] == [3, 1] and len(set(report["events"])) == 6
    for name in EXACT_FIELDS:
        assert report["fields"][name]["max_abs"] == 0, name


def test_float16_cache_passes_within_its_rounding(cache16, stage1_checkpoint, small_events, capsys):
    rc, out, err = _cli(_verify_args(cache16, MUON_CONFIG, stage1_checkpoint, small_events,
                                     "--events", 6, "--batch-size", 3, "--json"), capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["ok"] and report["embed_dtype"] == "float16" and set(report["fields"]) == ROWS
    for name in EMBED_FIELDS:
        row = report["fields"][name]
        # float16 rounding is at most 2^-11 of the value (plus float32 noise): it must show, and stay below.
        assert 0 < row["max_rel"] <= 2**-11 + 1e-4, (name, row)
    rc, out, _ = _cli(_verify_args(cache16, MUON_CONFIG, stage1_checkpoint, small_events, "--events", 2), capsys)
    assert rc == 0 and "embeddings float16" in out and "FAIL" not in out


def test_tampered_values_are_flagged(cache32, stage1_checkpoint, muon_events, capsys, monkeypatch):
    """One embedding value moved by 0.1% of the field's magnitude and one matched index changed,
    as the reader hands them out: exit 1, and the report names exactly those fields."""
    original = CacheReader.read_events

    def tampered(self, start, stop):
        hb = original(self, start, stop)
        if hb.hit_embed.shape[0]:
            hb.hit_embed[0, 0] += 1e-3 * float(hb.hit_embed.abs().max())
        hb.target_index[0] += 1
        return hb

    monkeypatch.setattr(CacheReader, "read_events", tampered)
    rc, out, err = _cli(_verify_args(cache32.path, MUON_CONFIG, stage1_checkpoint, muon_events,
                                     "--events", 4, "--batch-size", 2, "--json"), capsys)
    assert rc == 1
    report = json.loads(out)
    failed = {name for name, row in report["fields"].items() if not row["ok"]}
    assert {"hit_embed", "target_index"} <= failed
    assert failed <= {"hit_embed", "target_index", "head loss", "head gradients"}
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cachefeat verify: failed: ")
    assert "hit_embed" in lines[0] and "target_index" in lines[0]


def test_other_checkpoint_is_bad_input(cache16, muon_config, stage1_checkpoint, small_events, tmp_path, capsys):
    from cachefeat.config import instantiate
    from cachefeat.model.checkpoint import load_checkpoint, load_model_state, save_checkpoint
    model = instantiate(muon_config["model"], "model", hit_fields=muon_config["data"]["hit_fields"])
    load_model_state(model, load_checkpoint(stage1_checkpoint))
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    other = tmp_path / "other.ckpt"
    save_checkpoint(other, model, muon_config)
    rc, out, err = _cli(_verify_args(cache16, MUON_CONFIG, other, small_events), capsys)
    assert rc == 2 and out == ""
    assert err.strip() == err.strip().splitlines()[0]
    assert err.startswith("cachefeat verify: error: cache ") and "checkpoint weights differ" in err


def test_corrupted_chunk_fails_the_checksums(cache16, stage1_checkpoint, small_events, tmp_path, capsys):
    copy = tmp_path / "corrupt.zarr"
    shutil.copytree(cache16, copy)
    chunk = sorted(p for p in (copy / "blocks" / "000001" / "hits" / "embed").rglob("*")
                   if p.is_file() and p.name != "zarr.json")[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    rc, out, err = _cli(_verify_args(copy, MUON_CONFIG, stage1_checkpoint, small_events), capsys)
    assert rc == 1
    assert err.startswith("cachefeat verify: failed: checksums (") and "hits/embed/c/0/0 has the wrong crc32c" in err
    assert "crc32c" in out and "FAIL" in out
