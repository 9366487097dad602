"""Hungarian matching vs brute force, and the task costs vs per-element loops."""

import itertools
import math

import numpy as np
import pytest
import torch

from cachefeat.model.matcher import hungarian_match, match_batch
from cachefeat.model.tasks import ObjectHitMask, ObjectValid, _dense_mask_cost


def _brute_force(cost):
    """Best assignment of min(N, P) rows to distinct columns by trying every one."""
    N, P = cost.shape
    best, best_cols = math.inf, None
    if N <= P:
        for cols in itertools.permutations(range(P), N):
            total = sum(cost[n, c] for n, c in enumerate(cols))
            if total < best:
                best, best_cols = total, np.array(cols)
        return best, best_cols
    out = np.full(N, -1)
    for rows in itertools.permutations(range(N), P):
        total = sum(cost[r, p] for p, r in enumerate(rows))
        if total < best:
            best = total
            out = np.full(N, -1)
            out[list(rows)] = np.arange(P)
    return best, out


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (2, 5), (5, 2), (4, 4), (1, 4), (4, 1), (3, 6), (6, 3)])
def test_hungarian_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape) * 10 + shape[0])
    for _ in range(5):
        cost = rng.normal(size=shape)
        cols = hungarian_match(cost)
        best, ref = _brute_force(cost)
        assert cols.dtype == np.int64
        assert np.array_equal(cols, ref)
        assigned = cols >= 0
        assert np.isclose(cost[np.flatnonzero(assigned), cols[assigned]].sum(), best, rtol=0, atol=1e-12)
        assert assigned.sum() == min(shape)


def test_hungarian_empty():
    assert np.array_equal(hungarian_match(np.zeros((3, 0))), [-1, -1, -1])
    assert hungarian_match(np.zeros((0, 2))).shape == (0,)


def test_match_batch_returns_slots_of_valid_particles_only():
    cost = torch.tensor(
        [
            [[5.0, 0.0, 1.0], [4.0, 0.0, 3.0]],  # slot 1 invalid (cheapest, never used)
            [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        ]
    )  # no valid particle
    particle_valid = torch.tensor([[True, False, True], [False, False, False]])
    out = match_batch(cost, particle_valid)
    assert out.dtype == torch.int64
    assert out.tolist() == [[2, 0], [-1, -1]]


@pytest.mark.parametrize("mask_cost", [ObjectHitMask.cost, _dense_mask_cost], ids=["cpu", "dense"])
def test_costs_match_per_element_loops(mask_cost):
    """Both mask-cost paths (the CPU one and the dense products other devices run) against loops."""
    torch.manual_seed(0)
    B, N, P, M = 2, 3, 4, 7
    logit = torch.randn(B, N, M) * 3
    valid_logit = torch.randn(B, N)
    hit_valid = torch.rand(B, M) < 0.8
    part_hits = torch.rand(B, P, M) < 0.4
    bce_dice = mask_cost(logit, hit_valid, part_hits)
    valid_cost = ObjectValid.cost(valid_logit, P)
    for b, n, p in itertools.product(range(B), range(N), range(P)):
        xs, ts, n_valid = [], [], 0
        bce = 0.0
        for m in range(M):
            if not hit_valid[b, m]:
                continue
            prob = 1 / (1 + math.exp(-float(logit[b, n, m])))
            t = float(part_hits[b, p, m])
            bce -= t * math.log(prob) + (1 - t) * math.log(1 - prob)
            xs.append(prob)
            ts.append(t)
            n_valid += 1
        dice = 1 - (2 * sum(x * t for x, t in zip(xs, ts)) + 1) / (sum(xs) + sum(ts) + 1)
        assert math.isclose(float(bce_dice["mask_bce"][b, n, p]), bce / max(n_valid, 1), abs_tol=1e-9)
        assert math.isclose(float(bce_dice["mask_dice"][b, n, p]), dice, abs_tol=1e-9)
        assert math.isclose(
            float(valid_cost[b, n, p]), -math.log(1 / (1 + math.exp(-float(valid_logit[b, n])))), abs_tol=1e-9
        )


def test_cpu_costs_equal_dense_products_and_give_the_same_matching():
    """Realistic sizes: hits owned by one particle (some by none, a few shared), particles without
    hits, an event without valid hits, float32 logits as the model gives them."""
    gen = torch.Generator().manual_seed(3)
    B, N, P, M = 3, 40, 30, 500
    logit = torch.randn(B, N, M, generator=gen) * 6
    hit_valid = torch.rand(B, M, generator=gen) < 0.9
    hit_valid[2] = False
    owner = torch.randint(-1, P - 5, (B, M), generator=gen)  # the last 5 slots own no hit
    part_hits = torch.zeros(B, P, M, dtype=torch.bool)
    b, m = (owner >= 0).nonzero(as_tuple=True)
    part_hits[b, owner[b, m], m] = True
    part_hits |= torch.rand(B, P, M, generator=gen) < 0.002
    got = ObjectHitMask.cost(logit, hit_valid, part_hits)
    ref = _dense_mask_cost(logit, hit_valid, part_hits)
    for key in ref:
        assert got[key].dtype == torch.float64 and got[key].shape == (B, N, P)
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-13)
    particle_valid = part_hits.any(-1)
    matched = match_batch(got["mask_bce"] + got["mask_dice"], particle_valid)
    assert torch.equal(matched, match_batch(ref["mask_bce"] + ref["mask_dice"], particle_valid))


@pytest.mark.parametrize("shape", [(2, 3, 0, 5), (2, 3, 4, 0), (2, 0, 4, 5), (0, 3, 4, 5), (1, 1, 1, 1)])
def test_cpu_costs_on_empty_dimensions(shape):
    """No particle slots, no hits, no queries, no events: the shapes and values of the dense formula."""
    B, N, P, M = shape
    gen = torch.Generator().manual_seed(sum(shape))
    logit = torch.randn(B, N, M, generator=gen)
    hit_valid = torch.rand(B, M, generator=gen) < 0.7
    part_hits = torch.rand(B, P, M, generator=gen) < 0.5
    got, ref = ObjectHitMask.cost(logit, hit_valid, part_hits), _dense_mask_cost(logit, hit_valid, part_hits)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-13)
