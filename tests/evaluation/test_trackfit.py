"""The helix fit against helices built by hand from their parameters (not by the fit's formulas)."""

import warnings

import numpy as np
import pytest

from cachefeat.evaluation.trackfit import fit_helices

C_LIGHT = 0.299792458  # GeV / (T m)


def helix_points(pt, eta, phi0, q, vz, bz, arc):
    """Points at transverse arc lengths `arc` (m) of a helix leaving the beam axis at z = vz.

    The direction phi(s) = phi0 - q * sign(bz) * s / R: a positive track turns clockwise
    seen from +z when bz > 0.
    """
    radius = pt / (C_LIGHT * abs(bz))
    omega = -q * np.sign(bz) / radius
    x = (np.sin(phi0 + omega * arc) - np.sin(phi0)) / omega
    y = -(np.cos(phi0 + omega * arc) - np.cos(phi0)) / omega
    z = vz + arc * np.sinh(eta)
    return x, y, z


def random_tracks(rng, n, bz, arc_range, hits, sigma=0.0):
    truth, xs, ys, zs, track = [], [], [], [], []
    for k in range(n):
        pt, eta = rng.uniform(2, 100), rng.uniform(-2, 2)
        phi, q, vz = rng.uniform(-np.pi, np.pi), rng.choice([-1.0, 1.0]), rng.normal(0, 0.05)
        arc = np.sort(rng.uniform(*arc_range, hits))
        x, y, z = helix_points(pt, eta, phi, q, vz, bz, arc)
        r = np.hypot(x, y)
        # Smear along r-phi and z (a barrel detector's measurement directions).
        d_rphi, d_z = rng.normal(0, sigma, hits), rng.normal(0, sigma, hits)
        x, y, z = x - y / r * d_rphi, y + x / r * d_rphi, z + d_z
        truth.append((pt, eta, phi, q))
        xs.append(x), ys.append(y), zs.append(z), track.append(np.full(hits, k))
    cat = np.concatenate
    return np.array(truth), cat(xs), cat(ys), cat(zs), cat(track)


def wrapped(d):
    return (d + np.pi) % (2 * np.pi) - np.pi


def test_hand_case_positive_track_turns_clockwise():
    # q = +1 leaves the origin along +x in Bz = 2 T and turns clockwise: centre at (0, -R).
    radius = 10.0 / (C_LIGHT * 2.0)
    a = np.array([0.02, 0.05, 0.08, 0.11])
    x, y = radius * np.sin(a), radius * np.cos(a) - radius
    z = 0.5 * radius * a  # cot(theta) = 0.5
    fit = fit_helices(x, y, z, np.zeros(4, dtype=int), 1, bz=2.0)
    assert fit["status"][0] and fit["q"][0] == 1.0
    assert fit["pt"][0] == pytest.approx(10.0, rel=1e-9)
    assert fit["phi"][0] == pytest.approx(0.0, abs=1e-9)
    assert fit["eta"][0] == pytest.approx(np.arcsinh(0.5), abs=1e-9)
    # The mirror image (y -> -y) turns counter-clockwise: q = -1; reversing the field flips it back.
    assert fit_helices(x, -y, z, np.zeros(4, dtype=int), 1, bz=2.0)["q"][0] == -1.0
    assert fit_helices(x, y, z, np.zeros(4, dtype=int), 1, bz=-2.0)["q"][0] == -1.0


@pytest.mark.parametrize("bz, arc_range, hits",
                         [(0.6, (4.5, 10.5), 28), (2.0, (0.03, 1.0), 10), (-2.0, (0.03, 1.0), 5)])
def test_exact_helices_recovered(bz, arc_range, hits):
    rng = np.random.default_rng(1)
    truth, x, y, z, track = random_tracks(rng, 300, bz, arc_range, hits)
    perm = rng.permutation(len(x))  # hits of a track need not be contiguous or ordered
    fit = fit_helices(x[perm], y[perm], z[perm], track[perm], 300, bz)
    assert fit["status"].all()
    np.testing.assert_array_equal(fit["n_hits"], hits)
    np.testing.assert_allclose(fit["pt"], truth[:, 0], rtol=1e-4)
    np.testing.assert_allclose(fit["eta"], truth[:, 1], atol=1e-4)
    np.testing.assert_allclose(wrapped(fit["phi"] - truth[:, 2]), 0.0, atol=1e-4)
    np.testing.assert_array_equal(fit["q"], truth[:, 3])


def test_smeared_fit_is_unbiased():
    rng = np.random.default_rng(2)
    n = 3000
    truth, x, y, z, track = random_tracks(rng, n, 2.0, (0.03, 1.0), 12, sigma=2e-4)
    fit = fit_helices(x, y, z, track, n, 2.0)
    assert fit["status"].all()
    assert np.mean(fit["q"] == truth[:, 3]) > 0.99
    residuals = {
        "q/pt": fit["q"] / fit["pt"] - truth[:, 3] / truth[:, 0],
        "eta": fit["eta"] - truth[:, 1],
        "phi": wrapped(fit["phi"] - truth[:, 2]),
    }
    for name, d in residuals.items():
        assert np.std(d) > 0, name  # the smearing is seen
        assert abs(np.mean(d)) < 3 * np.std(d) / np.sqrt(n), name


def test_degenerate_tracks_do_not_raise():
    x = np.array([0.1, 0.2, 0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.1, 0.2, 0.5])
    y = np.array([0.0, 0.0, 0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.0, 0.0, 1e-12, 0.1, 0.2, 0.5])
    z = np.array([0.0, 0.1, 0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.1, 0.2, 0.5])
    # track 0: 2 hits; 1 and 5: collinear (evenly and unevenly spaced); 2: three identical hits;
    # 3: no hits; 4: almost collinear
    track = np.array([0, 0, 1, 1, 1, 2, 2, 2, 4, 4, 4, 5, 5, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_helices(x, y, z, track, 6, bz=2.0)
    np.testing.assert_array_equal(fit["n_hits"], [2, 3, 3, 0, 3, 3])
    assert not fit["status"][[0, 2, 3]].any()
    for name in ("pt", "eta", "phi", "q"):
        assert np.isnan(fit[name][[0, 2, 3]]).all()
    # Collinear: curvature 0, i.e. an infinite pT, so no status; almost collinear: a huge pT.
    for k in (1, 5):
        assert fit["kappa"][k] == pytest.approx(0.0, abs=1e-12)
        assert not fit["status"][k] or fit["pt"][k] > 1e6
    assert fit["status"][4] and fit["pt"][4] > 1e6
    assert fit["phi"][4] == pytest.approx(0.0, abs=1e-6)


def test_no_hits_at_all():
    fit = fit_helices(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, dtype=int), 3, bz=2.0)
    np.testing.assert_array_equal(fit["n_hits"], [0, 0, 0])
    assert not fit["status"].any() and np.isnan(fit["pt"]).all()
    assert fit_helices([], [], [], [], 0, bz=2.0)["pt"].shape == (0,)
