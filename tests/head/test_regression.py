"""Regression head: sparse == dense (outputs and gradients), hand-computed pools, loss and targets;
the reference-workflow options (dense hit nets vs hepattn's Dense, raw_hit_fields, raw targets)."""

import copy
import json
import math

import pytest
import torch
from head_testing import close, close_grad, perturbed_head
from head_testing import dense_args as _dense_args
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch, from_model_outputs
from cachefeat.head.regression import RegressionHead, StreamDropout, SwiGLU, dense_inputs

RAW = ["x", "y", "z", "r"]
PARTICLE = ["pt", "eta", "phi", "q", "vz"]


def make_padded(seed, B=3, N=3, M=12, D=8, P=3, hit_counts=None, logit_scale=3.0, logit_shift=0.0):
    """Random model-like padded outputs and batch; embeddings are leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    hit_counts = torch.tensor(hit_counts if hit_counts is not None else [M] * B)
    hit_valid = torch.arange(M)[None, :] < hit_counts[:, None]
    # Padding hits get random logits too: the dense path must mask them through hit_valid.
    logit = torch.randn(B, N, M, generator=g) * logit_scale + logit_shift
    outputs = {
        "hit_embed": torch.randn(B, M, D, generator=g).requires_grad_(),
        "query_embed": torch.randn(B, N, D, generator=g).requires_grad_(),
        "track_valid": torch.randn(B, N, generator=g),
        "track_hit_logit": logit,
    }
    batch = {
        "event_id": torch.arange(B) + 100,
        "hit_valid": hit_valid,
        "particle_valid": torch.ones(B, P, dtype=torch.bool),
    }
    for f in RAW:
        batch[f"hit_{f}"] = torch.randn(B, M, generator=g)
    for f in PARTICLE:
        batch[f"particle_{f}"] = torch.rand(B, P, generator=g) + 0.5
    target_index = torch.randint(-1, P, (B, N), generator=g)
    return outputs, batch, target_index


def dense_args(outputs, batch):
    return _dense_args(outputs, batch, RAW)


def make_head(seed, D=8, tau=0.1, **kw):
    return perturbed_head(seed, RAW, PARTICLE, D, tau, **kw)


def grads(out, head, leaves, seed=0):
    """Gradients of a fixed random projection of `out` w.r.t. the head parameters and `leaves`."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    params = [p for p in head.parameters()]
    return torch.autograd.grad((out * weight).sum(), params + list(leaves), allow_unused=True)


def assert_sparse_equals_dense(head, outputs, batch, target_index, floor):
    """sparse(hb) vs forward_dense on the original padded tensors; also forward(hb) with impl=dense."""
    hb = from_model_outputs(outputs, batch, target_index, floor, RAW, PARTICLE)
    B, N = outputs["query_embed"].shape[:2]
    leaves = (outputs["hit_embed"], outputs["query_embed"])

    sparse = head.forward_sparse(hb)
    dense = head.forward_dense(*dense_args(outputs, batch))
    T = len(head.target_fields)
    assert sparse.shape == (B * N, T)
    close(sparse, dense.reshape(B * N, T))
    for gs, gd in zip(grads(sparse, head, leaves), grads(dense.reshape(B * N, T), head, leaves)):
        if gs is None or gd is None:
            assert gs is None and gd is None
        else:
            close_grad(gs, gd)

    head.impl = "dense"
    close(head(hb), sparse)
    head.impl = "sparse"
    return hb, sparse


HIT_NETS = ["mlp", "dense"]


@pytest.mark.parametrize("hit_net", HIT_NETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_equals_dense_random(seed, hit_net):
    head = make_head(seed, hit_net=hit_net)
    outputs, batch, target_index = make_padded(seed)
    hb, _ = assert_sparse_equals_dense(head, outputs, batch, target_index, floor=0.05)
    assert 0 < hb.pair_logit.shape[0] < 3 * 3 * 12  # the test is not trivially all or nothing


@pytest.mark.parametrize(
    "case, make_kw, floor, tau",
    [
        ("event without hits", dict(hit_counts=[12, 0, 5]), 0.05, 0.1),
        ("padded batch", dict(B=4, hit_counts=[12, 3, 7, 1]), 0.05, 0.1),
        ("tau above floor", {}, 0.02, 0.6),
        ("floor equals tau", {}, 0.3, 0.3),
    ],
)
@pytest.mark.parametrize("hit_net", HIT_NETS)
def test_sparse_equals_dense_edge_cases(case, make_kw, floor, tau, hit_net):
    head = make_head(3, tau=tau, hit_net=hit_net)
    outputs, batch, target_index = make_padded(3, **make_kw)
    assert_sparse_equals_dense(head, outputs, batch, target_index, floor)


@pytest.mark.parametrize("hit_net", HIT_NETS)
def test_exact_ties_in_max_and_min_pools_give_the_dense_gradients(hit_net):
    """Two hits of one query with the same raw features tie in every max/min column of the raw
    hit net's output. Autograd (dense) splits the gradient between them, the sparse pool gives it
    to one; the head parameters' gradients must still agree."""
    head = make_head(5, hit_net=hit_net)
    outputs, batch, target_index = make_padded(5)
    for f in RAW:
        batch[f"hit_{f}"][0, 1] = batch[f"hit_{f}"][0, 0]
    outputs["track_hit_logit"][0, 0, :2] = 4.0  # both assigned to query 0
    assert_sparse_equals_dense(head, outputs, batch, target_index, floor=0.05)


@pytest.mark.parametrize("hit_net", HIT_NETS)
def test_query_without_assigned_hits_and_all_noise_event(hit_net):
    head = make_head(4, hit_net=hit_net)
    outputs, batch, target_index = make_padded(4)
    with torch.no_grad():
        outputs["track_hit_logit"][0, 1] = -30.0  # one query with no assigned hit
        outputs["track_hit_logit"][2] = -30.0  # an all-noise event
    hb, sparse = assert_sparse_equals_dense(head, outputs, batch, target_index, floor=0.05)
    # Those queries see only their embedding: all 8 pools are zero.
    z = head.features_sparse(hb)
    for row in (1, 6, 7, 8):
        assert torch.count_nonzero(z[row, 8:]) == 0
    assert torch.count_nonzero(z[0, 8:]) > 0


def test_only_matched_queries_kept_gives_padded_query_counts():
    head = make_head(5)
    outputs, batch, target_index = make_padded(5, B=4)
    target_index[1] = -1  # event 1 keeps no query
    hb = from_model_outputs(outputs, batch, target_index, 0.05, RAW, PARTICLE, keep_queries="matched", keep_hits="all")
    dense = head.forward_dense(*dense_args(outputs, batch))
    sparse = head.forward_sparse(hb)
    close(sparse, dense[target_index >= 0])
    head.impl = "dense"
    close(head(hb), sparse)


@pytest.mark.parametrize("hit_net", HIT_NETS)
def test_valid_targets_only_keeps_the_loss_and_its_gradients(hit_net):
    """Dropping the queries without a valid target (and their pairs) leaves the predictions of the
    others, the loss and every gradient as on the full batch (the dense head on the full padded
    outputs is the reference)."""
    head = make_head(4, tau=0.2, hit_net=hit_net)
    outputs, batch, target_index = make_padded(4, B=4, N=4, hit_counts=[12, 5, 0, 9])
    hb = from_model_outputs(outputs, batch, target_index, 0.1, RAW, PARTICLE)
    sub = hb.with_valid_targets_only()
    valid = hb.target_valid
    assert 0 < int(valid.sum()) < valid.numel() and sub.pair_logit.numel() < hb.pair_logit.numel()
    assert sub.query_offsets.diff().tolist() == [int(v.sum()) for v in valid.split(hb.query_offsets.diff().tolist())]
    leaves = (outputs["hit_embed"], outputs["query_embed"])
    dense = head.forward_dense(*dense_args(outputs, batch)).flatten(0, 1)
    close(head(sub), dense[valid])
    full_loss, sub_loss = head.loss(dense, hb), head.loss(head(sub), sub)
    close(sub_loss, full_loss)
    params = list(head.parameters())
    for gs, gd in zip(torch.autograd.grad(sub_loss, params + list(leaves), allow_unused=True),
                      torch.autograd.grad(full_loss, params + list(leaves), allow_unused=True)):
        close_grad(gs, gd)


def test_dropout_same_seed_same_outputs_and_grads():
    head = make_head(6, dropout=0.3).train()
    outputs, batch, target_index = make_padded(6)
    hb = from_model_outputs(outputs, batch, target_index, 0.05, RAW, PARTICLE)
    leaves = (outputs["hit_embed"], outputs["query_embed"])
    start = {k: v.clone() for k, v in head.state_dict().items() if k.endswith("stream")}  # dropout streams
    sparse = head.forward_sparse(hb)
    head.load_state_dict(start, strict=False)  # back to the same point of the streams
    dense = head.forward_dense(*dense_args(outputs, batch)).flatten(0, 1)
    close(sparse, dense)
    other = head.forward_sparse(hb)  # the streams' next masks
    assert not torch.allclose(sparse, other)  # dropout is really on
    head.load_state_dict(start, strict=False)
    torch.manual_seed(5)
    again = head.forward_sparse(hb)
    torch.manual_seed(6)
    assert torch.equal(again, sparse) and torch.equal(head.forward_sparse(hb), other)  # not the global RNG
    for gs, gd in zip(grads(sparse, head, leaves), grads(dense, head, leaves)):
        close_grad(gs, gd)


def test_stream_dropout_rate_scale_and_continuation():
    """Masks drop a fraction p and scale the rest by 1/(1-p); a layer loaded from another's
    state continues that layer's stream (the next masks are equal), whatever its own seed."""
    torch.manual_seed(0)
    layer = StreamDropout(0.3).train()
    x = torch.ones(400, 500)
    first = layer(x)
    assert first.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
    assert (first == 0).float().mean().item() == pytest.approx(0.3, abs=0.005)  # 200k Bernoulli draws
    torch.manual_seed(1)
    other = StreamDropout(0.3).train()
    assert not torch.equal(other(x), first)  # another seed, another stream
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("hit_net", HIT_NETS)
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    B=st.integers(1, 3),
    N=st.integers(0, 3),
    M=st.integers(0, 7),
    D=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    tau=st.sampled_from([0.1, 0.4, 0.8]),
)
def test_sparse_equals_dense_property(B, N, M, D, seed, tau, hit_net):
    g = torch.Generator().manual_seed(seed)
    hit_counts = torch.randint(0, M + 1, (B,), generator=g).tolist()
    head = make_head(seed, D=D, tau=tau, hit_net=hit_net)
    outputs, batch, target_index = make_padded(seed, B=B, N=N, M=M, D=D, hit_counts=hit_counts)
    assert_sparse_equals_dense(head, outputs, batch, target_index, floor=min(tau, 0.2))


def test_dense_inputs_round_trip():
    outputs, batch, target_index = make_padded(7, B=3, hit_counts=[12, 4, 0])
    hb = from_model_outputs(outputs, batch, target_index, 0.05, RAW, PARTICLE, keep_queries="matched")
    q, h, x, logit, valid = dense_inputs(hb)
    counts_q, counts_h = hb.query_offsets.diff().tolist(), hb.hit_offsets.diff().tolist()
    assert q.shape[:2] == (3, max(counts_q)) and h.shape[:2] == (3, max(counts_h))
    assert valid.sum(1).tolist() == counts_h
    # Every stored pair is found at its padded position; everything else is -1e4.
    found = 0
    for e in range(3):
        q0, h0 = hb.query_offsets[e].item(), hb.hit_offsets[e].item()
        for i in range(counts_q[e]):
            close(q[e, i], hb.query_embed[q0 + i])
        for j in range(counts_h[e]):
            close(h[e, j], hb.hit_embed[h0 + j])
            close(x[e, j], hb.hit_raw[h0 + j])
    for pq, ph, pl in zip(hb.pair_query.tolist(), hb.pair_hit.tolist(), hb.pair_logit.tolist()):
        e = int(torch.searchsorted(hb.query_offsets, pq, right=True)) - 1
        assert logit[e, pq - hb.query_offsets[e], ph - hb.hit_offsets[e]].item() == pl
        found += 1
    assert (logit != -1e4).sum().item() == found == hb.pair_logit.shape[0]


# ---- hand-computed pools ------------------------------------------------------------------


def identity_head(tau=0.1):
    head = RegressionHead(["a", "b"], PARTICLE, dim=2, hidden_dim=4, assignment_threshold=tau)
    with torch.no_grad():
        for net in (head.raw_hit_net, head.encoded_hit_net):
            for i in (0, 2):
                net[i].weight.copy_(torch.eye(2))
                net[i].bias.zero_()
    return head  # R = relu(X), E = relu(H)


def logit_of(p):
    return math.log(p / (1 - p))


def test_pools_hand_computed():
    head = identity_head()
    X = torch.tensor([[1.0, 2.0], [4.0, 0.5], [9.0, 9.0]])
    H = torch.tensor([[3.0, 1.0], [2.0, 5.0], [7.0, 7.0]])
    Qe = torch.tensor([[0.7, -0.2], [0.1, 0.3]])
    # Query 0: hits 0, 1 at p = 0.8, 0.6 and hit 2 at p = 0.05 < tau. Query 1: only hit 2 (below tau).
    hb = HeadBatch(
        event_id=torch.tensor([0]),
        hit_offsets=torch.tensor([0, 3]),
        query_offsets=torch.tensor([0, 2]),
        hit_raw=X,
        hit_embed=H,
        query_embed=Qe,
        query_valid_logit=torch.zeros(2),
        query_slot=torch.tensor([0, 1]),
        target_index=torch.tensor([0, -1]),
        targets=torch.zeros(2, 5),
        target_valid=torch.tensor([True, False]),
        pair_query=torch.tensor([0, 0, 0, 1]),
        pair_hit=torch.tensor([0, 1, 2, 2]),
        pair_logit=torch.tensor([logit_of(0.8), logit_of(0.6), logit_of(0.05), logit_of(0.05)]),
    )
    # w~ = (0.8, 0.6), w = (4/7, 3/7).
    expected_q0 = [0.7, -0.2]
    expected_q0 += [16 / 7, 9.5 / 7, 3.2, 1.9, 4.0, 2.0, 1.0, 0.5]  # R = X: mean, sum, max, min
    expected_q0 += [18 / 7, 19 / 7, 3.6, 3.8, 3.0, 5.0, 2.0, 1.0]  # E = H
    expected = torch.tensor([expected_q0, [0.1, 0.3] + [0.0] * 16])
    close(head.features_sparse(hb), expected)

    # Dense: the same event plus a padding hit with a high logit that hit_valid must exclude.
    logit = torch.full((1, 2, 4), logit_of(0.05))
    logit[0, 0, :2] = torch.tensor([logit_of(0.8), logit_of(0.6)])
    logit[0, :, 3] = 10.0
    pad = torch.tensor([[100.0, 100.0]])
    valid = torch.tensor([[True, True, True, False]])
    z = head.features_dense(Qe[None], torch.cat([H, pad])[None], torch.cat([X, pad])[None], logit, valid)
    close(z[0], expected)


def test_dense_without_any_hit():
    head = identity_head()
    z = head.features_dense(
        torch.ones(2, 1, 2),
        torch.zeros(2, 0, 2),
        torch.zeros(2, 0, 2),
        torch.zeros(2, 1, 0),
        torch.zeros(2, 0, dtype=torch.bool),
    )
    close(z, torch.cat([torch.ones(2, 1, 2), torch.zeros(2, 1, 16)], -1))


# ---- loss ----------------------------------------------------------------------------------


def loss_batch(targets, valid):
    Q = targets.shape[0]
    return HeadBatch(
        event_id=torch.tensor([0]),
        hit_offsets=torch.tensor([0, 0]),
        query_offsets=torch.tensor([0, Q]),
        hit_raw=torch.zeros(0, 2),
        hit_embed=torch.zeros(0, 2),
        query_embed=torch.zeros(Q, 2),
        query_valid_logit=torch.zeros(Q),
        query_slot=torch.arange(Q),
        target_index=torch.where(torch.tensor(valid), 0, -1),
        targets=targets,
        target_valid=torch.tensor(valid),
        pair_query=torch.zeros(0, dtype=torch.long),
        pair_hit=torch.zeros(0, dtype=torch.long),
        pair_logit=torch.zeros(0),
    )


def particles(**cols):
    """[Q, 5] particle values in PARTICLE order from named columns (missing ones 0)."""
    Q = len(next(iter(cols.values())))
    return torch.stack([torch.tensor(cols.get(f, [0.0] * Q), dtype=torch.float32) for f in PARTICLE], -1)


def test_loss_hand_computed():
    head = RegressionHead(["a"], PARTICLE, dim=2, target_fields=["pt", "eta"])
    pred = torch.tensor([[1.0, 0.0], [0.2, 0.1], [5.0, 5.0]], requires_grad=True)
    hb = loss_batch(particles(pt=[0.5, 0.2, 0.0], eta=[2.5, 0.3, 0.0]), [True, True, False])
    # Query 0: d = (0.5, -2.5) -> (0.125, 2.0); query 1: d = (0, -0.2) -> (0, 0.02); query 2 invalid.
    expected = ((0.125 + 2.0) / 2 + (0.0 + 0.02) / 2) / 2
    loss = head.loss(pred, hb)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(pred.grad[2]) == 0

    # Scaled targets: (value - mean) / std.
    with torch.no_grad():
        head.target_mean.copy_(torch.tensor([0.1, 0.0]))
        head.target_std.copy_(torch.tensor([2.0, 1.0]))
    # Query 0 pt: target (0.5 - 0.1) / 2 = 0.2, d = 0.8 -> 0.32; query 1 pt: target 0.05, d = 0.15 -> 0.01125.
    expected = ((0.32 + 2.0) / 2 + (0.01125 + 0.02) / 2) / 2
    assert head.loss(pred, hb).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("std", [1.0, 2.0])
def test_loss_wraps_phi(std):
    head = RegressionHead(["a"], PARTICLE, dim=2, target_fields=["phi"])
    with torch.no_grad():
        head.target_std.fill_(std)
    pred = torch.tensor([[3.1 / std]])
    hb = loss_batch(particles(phi=[-3.1]), [True])
    residual = (6.2 - 2 * math.pi) / std  # 3.1 - (-3.1) = 6.2 rad, wrapped
    assert head.loss(pred, hb).item() == pytest.approx(0.5 * residual**2, rel=1e-4)
    assert head.loss(pred, hb).item() < 0.01


def test_loss_without_valid_query_is_zero_with_grad():
    head = RegressionHead(["a"], PARTICLE, dim=2, target_fields=["pt"], inverse_fields=["pt"])
    pred = torch.tensor([[0.3], [1.0]], requires_grad=True)
    hb = loss_batch(particles(pt=[0.0, 0.0], q=[0.0, 0.0]), [False, False])  # q / pt = nan there
    loss = head.loss(pred, hb)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(2, 1))


# ---- targets -------------------------------------------------------------------------------


def test_inverse_targets_round_trip():
    g = torch.Generator().manual_seed(8)
    pt = torch.rand(20, generator=g) * 50 + 0.5
    q = torch.where(torch.rand(20, generator=g) > 0.5, 1.0, -1.0)
    eta = torch.randn(20, generator=g)
    values = particles(pt=pt.tolist(), eta=eta.tolist(), q=q.tolist())
    valid = torch.ones(20, dtype=torch.bool)
    for targets in (["pt", "eta", "q"], ["pt", "eta"]):
        head = RegressionHead(["a"], PARTICLE, dim=2, target_fields=targets, inverse_fields=["pt"])
        head.fit_scaling(values, valid)
        enc = head.encode_targets(values)
        qpt = (q / pt).double()
        close(enc[:, 0], ((qpt - qpt.mean()) / qpt.std(unbiased=False)).float())
        out = head.decode(enc)
        torch.testing.assert_close(out["pt"], pt, rtol=1e-4, atol=0)
        assert torch.equal(out["q"].sign(), q)


def test_fit_scaling_matches_numpy_and_is_saved():
    g = torch.Generator().manual_seed(9)
    values = torch.randn(30, 5, generator=g) * 3 + 1
    valid = torch.rand(30, generator=g) > 0.3
    head = RegressionHead(["a"], PARTICLE, dim=2)  # targets pt, eta, phi, q; phi periodic
    head.fit_scaling(values, valid)
    ref = values[valid][:, [0, 1, 2, 3]].double().numpy()
    mean = ref.mean(0)
    mean[2] = 0.0
    std = ref.std(0)
    std[2] = (ref[:, 2] ** 2).mean() ** 0.5
    close(head.target_mean, torch.tensor(mean, dtype=torch.float32))
    close(head.target_std, torch.tensor(std, dtype=torch.float32))

    fresh = RegressionHead(**json.loads(json.dumps(head.head_config())))
    fresh.load_state_dict(head.state_dict())
    close(fresh.encode_targets(values), head.encode_targets(values))
    with pytest.raises(UserError, match="no valid"):
        head.fit_scaling(values, torch.zeros(30, dtype=torch.bool))


def test_decode_wraps_phi():
    head = RegressionHead(["a"], PARTICLE, dim=2, target_fields=["phi", "eta"])
    out = head.decode(torch.tensor([[3.0 * math.pi / 2, 1.5]]))
    assert out["phi"].item() == pytest.approx(-math.pi / 2, abs=1e-6)
    assert out["eta"].item() == 1.5


# ---- construction --------------------------------------------------------------------------


def test_reference_size_and_config():
    head = RegressionHead([f"f{i}" for i in range(10)], PARTICLE, dim=32, hidden_dim=128, num_layers=3)
    # Hit nets 10*32+32 + 32*32+32 and 2*(32*32+32); MLP 288*128+128 + 2*128 + 128*128+128 + 2*128 + 128*4+4.
    expected = (352 + 1056) + 2 * 1056 + (36992 + 256 + 16512 + 256 + 516)
    assert sum(p.numel() for p in head.parameters()) == expected == 58052
    assert set(head.state_dict()) >= {"target_mean", "target_std"}
    config = head.head_config()
    assert RegressionHead(**json.loads(json.dumps(config))).head_config() == config


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(target_fields=["ptt"]), "did you mean 'pt'"),
        (dict(inverse_fields=["vz"]), "not a target field"),
        (dict(inverse_fields=["q"]), "cannot be 'q'"),
        (dict(impl="fast"), "impl"),
        (dict(assignment_threshold=0.0), "assignment_threshold"),
        (dict(num_layers=0), "num_layers"),
        (dict(hit_net="gated"), "hit_net must be one of"),
        (dict(targets="scaled"), "targets must be one of"),
        (dict(raw_scale={"pt": 200.0}), "needs targets: raw"),
        (dict(targets="raw", raw_scale={"ptt": 200.0}), "did you mean 'pt'"),
        (dict(targets="raw", raw_scale={"pt": 0.0}), "positive number"),
        (dict(raw_hit_fields=["aa"]), "did you mean 'a'"),
        (dict(raw_hit_fields=[]), "empty"),
        (dict(raw_hit_fields=["a", "a"]), "twice"),
    ],
)
def test_bad_config_is_a_user_error(kw, match):
    with pytest.raises(UserError, match=match):
        RegressionHead(["a"], PARTICLE, **kw)


def test_inverse_needs_charge():
    with pytest.raises(UserError, match="need 'q'"):
        RegressionHead(["a"], ["pt", "eta"], target_fields=["pt"], inverse_fields=["pt"])


# ---- hit_net="dense": hepattn's Dense block with SwiGLU ------------------------------------

@pytest.fixture(scope="module")
def hepattn_dense(hepattn_src):
    """hepattn's own `Dense` class (from ../shared/hepattn/src), or a skip that says why not."""
    from hepattn.models.dense import Dense

    return Dense


def linears(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.Linear)]


def reference_dense(Dense, F, D, like):
    """hepattn's Dense(F -> D) with SwiGLU and one hidden layer of 2F (so its first Linear is F -> 4F),
    holding the weights of cachefeat's hit net `like`."""
    ref = Dense(input_size=F, output_size=D, hidden_layers=[2 * F], activation="SwiGLU")
    assert [tuple(m.weight.shape) for m in linears(ref)] == [(4 * F, F), (D, 2 * F)]  # Linear(F,4F), Linear(2F,D)
    ref = ref.to(next(like.parameters()).dtype)
    with torch.no_grad():
        for mine, theirs in zip(linears(like), linears(ref), strict=True):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
    return ref


def test_swiglu_gates_the_first_half_with_the_second():
    out = SwiGLU()(torch.tensor([[2.0, 0.0, 1.0, -1.0]]))  # a = (2, 0), b = (1, -1): a * silu(b)
    close(out, torch.tensor([[2.0 / (1.0 + math.exp(-1.0)), 0.0]]))


def test_dense_hit_net_shapes_and_reference_size():
    # The reference workflow's head: dim 32, 18 raw hit fields, dense hit nets, hidden 9 * 32 // 2 = 144.
    head = RegressionHead([f"f{i}" for i in range(18)], PARTICLE, dim=32, hidden_dim=None, hit_net="dense")
    assert [tuple(m.weight.shape) for m in linears(head.raw_hit_net)] == [(72, 18), (32, 36)]
    assert [tuple(m.weight.shape) for m in linears(head.encoded_hit_net)] == [(128, 32), (32, 64)]
    assert head.hidden_dim == 144 and head.mlp[0].out_features == 144
    # Raw net 18*72+72 + 36*32+32, encoded 32*128+128 + 64*32+32;
    # MLP 288*144+144 + 2*144 + 144*144+144 + 2*144 + 144*4+4.
    expected = (1368 + 1184) + (4224 + 2080) + (41616 + 288 + 20880 + 288 + 580)
    assert sum(p.numel() for p in head.parameters()) == expected == 72508


@pytest.mark.hepattn
@pytest.mark.parametrize("net", ["raw_hit_net", "encoded_hit_net"])
def test_dense_hit_net_equals_hepattn_dense(hepattn_dense, net):
    """cachefeat's dense hit net vs hepattn's Dense with the same weights, in float64:
    outputs and the gradients w.r.t. the inputs and every weight agree to 1e-12."""
    D = 8
    head = make_head(0, D=D, hit_net="dense").double()
    mine = getattr(head, net)
    F = len(RAW) if net == "raw_hit_net" else D
    ref = reference_dense(hepattn_dense, F, D, mine)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, F, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, D, generator=g, dtype=torch.float64)
    out_mine, out_ref = mine(x), ref(x)
    torch.testing.assert_close(out_mine, out_ref, rtol=1e-12, atol=1e-12)
    grads_mine = torch.autograd.grad((out_mine * weight).sum(), [x, *mine.parameters()])
    grads_ref = torch.autograd.grad((out_ref * weight).sum(), [x, *ref.parameters()])
    assert len(grads_mine) == len(grads_ref) == 5
    for a, b in zip(grads_mine, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # The comparison can fail: gating the other half (swapping the first Linear's output halves) differs.
    swapped = copy.deepcopy(ref)
    with torch.no_grad():
        first = linears(swapped)[0]
        first.weight.copy_(first.weight.roll(2 * F, 0))
        first.bias.copy_(first.bias.roll(2 * F, 0))
    assert (swapped(x) - out_mine).abs().max() > 1e-3


@pytest.mark.hepattn
@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_head_with_dense_hit_nets_equals_head_with_hepattn_dense(hepattn_dense, impl):
    """The whole head (float32, both paths) with its hit nets replaced by hepattn's Dense blocks
    holding the same weights: same outputs and gradients (head_testing's RTOL / ATOL)."""
    D = 8
    head = make_head(2, D=D, hit_net="dense", impl=impl)
    theirs = copy.deepcopy(head)
    theirs.raw_hit_net = reference_dense(hepattn_dense, len(RAW), D, head.raw_hit_net)
    theirs.encoded_hit_net = reference_dense(hepattn_dense, D, D, head.encoded_hit_net)
    outputs, batch, target_index = make_padded(2, D=D)
    leaves = (outputs["hit_embed"], outputs["query_embed"])
    out_mine, out_theirs = (h(from_model_outputs(outputs, batch, target_index, 0.05, RAW, PARTICLE))
                            for h in (head, theirs))
    close(out_mine, out_theirs)
    assert len(list(head.parameters())) == len(list(theirs.parameters()))
    for a, b in zip(grads(out_mine, head, leaves), grads(out_theirs, theirs, leaves), strict=True):
        close_grad(a, b)


# ---- raw_hit_fields ------------------------------------------------------------------------


@pytest.mark.parametrize("hit_net", HIT_NETS)
@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_raw_hit_fields_subset_equals_head_on_a_batch_with_only_those_fields(hit_net, impl):
    """A head reading raw_hit_fields [z, x] of a batch holding x, y, z, r gives the outputs and
    gradients of a head built on a batch made with only z, x, carrying the same weights."""
    subset = ["z", "x"]
    head = make_head(3, hit_net=hit_net, impl=impl, raw_hit_fields=subset)
    assert head.raw_fields == RAW and linears(head.raw_hit_net)[0].in_features == 2
    torch.manual_seed(3)
    other = RegressionHead(subset, PARTICLE, dim=8, hidden_dim=16, hit_net=hit_net, impl=impl)
    other.load_state_dict(head.state_dict())
    outputs, batch, target_index = make_padded(3)
    hb = from_model_outputs(outputs, batch, target_index, 0.05, RAW, PARTICLE)
    hb_subset = from_model_outputs(outputs, batch, target_index, 0.05, subset, PARTICLE)
    assert hb.hit_raw.shape[1] == 4 and hb_subset.hit_raw.shape[1] == 2
    leaves = (outputs["hit_embed"], outputs["query_embed"])
    out, out_subset = head(hb), other(hb_subset)
    assert torch.equal(out, out_subset)
    for a, b in zip(grads(out, head, leaves), grads(out_subset, other, leaves), strict=True):
        assert torch.equal(a, b)
    # ... and it is not the head on all four fields with the same first columns.
    full = make_head(3, hit_net=hit_net, impl=impl)
    assert not torch.allclose(full(hb), out)


def test_raw_hit_fields_from_a_config():
    from cachefeat.head.checkpoint import build_head

    def config(**init_args):
        return {"head": {"class_path": "cachefeat.head.regression.RegressionHead",
                         "init_args": {"dim": 8, **init_args}}}

    head = build_head(config(raw_hit_fields=["x", "y", "z"]), RAW, PARTICLE)
    assert head.raw_fields == RAW and head.raw_hit_fields == ["x", "y", "z"]
    assert linears(head.raw_hit_net)[0].in_features == 3
    with pytest.raises(UserError, match=r"raw hit field 'zz' is not among .*did you mean 'z'"):
        build_head(config(raw_hit_fields=["x", "zz"]), RAW, PARTICLE)


# ---- targets="raw" -------------------------------------------------------------------------


def raw_head(**kw):
    return RegressionHead(["a"], PARTICLE, dim=2, targets="raw", raw_scale={"pt": 200.0}, **kw)


def test_raw_targets_loss_hand_computed():
    head = raw_head()  # targets pt, eta, phi, q; the default periodic_fields is not used
    assert head.periodic_fields == []
    values = particles(pt=[100.0, 50.0], eta=[0.3, -1.2], phi=[-3.0, 4.0], q=[-1.0, 1.0])
    valid = [True, True]
    head.fit_scaling(values, torch.tensor(valid))  # fits nothing
    assert torch.equal(head.target_mean, torch.zeros(4))
    assert torch.equal(head.target_std, torch.tensor([200.0, 1.0, 1.0, 1.0]))
    # The stored values, pt / 200, phi as stored (4.0 is not wrapped).
    assert torch.equal(head.encode_targets(values), torch.tensor([[0.5, 0.3, -3.0, -1.0], [0.25, -1.2, 4.0, 1.0]]))
    pred = torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.25, 0.0, -2.0, 1.0]])
    # Query 0: d = (-0.5, -0.3, 6.0, 1.0) -> (0.125, 0.045, 5.5, 0.5); query 1: d = (0, 1.2, -6.0, 0) ->
    # (0, 0.7, 5.5, 0). Wrapping phi would have made the 6.0 residuals 6 - 2 pi (loss 0.04 each).
    expected = ((0.125 + 0.045 + 5.5 + 0.5) / 4 + (0.0 + 0.7 + 5.5 + 0.0) / 4) / 2
    assert head.loss(pred, loss_batch(values, valid)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("inverse_fields", [[], ["pt"]])
def test_raw_targets_decode_encode_round_trip(inverse_fields):
    g = torch.Generator().manual_seed(10)
    pt = torch.rand(50, generator=g) * 300 + 0.5
    eta = torch.randn(50, generator=g) * 2
    phi = (torch.rand(50, generator=g) - 0.5) * 8  # beyond [-pi, pi): raw phi is not wrapped
    q = torch.where(torch.rand(50, generator=g) > 0.5, 1.0, -1.0)
    values = particles(pt=pt.tolist(), eta=eta.tolist(), phi=phi.tolist(), q=q.tolist())
    head = raw_head(inverse_fields=inverse_fields)
    head.fit_scaling(values, torch.ones(50, dtype=torch.bool))
    enc = head.encode_targets(values)
    expected_pt = q / pt / 200 if inverse_fields else pt / 200
    close(enc[:, 0], expected_pt)
    out = head.decode(enc)
    torch.testing.assert_close(out["pt"], pt, rtol=1e-6, atol=0)  # x / 200 * 200: one float32 rounding each
    assert torch.equal(out["eta"], eta) and torch.equal(out["phi"], phi) and torch.equal(out["q"], q)


# ---- the options are saved with the head ---------------------------------------------------


def test_options_survive_a_head_checkpoint(tmp_path):
    from cachefeat.head.checkpoint import load_head, save_head

    head = make_head(7, hit_net="dense", raw_hit_fields=["z", "x"], targets="raw", raw_scale={"pt": 200.0},
                     hidden_dim=None).eval()
    assert head.hidden_dim == 36  # 9 * 8 // 2
    outputs, batch, target_index = make_padded(7)
    hb = from_model_outputs(outputs, batch, target_index, 0.05, RAW, PARTICLE)
    head.fit_scaling(hb.targets, hb.target_valid)
    save_head(tmp_path / "head.ckpt", head, {}, None, {})
    loaded, _ = load_head(tmp_path / "head.ckpt")
    config = loaded.head_config()
    assert config == head.head_config()
    assert {k: config[k] for k in ("hit_net", "raw_hit_fields", "targets", "raw_scale", "hidden_dim")} == {
        "hit_net": "dense", "raw_hit_fields": ["z", "x"], "targets": "raw", "raw_scale": {"pt": 200.0},
        "hidden_dim": 36}
    assert torch.equal(loaded.target_std, torch.tensor([200.0, 1.0, 1.0, 1.0]))
    with torch.no_grad():
        assert torch.equal(loaded(hb), head(hb))


def test_head_config_without_the_new_keys_gets_the_old_head():
    """A head_config saved before these options existed builds today's default head."""
    config = make_head(0).head_config()
    old = {k: v for k, v in config.items() if k not in ("hit_net", "raw_hit_fields", "targets", "raw_scale")}
    assert RegressionHead(**old).head_config() == config
