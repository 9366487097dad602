"""The classical baseline: a least-squares helix fit through the hits assigned to each track.

Vectorised over tracks: every quantity is built from per-track segment sums (`np.bincount`),
so there is no Python loop per track. Per track k with n_k >= 3 hits (x, y, z in metres):

- transverse plane: Taubin's algebraic circle fit (Chernov's moment form, Newton on the
  characteristic cubic). It is written for the signed curvature kappa = 1/R [1/m], which stays
  finite (0) for collinear hits, so a straight track gives pT = inf instead of a division error;
- pT = C_LIGHT * |Bz| * R  [GeV, T, m];
- charge: the rotation sense of the hits ordered by radius. The track's direction rotates by
  -q * sign(Bz) (a positive track turns clockwise seen from +z when Bz > 0);
- phi: direction of the circle's tangent at its point of closest approach to the beam axis,
  pointing along the track (outwards);
- eta: straight-line fit z = z0 + cot(theta) * s_T over the transverse arc length from the
  beam axis s_T = 2R asin(r / 2R); eta = asinh(cot(theta)).

A track with fewer than 3 hits, or whose fit is not finite (e.g. exactly collinear hits:
kappa = 0, pT = inf), has status False and NaN for every parameter it could not determine.
"""

from __future__ import annotations

import functools

import numpy as np

from cachefeat.data.simulate import C_LIGHT

MIN_HITS = 3
_NEWTON_STEPS = 50


def _segment_mean(values: np.ndarray, track: np.ndarray, counts: np.ndarray) -> np.ndarray:
    sums = np.bincount(track, weights=values, minlength=counts.shape[0])
    return sums / np.maximum(counts, 1)


def _taubin(x, y, track, counts):
    """Per-track (mx, my, kappa, ux, uy): centroid (m), curvature 1/R (1/m, >= 0) and
    (ux, uy) = kappa * (centre - centroid), finite (|u| <= 1) even for collinear hits."""
    mean = functools.partial(_segment_mean, track=track, counts=counts)
    mx, my = mean(x), mean(y)
    X, Y = x - mx[track], y - my[track]
    Z = X * X + Y * Y
    Mxx, Myy, Mxy = mean(X * X), mean(Y * Y), mean(X * Y)
    Mxz, Myz, Mzz = mean(X * Z), mean(Y * Z), mean(Z * Z)
    Mz = Mxx + Myy
    cov_xy = Mxx * Myy - Mxy * Mxy
    var_z = Mzz - Mz * Mz
    a3, a2 = 4.0 * Mz, -3.0 * Mz * Mz - Mzz
    a1 = var_z * Mz + 4.0 * cov_xy * Mz - Mxz * Mxz - Myz * Myz
    a0 = Mxz * (Mxz * Myy - Myz * Mxy) + Myz * (Myz * Mxx - Mxz * Mxy) - var_z * cov_xy

    # Newton from 0 on the cubic; each track stops when a step no longer reduces |poly|.
    root, poly = np.zeros_like(a0), a0.copy()
    active = np.ones(a0.shape, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(_NEWTON_STEPS):
            slope = a1 + root * (2.0 * a2 + 3.0 * a3 * root)
            new = root - poly / slope
            new_poly = a0 + new * (a1 + new * (a2 + new * a3))
            accept = active & np.isfinite(new) & (np.abs(new_poly) < np.abs(poly))
            active = accept & (new != root)
            root = np.where(accept, new, root)
            poly = np.where(accept, new_poly, poly)
            if not active.any():
                break
        det = root * root - root * Mz + cov_xy
        # Centre offset from the centroid is (nx, ny) / (2 det); R^2 = offset^2 + Mz.
        nx = Mxz * (Myy - root) - Myz * Mxy
        ny = Myz * (Mxx - root) - Mxz * Mxy
        scale = np.sqrt(nx * nx + ny * ny + 4.0 * det * det * Mz)
        # scale = 0 only for symmetric collinear or coincident hits: a straight line, kappa = 0.
        kappa = np.where(scale > 0, 2.0 * np.abs(det) / scale, 0.0)
        sign = np.where(det < 0, -1.0, 1.0)
        ux, uy = np.where(scale > 0, sign * nx / scale, 0.0), np.where(scale > 0, sign * ny / scale, 0.0)
    return mx, my, kappa, ux, uy


def _inner_outer(r: np.ndarray, track: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row of the innermost and outermost hit of each track (K = len(r) for tracks without hits)."""
    order = np.lexsort((r, track))
    ends = np.cumsum(counts)
    has = counts > 0
    inner = np.full(counts.shape[0], r.shape[0], dtype=np.int64)
    outer = inner.copy()
    inner[has] = order[(ends - counts)[has]]
    outer[has] = order[ends[has] - 1]
    return inner, outer


def fit_helices(x, y, z, track, num_tracks: int, bz: float) -> dict[str, np.ndarray]:
    """Fit one helix per track through its hits.

    Args:
        x, y, z: float [K] hit coordinates (m); any order, tracks need not be contiguous.
        track: int [K], the track (0..num_tracks-1) each hit belongs to.
        num_tracks: number of tracks.
        bz: solenoid field along +z (T), non-zero.

    Returns:
        {name: array [num_tracks]}: `pt` (GeV), `eta`, `phi` (rad, in [-pi, pi)), `q` (±1),
        `kappa` (1/m, unsigned), `n_hits` (int64), `status` (bool: >= 3 hits and finite pt,
        eta, phi). Parameters are NaN where status is False.
    """
    if bz == 0:
        raise ValueError("fit_helices needs a non-zero field bz")
    x, y, z = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (x, y, z))
    track = np.asarray(track, dtype=np.int64).reshape(-1)
    counts = np.bincount(track, minlength=num_tracks).astype(np.int64)
    mx, my, kappa, ux, uy = _taubin(x, y, track, counts)

    r = np.hypot(x, y)
    inner, outer = _inner_outer(r, track, counts)
    xp, yp = np.append(x, 0.0), np.append(y, 0.0)  # row K: a dummy for tracks without hits
    tx, ty = xp[outer] - xp[inner], yp[outer] - yp[inner]
    # Centre to the right of the motion (cross < 0) means a clockwise turn: q * sign(bz) > 0.
    q = np.where(tx * uy - ty * ux < 0, 1.0, -1.0) * np.sign(bz)

    with np.errstate(divide="ignore", invalid="ignore"):
        pt = C_LIGHT * abs(bz) / kappa
        # Unit vector origin -> centre, from kappa * centre = kappa * m + u (finite as kappa -> 0).
        cx, cy = kappa * mx + ux, kappa * my + uy
        cn = np.hypot(cx, cy)
        cx, cy = cx / cn, cy / cn
        # Tangent at the point of closest approach: perpendicular to the centre direction,
        # turned so that the motion rotates by -q*sign(bz).
        turn = q * np.sign(bz)
        phi = np.arctan2(turn * cx, -turn * cy)

        half = np.clip(kappa[track] * r / 2.0, 0.0, 1.0)
        s_t = np.where(half > 1e-8, np.arcsin(half) / np.maximum(half, 1e-8), 1.0) * r
        mean = functools.partial(_segment_mean, track=track, counts=counts)
        ms, mz = mean(s_t), mean(z)
        ds = s_t - ms[track]
        cot = np.bincount(track, ds * (z - mz[track]), num_tracks) / np.bincount(track, ds * ds, num_tracks)
        eta = np.arcsinh(cot)

    status = (counts >= MIN_HITS) & np.isfinite(pt) & np.isfinite(phi) & np.isfinite(eta)
    nan = np.full(num_tracks, np.nan)
    return {
        "pt": np.where(status, pt, nan),
        "eta": np.where(status, eta, nan),
        "phi": np.where(status, (phi + np.pi) % (2 * np.pi) - np.pi, nan),
        "q": np.where(status, q, nan),
        "kappa": np.where(counts >= MIN_HITS, kappa, nan),
        "n_hits": counts,
        "status": status,
    }
