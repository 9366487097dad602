"""Tracking metrics on a hand-built case (counts worked out by hand in the comments)."""

import numpy as np
import pytest
import torch

from cachefeat.model.metrics import COUNT_KEYS, event_metrics, summarize


def _case():
    B, N, M, P = 3, 3, 6, 2
    hit_valid = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    particle_valid = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    owners = {(0, 0): [0, 1, 2], (0, 1): [3, 4], (1, 0): [0, 1, 2, 3], (2, 0): [0], (2, 1): [1, 2, 3]}
    particle_hit_valid = torch.zeros(B, P, M, dtype=torch.bool)
    for (b, p), hits in owners.items():
        particle_hit_valid[b, p, hits] = True
    valid_logit = torch.tensor([[5.0, 5.0, 5.0], [-5.0, 5.0, 0.0], [5.0, 5.0, -5.0]])
    predicted = {
        (0, 0): [0, 1, 2, 5],  # hit 5 is padding: ignored → p0 found with eff 1, purity 1
        (0, 1): [3],  # p1: eff 1/2, purity 1 → eff_050 only
        (0, 2): [4],  # unmatched → fake
        (1, 0): [0, 1, 2, 3],  # perfect, but the query is predicted invalid
        (1, 1): [0, 1, 2, 3, 4, 5],  # unmatched → fake, 6 hits
        (1, 2): [],  # sigmoid(0) = 0.5 ≥ 0.5: predicted valid; unmatched → fake, 0 hits
        (2, 0): [0, 1, 2],  # p0: eff 1, purity 1/3 < 0.5 → fake, not efficient
        (2, 1): [1, 2, 3],  # p1 perfect
        (2, 2): [3],  # predicted invalid: ignored
    }
    hit_logit = torch.full((B, N, M), -8.0)
    for (b, n), hits in predicted.items():
        hit_logit[b, n, hits] = 8.0
    target_index = torch.tensor([[0, 1, -1], [0, -1, -1], [0, 1, -1]])
    outputs = {"track_valid": valid_logit, "track_hit_logit": hit_logit}
    batch = {"hit_valid": hit_valid, "particle_valid": particle_valid, "particle_hit_valid": particle_hit_valid}
    return outputs, batch, target_index


EXPECTED = {
    "n_particles": [2, 1, 2],
    "n_matched_valid": [2, 0, 2],
    "n_eff_050": [2, 0, 1],
    "n_eff_075": [1, 0, 1],
    "n_eff_100": [1, 0, 1],
    "n_pred": [3, 2, 2],
    "n_fake": [1, 2, 1],
    "n_pred_hits": [5, 6, 6],
}


def test_event_metrics_hand_built():
    counts = event_metrics(*_case())
    assert list(counts) == list(COUNT_KEYS)
    for key, value in EXPECTED.items():
        assert counts[key].dtype == np.int64
        assert counts[key].tolist() == value, key


def test_summarize_hand_built():
    summary = summarize(event_metrics(*_case()))
    expected = {
        "eff_050": 3 / 5,
        "eff_075": 2 / 5,
        "eff_100": 2 / 5,
        "track_eff": 4 / 5,
        "fake_rate": 4 / 7,
        "hits_per_track": 17 / 7,
    }
    assert summary == pytest.approx(expected, abs=1e-12)


def test_summarize_empty_denominators():
    zeros = {key: np.zeros(2, dtype=np.int64) for key in COUNT_KEYS}
    assert set(summarize(zeros).values()) == {0.0}


def test_no_particle_slots():
    outputs = {"track_valid": torch.tensor([[3.0, -3.0]]), "track_hit_logit": torch.full((1, 2, 4), 5.0)}
    batch = {
        "hit_valid": torch.ones(1, 4, dtype=torch.bool),
        "particle_valid": torch.zeros(1, 0, dtype=torch.bool),
        "particle_hit_valid": torch.zeros(1, 0, 4, dtype=torch.bool),
    }
    counts = event_metrics(outputs, batch, torch.full((1, 2), -1))
    assert counts["n_particles"].tolist() == [0]
    assert (
        counts["n_pred"].tolist() == [1] and counts["n_fake"].tolist() == [1] and counts["n_pred_hits"].tolist() == [4]
    )
