"""`evaluate` end to end on a tiny extracted cache, and `predict_batch` on hand-built helices."""

from __future__ import annotations

import copy
import json

import h5py
import numpy as np
import pytest
import torch
import yaml

from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch
from cachefeat.head.metrics import regression_metrics

HIT_FIELDS = ["x", "y", "z", "r", "s", "eta", "phi", "u", "v", "layer"]
PARTICLE_FIELDS = ["pt", "eta", "phi", "q", "vz"]
NUM_EVENTS, NUM_QUERIES = 12, 2
CONFIG = {
    "data": {"hit_fields": HIT_FIELDS, "particle_fields": PARTICLE_FIELDS, "max_hits": 1024},
    "model": {
        "class_path": "cachefeat.model.maskformer.MaskFormer",
        "init_args": {
            "dim": 16, "num_queries": NUM_QUERIES, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
            "input_scales": {"x": 0.1, "y": 0.1, "z": 0.1, "r": 0.1, "s": 0.1, "u": 10.0, "v": 10.0, "layer": 0.033},
        },
    },
    "head": {"class_path": "cachefeat.head.regression.RegressionHead",
             "init_args": {"dim": 16, "assignment_threshold": 0.1, "inverse_fields": ["pt"]}},
    "extract": {"batch_size": 4, "block_size": 8, "dtype": "float32", "keep_hits": "assigned",
                "keep_queries": "all", "precision": "fp32"},
    "evaluate": {"bz": 0.6},
}
C_LIGHT = 0.299792458


def save_head(path, head, cache_fingerprint):
    """A head checkpoint written by the trainer's own writer."""
    from cachefeat.head.checkpoint import save_head as write_head

    write_head(path, head, CONFIG, cache_fingerprint, {})


def random_head(raw_fields=HIT_FIELDS, seed=0):
    from cachefeat.head.regression import RegressionHead

    torch.manual_seed(seed)
    head = RegressionHead(raw_fields, PARTICLE_FIELDS, dim=16, hidden_dim=32, inverse_fields=["pt"])
    head.target_mean.copy_(torch.tensor([0.05, 0.0, 0.0, 0.0]))
    head.target_std.copy_(torch.tensor([0.05, 0.5, 1.8, 1.0]))
    return head


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny backbone, NUM_EVENTS simulated muon events, their cache and a random head."""
    from cachefeat.cache.extract import extract
    from cachefeat.cache.reader import CacheReader
    from cachefeat.cli import main
    from cachefeat.config import instantiate
    from cachefeat.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("evaluate")
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG))
    torch.manual_seed(0)
    model = instantiate(CONFIG["model"], "model", hit_fields=HIT_FIELDS)
    save_checkpoint(root / "stage1.ckpt", model, CONFIG)
    assert main(["simulate", "--preset", "muon", "--events", str(NUM_EVENTS), "--seed", "5",
                 "--output", str(root / "test.h5"), "--no-progress"]) == 0
    extract(copy.deepcopy(CONFIG), root / "stage1.ckpt", root / "test.h5", root / "test.zarr", progress=False)
    fingerprint = CacheReader(root / "test.zarr").fingerprint
    save_head(root / "head.ckpt", random_head(), fingerprint)
    return {"root": root, "config": config_path, "cache": root / "test.zarr", "head": root / "head.ckpt",
            "checkpoint": root / "stage1.ckpt", "input": root / "test.h5", "fingerprint": fingerprint}


def read_h5(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f}


def test_cli_end_to_end(setup):
    from cachefeat.cli import main

    out = setup["root"] / "eval"
    assert main(["evaluate", "--config", str(setup["config"]), "--head", str(setup["head"]),
                 "--cache", str(setup["cache"]), "--output", str(out), "--no-progress", "--device", "cpu"]) == 0
    cols = read_h5(out / "predictions.h5")
    expected = {"event_id", "query_slot", "target_valid", "track_valid_prob", "n_assigned", "fit_status",
                *(f"{k}_{f}" for k in ("head", "true", "fit") for f in ("pt", "eta", "phi", "q"))}
    assert set(cols) == expected
    assert all(len(v) == NUM_EVENTS * NUM_QUERIES for v in cols.values())
    np.testing.assert_array_equal(cols["query_slot"], np.tile(np.arange(NUM_QUERIES), NUM_EVENTS))
    assert cols["target_valid"].any()
    assert np.isnan(cols["true_pt"][~cols["target_valid"]]).all()
    assert ((cols["track_valid_prob"] >= 0) & (cols["track_valid_prob"] <= 1)).all()
    np.testing.assert_array_equal(cols["fit_status"] & (cols["n_assigned"] < 3), False)

    metrics = json.loads((out / "metrics.json").read_text())
    matched = cols["target_valid"]
    fitted = matched & cols["fit_status"]
    fields = ("pt", "eta", "phi", "q")
    for key, kind, rows in (("head", "head", matched), ("fit", "fit", fitted), ("head_on_fit_tracks", "head", fitted)):
        want = regression_metrics({f: cols[f"{kind}_{f}"][rows] for f in fields},
                                  {f: cols[f"true_{f}"][rows] for f in fields})
        assert set(metrics[key]) == set(want)
        for name, value in want.items():
            assert metrics[key][name] == pytest.approx(value, rel=1e-12, nan_ok=True) or (
                metrics[key][name] is None and np.isnan(value)), (key, name)
    assert metrics["counts"] == {
        "events": NUM_EVENTS, "queries": NUM_EVENTS * NUM_QUERIES, "matched": int(matched.sum()),
        "fit_ok": int(fitted.sum()), "fit_failed": int((matched & ~cols["fit_status"]).sum()),
        "fit_failed_few_hits": int((matched & (cols["n_assigned"] < 3)).sum()),
    }
    for name in ("residuals.png", "pulls.png", "pt_resolution.png", "angle_resolution.png"):
        assert (out / name).stat().st_size > 10_000


def test_live_matches_cache(setup):
    from cachefeat.evaluation.predict import evaluate

    args = dict(batch_size=5, plots=False)
    evaluate(copy.deepcopy(CONFIG), setup["head"], setup["root"] / "cached", cache=setup["cache"], **args)
    evaluate(copy.deepcopy(CONFIG), setup["head"], setup["root"] / "live", source="live",
             checkpoint=setup["checkpoint"], input=setup["input"], **args)
    cached = read_h5(setup["root"] / "cached" / "predictions.h5")
    live = read_h5(setup["root"] / "live" / "predictions.h5")
    assert set(cached) == set(live)
    for name in cached:
        np.testing.assert_allclose(live[name], cached[name], rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)


def test_bad_inputs(setup, tmp_path):
    from cachefeat.cli import main
    from cachefeat.evaluation.predict import evaluate

    config = copy.deepcopy(CONFIG)
    with pytest.raises(UserError, match="head checkpoint not found"):
        evaluate(config, tmp_path / "nope.ckpt", tmp_path / "out", cache=setup["cache"])
    assert main(["evaluate", "--config", str(setup["config"]), "--head", str(tmp_path / "nope.ckpt"),
                 "--cache", str(setup["cache"]), "--output", str(tmp_path / "out")]) == 2

    save_head(tmp_path / "wide.ckpt", random_head(HIT_FIELDS + ["time"]), setup["fingerprint"])
    with pytest.raises(UserError, match="raw hit fields"):
        evaluate(config, tmp_path / "wide.ckpt", tmp_path / "out", cache=setup["cache"])

    save_head(tmp_path / "other.ckpt", random_head(), {**setup["fingerprint"], "checkpoint_sha256": "0" * 64})
    with pytest.raises(UserError, match="other backbone weights"):
        evaluate(config, tmp_path / "other.ckpt", tmp_path / "out", cache=setup["cache"])

    no_bz = {k: v for k, v in config.items() if k != "evaluate"}
    with pytest.raises(UserError, match="--bz"):
        evaluate(no_bz, setup["head"], tmp_path / "out", cache=setup["cache"])
    with pytest.raises(UserError, match="unknown key 'evaluate.b'"):
        evaluate({**config, "evaluate": {"b": 2.0}}, setup["head"], tmp_path / "out", cache=setup["cache"])
    with pytest.raises(UserError, match="--cache"):
        evaluate(config, setup["head"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def helix_hits(pt, eta, phi0, q, bz, radii):
    """x, y, z (m) where a helix from the origin crosses the cylinders `radii`."""
    R = pt / (C_LIGHT * bz)
    arc = 2 * R * np.arcsin(radii / (2 * R))
    omega = -q / R
    x = (np.sin(phi0 + omega * arc) - np.sin(phi0)) / omega
    y = -(np.cos(phi0 + omega * arc) - np.cos(phi0)) / omega
    return x, y, arc * np.sinh(eta)


def test_predict_batch_fits_the_assigned_hits():
    """Exact helices with decoy hits below the threshold: the fit returns the truth only if it
    uses exactly the pairs with p >= tau and reads x, y, z from the right raw columns."""
    from cachefeat.evaluation.predict import predict_batch

    raw_fields = ["layer", "z", "phi", "y", "x"]  # x, y, z deliberately not first nor in order
    head = random_head(raw_fields).eval()
    bz, radii = 2.0, np.array([0.05, 0.1, 0.2, 0.35, 0.5, 0.7])
    tracks = [(10.0, 0.5, 1.0, 1.0), (3.0, -1.2, -2.5, -1.0)]
    rows, pair_q, pair_h, pair_l = [], [], [], []
    for k, (pt, eta, phi, q) in enumerate(tracks):
        x, y, z = helix_hits(pt, eta, phi, q, bz, radii)
        for i in range(len(radii)):
            pair_q.append(k), pair_h.append(len(rows)), pair_l.append(2.0)
            rows.append([i, z[i], np.arctan2(y[i], x[i]), y[i], x[i]])
    # Decoys: far off either helix, logit -3 (p = 0.047 < tau = 0.1), one of them shared by both queries.
    for xd, yd in ((0.3, -0.4), (-0.5, 0.1)):
        for k in range(2):
            pair_q.append(k), pair_h.append(len(rows)), pair_l.append(-3.0)
        rows.append([9, 0.9, 0.0, yd, xd])
    # Query 2 (second event): two hits only, so no fit; query 3: no pairs at all.
    for i in range(2):
        pair_q.append(2), pair_h.append(len(rows)), pair_l.append(0.0)
        rows.append([i, 0.1 * i, 0.0, 0.0, 0.1 + 0.1 * i])

    H, Q = len(rows), 4
    targets = torch.zeros(Q, len(PARTICLE_FIELDS))
    for k, (pt, eta, phi, q) in enumerate(tracks):
        targets[k] = torch.tensor([pt, eta, phi, q, 0.0])
    targets[2] = torch.tensor([5.0, 0.0, 0.0, 1.0, 0.0])
    hb = HeadBatch(
        event_id=torch.tensor([40, 41]), hit_offsets=torch.tensor([0, H - 2, H]), query_offsets=torch.tensor([0, 2, 4]),
        hit_raw=torch.tensor(rows, dtype=torch.float32), hit_embed=torch.randn(H, 16), query_embed=torch.randn(Q, 16),
        query_valid_logit=torch.tensor([2.0, 0.0, -1.0, -9.0]), query_slot=torch.tensor([0, 1, 0, 1]),
        target_index=torch.tensor([0, 1, 0, -1]), targets=targets, target_valid=torch.tensor([True, True, True, False]),
        pair_query=torch.tensor(pair_q), pair_hit=torch.tensor(pair_h), pair_logit=torch.tensor(pair_l),
    )
    cols = predict_batch(head, hb, bz)

    np.testing.assert_array_equal(cols["event_id"], [40, 40, 41, 41])
    np.testing.assert_array_equal(cols["n_assigned"], [6, 6, 2, 0])
    np.testing.assert_array_equal(cols["fit_status"], [True, True, False, False])
    np.testing.assert_allclose(cols["track_valid_prob"], 1 / (1 + np.exp(-np.array([2.0, 0.0, -1.0, -9.0]))), rtol=1e-6)
    truth = np.array(tracks)
    # float32 hit coordinates: 1e-4 relative on pT and 1e-5 on the angles.
    np.testing.assert_allclose(cols["fit_pt"][:2], truth[:, 0], rtol=1e-4)
    np.testing.assert_allclose(cols["fit_eta"][:2], truth[:, 1], atol=1e-5)
    np.testing.assert_allclose(cols["fit_phi"][:2], truth[:, 2], atol=1e-5)
    np.testing.assert_array_equal(cols["fit_q"][:2], truth[:, 3])
    assert np.isnan(cols["fit_pt"][2:]).all()
    np.testing.assert_array_equal(cols["true_pt"][:3], [10.0, 3.0, 5.0])
    assert np.isnan(cols["true_pt"][3])
    assert set(np.unique(np.sign(cols["head_q"]))) <= {-1.0, 0.0, 1.0}
    assert (cols["head_pt"] > 0).all()
