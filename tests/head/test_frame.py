"""Regression head with frame="track" (issue 12): sparse == dense (outputs and gradients, empty
queries, ties, the +-pi seam), pass 1 against a hand computation, the standardisation buffers
against numpy, targets relative to the frame, checkpoints and bad input."""

import json
import math

import numpy as np
import pytest
import torch
from head_testing import close, close_grad, perturbed_head
from head_testing import dense_args as _dense_args

from cachefeat.errors import UserError
from cachefeat.head.inputs import from_model_outputs
from cachefeat.head.metrics import wrap_angle
from cachefeat.head.regression import FRAME_CLAMP, RegressionHead, pair_weights

# The muon preset's raw hit fields.
RAW = ["x", "y", "z", "r", "s", "eta", "phi", "u", "v", "layer"]
PARTICLE = ["pt", "eta", "phi", "q", "vz"]


def hits_of(phi, eta, r, layer):
    """Raw hit fields (muon layout) of hits at phi, eta, radius r: x, y, z, r, s, eta, phi, u, v, layer."""
    x, y = r * torch.cos(phi), r * torch.sin(phi)
    z = r * torch.sinh(eta)
    u, v = x / r**2, y / r**2
    s = torch.sqrt(r**2 + z**2)
    return {"x": x, "y": y, "z": z, "r": r, "s": s, "eta": eta, "phi": phi, "u": u, "v": v, "layer": layer}


def make_tracks(seed, B=3, N=3, M=12, D=8, P=3, hit_counts=None, seam=False):
    """Model-like padded outputs and batch whose hits lie along tracks (one per query): each hit
    gets a high logit for its own query. With `seam`, the tracks sit at phi = +-pi."""
    g = torch.Generator().manual_seed(seed)
    hit_counts = torch.tensor(hit_counts if hit_counts is not None else [M] * B)
    hit_valid = torch.arange(M)[None, :] < hit_counts[:, None]
    owner = torch.randint(0, N, (B, M), generator=g)
    track_phi = (torch.rand(B, N, generator=g) * 2 - 1) * math.pi
    if seam:
        track_phi = torch.where(torch.rand(B, N, generator=g) < 0.5, math.pi - 0.01, -math.pi + 0.01)
    track_eta = torch.randn(B, N, generator=g)
    layer = torch.randint(0, 30, (B, M), generator=g).float()
    r = 3.0 + 0.4 * layer
    phi = wrap_angle(track_phi.gather(1, owner) + 0.05 * torch.randn(B, M, generator=g) + 0.002 * r)
    eta = track_eta.gather(1, owner) + 0.01 * torch.randn(B, M, generator=g)
    logit = torch.randn(B, N, M, generator=g) - 4.0
    logit.scatter_(1, owner[:, None, :], 3.0 + torch.rand(B, 1, M, generator=g))
    outputs = {
        "hit_embed": torch.randn(B, M, D, generator=g).requires_grad_(),
        "query_embed": torch.randn(B, N, D, generator=g).requires_grad_(),
        "track_valid": torch.randn(B, N, generator=g),
        "track_hit_logit": logit,
    }
    batch = {"event_id": torch.arange(B) + 100, "hit_valid": hit_valid,
             "particle_valid": torch.ones(B, P, dtype=torch.bool)}
    for f, value in hits_of(phi, eta, r, layer).items():
        batch[f"hit_{f}"] = value
    for f in PARTICLE:
        batch[f"particle_{f}"] = torch.rand(B, P, generator=g) + 0.5
    batch["particle_phi"] = (torch.rand(B, P, generator=g) * 2 - 1) * math.pi
    batch["particle_q"] = torch.where(torch.rand(B, P, generator=g) < 0.5, -1.0, 1.0)
    target_index = torch.randint(-1, P, (B, N), generator=g)
    return outputs, batch, target_index


def dense_args(outputs, batch):
    return _dense_args(outputs, batch, RAW)


def make_head(seed, D=8, tau=0.1, **kw):
    kw.setdefault("inverse_fields", ["pt"])
    return perturbed_head(seed, RAW, PARTICLE, D, tau, frame="track", **kw)


def grads(out, head, leaves, seed=0):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * weight).sum(), list(head.parameters()) + list(leaves), allow_unused=True)


def fitted(head, outputs, batch, target_index, floor=0.05):
    hb = from_model_outputs(outputs, batch, target_index, floor, RAW, PARTICLE)
    if bool(hb.target_valid.any()):
        head.fit_scaling(hb.targets, hb.target_valid, hb)
    return hb


def assert_sparse_equals_dense(head, outputs, batch, target_index, floor=0.05):
    hb = from_model_outputs(outputs, batch, target_index, floor, RAW, PARTICLE)
    B, N = outputs["query_embed"].shape[:2]
    T = len(head.target_fields)
    leaves = (outputs["hit_embed"], outputs["query_embed"])
    sparse = head.forward_sparse(hb)
    dense = head.forward_dense(*dense_args(outputs, batch)).reshape(B * N, T)
    close(sparse, dense)
    for gs, gd in zip(grads(sparse, head, leaves), grads(dense, head, leaves)):
        if gs is None or gd is None:
            assert gs is None and gd is None
        else:
            close_grad(gs, gd)
    # The features and the pass-1 frame agree too.
    close(head.features_sparse(hb), head.features_dense(*dense_args(outputs, batch)).reshape(B * N, -1))
    head.impl = "dense"
    close(head(hb), sparse)
    head.impl = "sparse"
    return hb, sparse


@pytest.mark.parametrize("hit_net", ["mlp", "dense"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_equals_dense_random(seed, hit_net):
    head = make_head(seed, hit_net=hit_net)
    fitted(head, *make_tracks(seed))
    assert not torch.equal(head.frame_scale, torch.ones_like(head.frame_scale))
    hb, _ = assert_sparse_equals_dense(head, *make_tracks(seed + 10))
    assert 0 < hb.pair_logit.shape[0] < 3 * 3 * 12


@pytest.mark.parametrize(
    "case, make_kw",
    [
        ("event without hits", dict(hit_counts=[12, 0, 5])),
        ("padded batch", dict(B=4, hit_counts=[12, 3, 7, 1])),
        ("tracks at the seam", dict(seam=True)),
    ],
)
def test_sparse_equals_dense_edge_cases(case, make_kw):
    head = make_head(3)
    fitted(head, *make_tracks(3, seam=make_kw.get("seam", False)))
    assert_sparse_equals_dense(head, *make_tracks(4, **make_kw))


def test_query_without_pairs_and_all_noise_event():
    head = make_head(4)
    outputs, batch, target_index = make_tracks(4)
    fitted(head, outputs, batch, target_index)
    with torch.no_grad():
        outputs["track_hit_logit"][0, 1] = -30.0  # a query without pairs
        outputs["track_hit_logit"][2] = -30.0  # an all-noise event
    hb, sparse = assert_sparse_equals_dense(head, outputs, batch, target_index)
    phi_ref, eta_ref = head.frame_refs(pair_weights(hb, head.assignment_threshold))
    for row in (1, 6, 7, 8):
        assert phi_ref[row] == 0 and eta_ref[row] == 0
        assert torch.count_nonzero(head.features_sparse(hb)[row, 8:]) == 0
    assert torch.isfinite(sparse).all()


def test_exact_ties_give_the_dense_gradients():
    """Two identical hits of one query tie in every max/min column of the framed raw hit net."""
    head = make_head(5)
    outputs, batch, target_index = make_tracks(5)
    fitted(head, outputs, batch, target_index)
    for f in RAW:
        batch[f"hit_{f}"][0, 1] = batch[f"hit_{f}"][0, 0]
    outputs["track_hit_logit"][0, :, :2] = -6.0
    outputs["track_hit_logit"][0, 0, :2] = 4.0  # both assigned to query 0, with the same p
    assert_sparse_equals_dense(head, outputs, batch, target_index)


def test_pass_one_hand_computed_at_the_seam():
    """phi_ref is the circular weighted mean (by p / sum p) and eta_ref the weighted mean, by hand."""
    head = make_head(6, tau=0.1)
    logit = torch.full((1, 2, 4), -30.0)
    p = [0.9, 0.3, 0.6, 0.05]  # the last one is below tau
    for m, pm in enumerate(p):
        logit[0, 0 if m < 3 else 1, m] = math.log(pm / (1 - pm))
    logit[0, 1, 1] = math.log(0.5 / 0.5)  # hit 1 also in query 1
    phi = torch.tensor([[math.pi - 0.02, -math.pi + 0.05, math.pi - 0.1, 1.0]])
    eta = torch.tensor([[0.3, 0.31, 0.28, -1.0]])
    layer = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    batch = {"event_id": torch.tensor([0]), "hit_valid": torch.ones(1, 4, dtype=torch.bool),
             "particle_valid": torch.ones(1, 1, dtype=torch.bool)}
    for f, value in hits_of(phi, eta, 3.0 + layer, layer).items():
        batch[f"hit_{f}"] = value
    for f in PARTICLE:
        batch[f"particle_{f}"] = torch.ones(1, 1)
    outputs = {"hit_embed": torch.randn(1, 4, 8), "query_embed": torch.randn(1, 2, 8),
               "track_valid": torch.zeros(1, 2), "track_hit_logit": logit}
    hb = from_model_outputs(outputs, batch, torch.tensor([[0, -1]]), 0.01, RAW, PARTICLE)

    def by_hand(members):
        total = sum(p for _, p in members)
        s = sum(p / total * math.sin(phi[0, m].item()) for m, p in members)
        c = sum(p / total * math.cos(phi[0, m].item()) for m, p in members)
        return math.atan2(s, c), sum(p / total * eta[0, m].item() for m, p in members)

    expected = [by_hand([(0, 0.9), (1, 0.3), (2, 0.6)]), by_hand([(1, 0.5)])]
    assert abs(expected[0][0]) > 3.0  # the mean of phi near +-pi is near +-pi, not near 0
    phi_ref, eta_ref = head.frame_refs(pair_weights(hb, 0.1))
    for q, (want_phi, want_eta) in enumerate(expected):
        assert abs(wrap_angle(torch.tensor(phi_ref[q].item() - want_phi)).item()) < 1e-6
        assert eta_ref[q].item() == pytest.approx(want_eta, abs=1e-6)
    # The dense pass 1 gives the same frame.
    from cachefeat.head.regression import frame_refs_dense

    pd = torch.sigmoid(logit)
    wt = pd * (pd >= 0.1)
    dphi, deta = frame_refs_dense(wt, dense_args(outputs, batch)[2], RAW.index("phi"), RAW.index("eta"))
    close(dphi.flatten(), phi_ref)
    close(deta.flatten(), eta_ref)


def framed_by_hand(raw, phi_ref, eta_ref):
    """numpy (float64) of the raw hit net's frame inputs, column by column of RAW."""
    col = {f: raw[:, i] for i, f in enumerate(RAW)}
    c, s = np.cos(phi_ref), np.sin(phi_ref)
    dphi = np.remainder(col["phi"] - phi_ref + np.pi, 2 * np.pi) - np.pi
    return np.stack([col["x"] * c + col["y"] * s, col["y"] * c - col["x"] * s, col["z"] - col["r"] * np.sinh(eta_ref),
                     col["r"], col["s"], col["eta"] - eta_ref, dphi, col["u"] * c + col["v"] * s,
                     col["v"] * c - col["u"] * s, col["layer"]], axis=1)


def test_standardisation_buffers_match_numpy():
    head = make_head(8)
    outputs, batch, target_index = make_tracks(8, B=6, M=20)
    hb = fitted(head, outputs, batch, target_index)
    pairs = pair_weights(hb, head.assignment_threshold)
    phi_ref, eta_ref = (t.double().numpy() for t in head.frame_refs(pairs))
    matched = (hb.target_valid[pairs.query] & (pairs.segment < pairs.num_queries)).numpy()  # p >= tau, valid
    q = pairs.query.numpy()[matched]
    X = framed_by_hand(pairs.raw.double().numpy()[matched], phi_ref[q], eta_ref[q])
    assert X.shape[0] > 20
    lo, median, hi = np.percentile(X, [16, 50, 84], axis=0)
    np.testing.assert_allclose(head.frame_center.numpy(), median, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.frame_scale.numpy(), (hi - lo) / 2, rtol=1e-5, atol=1e-5)
    # The targets phi and eta are standardised relative to the frame.
    valid = hb.target_valid.numpy()
    values = hb.targets.double().numpy()
    dphi = np.remainder(values[valid, PARTICLE.index("phi")] - phi_ref[valid] + np.pi, 2 * np.pi) - np.pi
    deta = values[valid, PARTICLE.index("eta")] - eta_ref[valid]
    i_phi, i_eta = head.target_fields.index("phi"), head.target_fields.index("eta")
    assert head.target_mean[i_phi].item() == 0.0
    assert head.target_std[i_phi].item() == pytest.approx(np.sqrt(np.mean(dphi**2)), rel=1e-5)
    assert head.target_mean[i_eta].item() == pytest.approx(deta.mean(), rel=1e-4, abs=1e-6)
    assert head.target_std[i_eta].item() == pytest.approx(deta.std(), rel=1e-4)
    # Inputs are standardised and clamped.
    inputs = head._frame_inputs(pairs.raw, *(t[pairs.query] for t in head.frame_refs(pairs)))
    assert inputs.abs().max() <= FRAME_CLAMP
    expected = np.clip((framed_by_hand(pairs.raw.double().numpy(), phi_ref[pairs.query.numpy()],
                                       eta_ref[pairs.query.numpy()]) - median) / ((hi - lo) / 2), -8, 8)
    np.testing.assert_allclose(inputs.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_predictions_are_relative_to_the_frame_and_decode_wraps():
    """With a zero MLP output, phi decodes to phi_ref (+ mean, wrapped) and eta to eta_ref + mean."""
    head = make_head(9).eval()
    outputs, batch, target_index = make_tracks(9, seam=True)
    hb = fitted(head, outputs, batch, target_index)
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.zero_()
        decoded = head.decode(head(hb))
    phi_ref, eta_ref = head.frame_refs(pair_weights(hb, head.assignment_threshold))
    i_eta = head.target_fields.index("eta")
    close(decoded["phi"], wrap_angle(phi_ref).float())
    close(decoded["eta"], (eta_ref + head.target_mean[i_eta]).float())
    assert (decoded["phi"].abs() > 3.0).sum() >= 6  # seam tracks decode near +-pi
    # The loss of a perfect residual is ~0 across the seam.
    with torch.no_grad():
        pred = head(hb)
        target = head.encode_targets(hb.targets)
        i_phi = head.target_fields.index("phi")
        pred[:, i_phi] = target[:, i_phi] + 2 * math.pi / head.target_std[i_phi]  # one turn off: the same angle
        pred[:, i_eta] = target[:, i_eta]
        for f in ("pt", "q"):
            pred[:, head.target_fields.index(f)] = target[:, head.target_fields.index(f)]
    assert head.loss(pred, hb).item() < 1e-6


def test_pass_one_is_shared_through_the_pair_weights():
    """A sweep's variants with one threshold compute pass 1 once per batch."""
    outputs, batch, target_index = make_tracks(10)
    hb = from_model_outputs(outputs, batch, target_index, 0.05, RAW, PARTICLE)
    pairs = pair_weights(hb, 0.1)
    a, b = make_head(1), make_head(2, hit_net="dense")
    first = a.frame_refs(pairs)
    assert b.frame_refs(pairs) is first
    close(a.predict_from_pairs(hb, pairs), a.forward_sparse(hb))


def test_checkpoint_round_trip_and_a_checkpoint_of_another_kind(tmp_path):
    from cachefeat.head.checkpoint import load_head, save_head
    from cachefeat.model.checkpoint import load_model_state

    head = make_head(11).eval()
    outputs, batch, target_index = make_tracks(11)
    hb = fitted(head, outputs, batch, target_index)
    save_head(tmp_path / "head.ckpt", head, {}, None, {})
    loaded, ckpt = load_head(tmp_path / "head.ckpt")
    assert loaded.head_config() == head.head_config() and loaded.frame == "track"
    assert RegressionHead(**json.loads(json.dumps(head.head_config()))).head_config() == head.head_config()
    assert torch.equal(loaded.frame_center, head.frame_center) and torch.equal(loaded.frame_scale, head.frame_scale)
    with torch.no_grad():
        assert torch.equal(loaded(hb), head(hb))

    plain = RegressionHead(RAW, PARTICLE, dim=8, hidden_dim=16, inverse_fields=["pt"])
    with pytest.raises(UserError, match="frame 'track' cannot be loaded into a head of frame 'none'"):
        load_model_state(plain, ckpt, prefix="head.")
    with pytest.raises(UserError, match="frame 'track' cannot be loaded"):
        plain.load_state_dict(head.state_dict())
    with pytest.raises(UserError, match="frame 'none' cannot be loaded into a head of frame 'track'"):
        make_head(11).load_state_dict(plain.state_dict())


def test_frame_none_is_the_default_and_unchanged():
    torch.manual_seed(0)
    a = RegressionHead(RAW, PARTICLE, dim=8, hidden_dim=16)
    torch.manual_seed(0)
    b = RegressionHead(RAW, PARTICLE, dim=8, hidden_dim=16, frame="none")
    assert a.head_config()["frame"] == "none" and "frame_center" not in a.state_dict()
    outputs, batch, target_index = make_tracks(12)
    hb = from_model_outputs(outputs, batch, target_index, 0.05, RAW, PARTICLE)
    assert torch.equal(a(hb), b(hb))
    old = {k: v for k, v in a.head_config().items() if k != "frame"}
    assert RegressionHead(**old).head_config() == a.head_config()


def test_fit_without_a_batch_keeps_identity_frame():
    head = make_head(13)
    outputs, batch, target_index = make_tracks(13)
    hb = from_model_outputs(outputs, batch, target_index, 0.05, RAW, PARTICLE)
    head.fit_scaling(hb.targets, hb.target_valid)
    assert torch.equal(head.frame_scale, torch.ones(len(RAW)))
    i_phi = head.target_fields.index("phi")
    assert head.target_std[i_phi] == 1.0


@pytest.mark.parametrize(
    "raw, kw, match",
    [
        (["x", "y", "z", "r"], {}, "needs the raw hit field\\(s\\) phi, eta,"),
        (["x", "z", "r", "eta", "phi"], {}, "needs the raw hit field\\(s\\) y,"),
        (["x", "y", "z", "eta", "phi"], {}, "needs the raw hit field\\(s\\) r,"),
        (["u", "eta", "phi"], {}, "field\\(s\\) v,"),
        (RAW, {"frame": "event"}, "frame must be one of"),
        (RAW, {"targets": "raw"}, "needs targets: standardised"),
    ],
)
def test_bad_frame_config_is_a_user_error(raw, kw, match):
    kw = {"frame": "track", **kw}
    with pytest.raises(UserError, match=match):
        RegressionHead(raw, PARTICLE, dim=4, **kw)


def test_raw_hit_fields_choose_the_framed_inputs():
    """raw_hit_fields picks which framed fields the net reads; z alone still needs r (and phi, eta)."""
    head = RegressionHead(RAW, PARTICLE, dim=4, frame="track", raw_hit_fields=["z", "phi"])
    assert head.raw_hit_net[0].in_features == 2 and head.frame_center.shape == (2,)
    with pytest.raises(UserError, match="field\\(s\\) r,"):
        RegressionHead(["z", "eta", "phi"], PARTICLE, dim=4, frame="track", raw_hit_fields=["z"])


def test_truth_head_batch_fits_a_frame_head_for_joint_pretraining():
    """Joint pretraining fits a frame head on the truth: each valid particle with hits a query, its hits the pairs."""
    from cachefeat.training.pretrain import truth_head_batch

    _, batch, _ = make_tracks(14, B=2, M=6, P=3)
    batch["hit_particle_index"] = torch.tensor([[0, 0, 2, -1, 2, 1], [1, 1, 1, 0, -1, -1]])
    batch["hit_valid"] = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    batch["particle_valid"] = torch.tensor([[True, False, True], [True, True, True]])
    hb = truth_head_batch(batch, RAW, PARTICLE, dim=8)
    # event 0: particles 0 (hits 0, 1) and 2 (hits 2, 4), particle 1 invalid; event 1: particles 0 (hit 3), 1 (0-2).
    assert hb.query_offsets.tolist() == [0, 2, 4] and hb.target_index.tolist() == [0, 2, 0, 1]
    assert hb.hit_offsets.tolist() == [0, 4, 8]
    assert hb.pair_query.tolist() == [0, 0, 1, 1, 3, 3, 3, 2]
    kept = [0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 4, 0, 1, 2, 3]
    assert torch.equal(hb.hit_raw[:, RAW.index("phi")], batch["hit_phi"][kept])
    assert torch.equal(hb.targets[:, PARTICLE.index("pt")], batch["particle_pt"][[0, 0, 1, 1], [0, 2, 0, 1]])
    head = make_head(14)
    head.fit_scaling(hb.targets, hb.target_valid, hb)
    assert torch.isfinite(head.frame_center).all() and (head.frame_scale > 0).all()


def test_frame_offset_keeps_float32_under_autocast():
    """Under bfloat16 autocast the references are added in float32 (a matmul would round phi_ref to ~1e-2)."""
    head = make_head(15, impl="dense").eval()  # CPU sparse CSR products have no bfloat16 kernel
    outputs, batch, target_index = make_tracks(15, seam=True)
    hb = fitted(head, outputs, batch, target_index)
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.zero_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = head(hb)
        decoded = head.decode(pred.float())
    phi_ref, _ = head.frame_refs(pair_weights(hb, head.assignment_threshold))
    torch.testing.assert_close(decoded["phi"], wrap_angle(phi_ref).float(), rtol=0, atol=1e-5)
