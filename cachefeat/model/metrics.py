"""Tracking metrics of the stage-1 tasks, hepattn style: per-event integer counts that can be
summed over any set of events, and the ratios computed from the sums.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

COUNT_KEYS = (
    "n_particles",
    "n_matched_valid",
    "n_eff_050",
    "n_eff_075",
    "n_eff_100",
    "n_pred",
    "n_fake",
    "n_pred_hits",
)
"""Keys of `event_metrics`, in a fixed order."""

_EFF_LEVELS = {"n_eff_050": 0.5, "n_eff_075": 0.75, "n_eff_100": 1.0}


def _at_least(num: Tensor, den: Tensor, frac: float) -> Tensor:
    """num / den ≥ frac, False where den = 0 (integer tensors)."""
    return (den > 0) & (num.double() >= frac * den.double())


@torch.no_grad()
def event_metrics(
    outputs: dict, batch: dict, target_index: Tensor, valid_threshold: float = 0.5, hit_threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Per-event tracking counts, int64 [B] each (keys `COUNT_KEYS`).

    A query is predicted valid when sigmoid(track_valid) ≥ valid_threshold; its predicted hits
    are the valid hits with sigmoid(track_hit_logit) ≥ hit_threshold. For a query matched to a
    valid particle (target_index ≥ 0): efficiency = |pred ∩ true| / |true|, purity =
    |pred ∩ true| / |pred| (a ratio with a zero denominator fails every threshold).

    n_particles: valid particles. n_matched_valid: particles whose matched query is predicted valid.
    n_eff_050/075/100: those whose efficiency and purity are also ≥ 0.5/0.75/1.0.
    n_pred: queries predicted valid. n_fake: predicted-valid queries unmatched or with purity < 0.5.
    n_pred_hits: Σ |pred| over predicted-valid queries.

    Args:
        outputs: `track_valid` [B, N], `track_hit_logit` [B, N, M].
        batch: `hit_valid` [B, M], `particle_valid` [B, P], `particle_hit_valid` [B, P, M].
        target_index: int64 [B, N], matched particle slot per query, -1 if none.
    """
    hit_valid = batch["hit_valid"]
    particle_valid, particle_hits = batch["particle_valid"], batch["particle_hit_valid"]
    if particle_valid.shape[1] == 0:  # no particle slots at all: one empty slot keeps the gathers valid
        particle_valid = particle_valid.new_zeros(particle_valid.shape[0], 1)
        particle_hits = particle_hits.new_zeros(particle_hits.shape[0], 1, particle_hits.shape[2])
    pred_valid = torch.sigmoid(outputs["track_valid"].float()) >= valid_threshold
    pred_hits = (torch.sigmoid(outputs["track_hit_logit"].float()) >= hit_threshold) & hit_valid[:, None, :]
    safe = target_index.clamp(min=0)
    matched = (target_index >= 0) & torch.gather(particle_valid, 1, safe)
    true_hits = torch.gather(particle_hits, 1, safe[..., None].expand_as(pred_hits)) & hit_valid[:, None, :]
    n_true = true_hits.sum(-1)
    n_pred_hits = pred_hits.sum(-1)
    n_both = (pred_hits & true_hits).sum(-1)
    found = matched & pred_valid
    counts = {
        "n_particles": particle_valid.sum(-1),
        "n_matched_valid": found.sum(-1),
    }
    for key, frac in _EFF_LEVELS.items():
        good = found & _at_least(n_both, n_true, frac) & _at_least(n_both, n_pred_hits, frac)
        counts[key] = good.sum(-1)
    counts["n_pred"] = pred_valid.sum(-1)
    counts["n_fake"] = (pred_valid & ~(matched & _at_least(n_both, n_pred_hits, 0.5))).sum(-1)
    counts["n_pred_hits"] = (n_pred_hits * pred_valid).sum(-1)
    return {key: counts[key].cpu().numpy().astype(np.int64) for key in COUNT_KEYS}


def summarize(counts: dict[str, np.ndarray]) -> dict[str, float]:
    """Ratios of summed counts: eff_050, eff_075, eff_100 and track_eff over n_particles,
    fake_rate = n_fake / n_pred, hits_per_track = n_pred_hits / n_pred; 0.0 where a denominator is 0.
    """
    total = {key: int(np.sum(counts[key])) for key in COUNT_KEYS}

    def ratio(num: str, den: str) -> float:
        return total[num] / total[den] if total[den] else 0.0

    return {
        "eff_050": ratio("n_eff_050", "n_particles"),
        "eff_075": ratio("n_eff_075", "n_particles"),
        "eff_100": ratio("n_eff_100", "n_particles"),
        "track_eff": ratio("n_matched_valid", "n_particles"),
        "fake_rate": ratio("n_fake", "n_pred"),
        "hits_per_track": ratio("n_pred_hits", "n_pred"),
    }
