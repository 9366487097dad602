"""`StackedHeads` (issue 14): K heads of one shape predicted as one batched forward equal each head's
own `predict_from_pairs`, outputs and parameter gradients, with dropout on (the same masks, the
streams advanced alike), for both frames and both hit nets; grouping by shape; refused stacks.

Measured (float32, 1 torch thread, the muon test cache's first 48 events, K = 3, 2 steps, all four
cases): the predictions equal bit for bit on this CPU, the gradients differ by at most 3.3e-7
relative to each tensor's largest entry (the batched matmuls' backward and LayerNorm's separate
affine sum in another order). The tolerance, 1e-5 relative to the largest entry for both, leaves
room for other kernels (a GPU's bmm against mm), where the predictions need not be bit-equal.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cachefeat.head.checkpoint import build_head
from cachefeat.head.regression import StreamDropout, pair_weights
from cachefeat.head.stacked import StackedHeads, stack_groups, stack_key
from cachefeat.training.loop import step_input

# Relative to the largest entry of the compared tensor (predictions, one parameter's gradient).
PRED_TOL, GRAD_TOL = 1e-5, 1e-5
# Variants of one shape: dropout (one off), seeds differ.
VARIANTS = [(1, 0.2), (2, 0.0), (3, 0.3)]


def _close(actual, expected, tol, what):
    scale = max(expected.abs().max().item(), 1e-12)
    err = (actual - expected).abs().max().item() / scale
    assert err <= tol, f"{what}: {err:.2e} relative to the largest entry (tolerance {tol:.0e})"


def _heads(config, reader, batch, **head_args):
    heads = []
    for seed, dropout in VARIANTS:
        conf = copy.deepcopy(config)
        conf["head"]["init_args"].update(head_args, dropout=dropout)
        head = build_head(conf, list(reader.raw_fields), list(reader.particle_fields), seed=seed)
        head.fit_scaling(batch.targets, batch.target_valid, batch)
        heads.append(head.train())
    return heads


@pytest.fixture(scope="module")
def batch(cache32):
    return step_input(cache32.read_events(0, 48), "cpu")


@pytest.mark.parametrize("hit_net", ["mlp", "dense"])
@pytest.mark.parametrize("frame", ["none", "track"])
def test_stacked_equals_each_head_alone(muon_config, cache32, batch, frame, hit_net):
    alone = _heads(muon_config, cache32, batch, frame=frame, hit_net=hit_net, hidden_dim=24)
    stacked_heads = copy.deepcopy(alone)
    stacked = StackedHeads(stacked_heads)
    for step in range(2):  # the second step draws the streams' second masks
        pairs = pair_weights(batch, alone[0].assignment_threshold)
        expected = [h.predict_from_pairs(batch, pairs) for h in alone]
        sum(h.loss(p, batch) for h, p in zip(alone, expected)).backward()
        pred = stacked.predict_from_pairs(batch, pair_weights(batch, alone[0].assignment_threshold))
        assert pred.shape == (3, *expected[0].shape) and pred.dtype == torch.float32
        sum(h.loss(pred[k], batch) for k, h in enumerate(stacked_heads)).backward()
        for k in range(3):
            _close(pred[k], expected[k], PRED_TOL, f"step {step} head {k} predictions")
        for k, (a, b) in enumerate(zip(stacked_heads, alone)):
            for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
                assert pa.grad is not None, name
                _close(pa.grad, pb.grad, GRAD_TOL, f"step {step} head {k} grad {name}")
            for ma, mb in zip(a.modules(), b.modules()):
                if isinstance(ma, StreamDropout):
                    assert torch.equal(ma.stream, mb.stream) and ma._host == mb._host
    # The dropout layers really drew (p > 0) or did not (p = 0), and the heads differ from each other.
    draws = [h.mlp[3].stream[1].item() for h in stacked_heads]
    assert draws == [2, 0, 2]
    assert (pred[0] - pred[2]).abs().max() > 1e-3
    # Eval mode: no masks, the streams stay.
    for h in alone + stacked_heads:
        h.eval()
    pairs = pair_weights(batch, alone[0].assignment_threshold)
    pred = stacked.predict_from_pairs(batch, pairs)
    for k, h in enumerate(alone):
        _close(pred[k], h.predict_from_pairs(batch, pairs), PRED_TOL, f"eval head {k}")
    assert [h.mlp[3].stream[1].item() for h in stacked_heads] == draws


def test_groups_by_shape_and_refuses_mixed_stacks(muon_config, cache32, batch):
    base = _heads(muon_config, cache32, batch, frame="none")
    wide = _heads(muon_config, cache32, batch, frame="none", hidden_dim=40)[:1]
    track = _heads(muon_config, cache32, batch, frame="track")[:1]
    heads = [base[0], wide[0], base[1], track[0], base[2]]
    assert stack_groups(heads) == [[0, 2, 4], [1], [3]]
    assert stack_key(base[0]) == stack_key(base[2]) != stack_key(wide[0])
    with pytest.raises(ValueError, match="differ in more than dropout"):
        StackedHeads([base[0], wide[0]])
