"""Hungarian matching of queries to truth particles (scipy's `linear_sum_assignment`)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def hungarian_match(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost assignment of rows (queries) to columns (particles).

    Args: cost float [N, P], finite.
    Returns: int64 [N], the column assigned to each row, -1 for rows left unassigned
        (min(N, P) rows are assigned). Deterministic.
    """
    cost = np.asarray(cost, dtype=np.float64)
    out = np.full(cost.shape[0], -1, dtype=np.int64)
    if cost.size:
        rows, cols = linear_sum_assignment(cost)
        out[rows] = cols
    return out


def match_batch(cost: Tensor, particle_valid: Tensor) -> Tensor:
    """Per-event Hungarian matching over the valid particles.

    Args:
        cost: float [B, N, P], query n vs particle slot p.
        particle_valid: bool [B, P].
    Returns: int64 [B, N] on `cost`'s device: matched particle slot per query, -1 if none.
    """
    cost_np = cost.detach().double().cpu().numpy()
    valid_np = particle_valid.detach().cpu().numpy()
    out = np.full(cost_np.shape[:2], -1, dtype=np.int64)
    for b in range(cost_np.shape[0]):
        slots = np.flatnonzero(valid_np[b])
        cols = hungarian_match(cost_np[b][:, slots])
        assigned = cols >= 0
        out[b, assigned] = slots[cols[assigned]]
    return torch.from_numpy(out).to(cost.device)
