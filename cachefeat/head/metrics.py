"""Track-parameter resolutions: the numbers a physicist reads off a regression, and `wrap_angle`.

`regression_metrics` inputs are physical values (pt in GeV, angles in rad, q = ±1) as numpy
arrays [K] over the same K matched tracks.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

Angles = TypeVar("Angles")  # a torch.Tensor or a numpy array (any shape), returned as the same type


def wrap_angle(x: Angles) -> Angles:
    """Map angles (rad) into [-pi, pi), elementwise: a torch Tensor (any shape and float dtype,
    differentiable) or a numpy array, returned as the same type, shape and dtype."""
    return (x + math.pi) % (2 * math.pi) - math.pi


def regression_metrics(pred: dict[str, np.ndarray], true: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-target residual summaries.

    Returns, for each field present in both: `<f>_rmse` (phi residuals wrapped), `<f>_bias` and
    `<f>_res68` (half-width of the central 68% interval of the residuals: the core resolution,
    robust against the tails that dominate an RMS); for pt also `pt_rel_res` (standard deviation
    of (pt_pred - pt_true)/pt_true), `pt_rel_rmse` and `pt_rel_res68`; for q `q_accuracy`
    (fraction with the right sign). NaN where K = 0.
    """
    out: dict[str, float] = {}
    for field in pred:
        if field not in true:
            continue
        p = np.asarray(pred[field], dtype=np.float64)
        t = np.asarray(true[field], dtype=np.float64)
        if len(p) == 0:
            out[f"{field}_rmse"] = float("nan")
            continue
        resid = wrap_angle(p - t) if field == "phi" else p - t
        out[f"{field}_rmse"] = float(np.sqrt(np.mean(resid**2)))
        out[f"{field}_bias"] = float(np.mean(resid))
        out[f"{field}_res68"] = res68(resid)
        if field == "pt":
            rel = resid / t
            out["pt_rel_res"] = float(np.std(rel))
            out["pt_rel_rmse"] = float(np.sqrt(np.mean(rel**2)))
            out["pt_rel_res68"] = res68(rel)
        if field == "q":
            out["q_accuracy"] = float(np.mean(np.sign(p) == np.sign(t)))
    return out


def res68(resid: np.ndarray) -> float:
    """Half-width of the central 68.27% interval of `resid` (sigma for a Gaussian core)."""
    lo, hi = np.percentile(resid, [15.865, 84.135])
    return float((hi - lo) / 2)
