"""Track-parameter resolutions: the numbers a physicist reads off a regression.

All inputs are physical values (pt in GeV, angles in rad, q = ±1) as numpy arrays [K]
over the same K matched tracks.
"""

from __future__ import annotations

import numpy as np


def wrap_angle(x: np.ndarray) -> np.ndarray:
    """Map angles (rad) into [-pi, pi)."""
    return (x + np.pi) % (2 * np.pi) - np.pi


def regression_metrics(pred: dict[str, np.ndarray], true: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-target residual summaries.

    Returns, for each field present in both: `<f>_rmse` (phi residuals wrapped) and `<f>_bias`;
    for pt also `pt_rel_res` (standard deviation of (pt_pred - pt_true)/pt_true) and
    `pt_rel_rmse`; for q `q_accuracy` (fraction with the right sign). NaN where K = 0.
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
        if field == "pt":
            rel = resid / t
            out["pt_rel_res"] = float(np.std(rel))
            out["pt_rel_rmse"] = float(np.sqrt(np.mean(rel**2)))
        if field == "q":
            out["q_accuracy"] = float(np.mean(np.sign(p) == np.sign(t)))
    return out
