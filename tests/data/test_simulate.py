"""The detector simulation against hand-computed helices, layer geometry and counting statistics."""

from dataclasses import replace

import numpy as np
import pytest

from cachefeat.data.events import HIT_FIELDS, PARTICLE_FIELDS, EventFile
from cachefeat.data.presets import PRESETS, Barrel, Disk, MuonPreset, Preset, TrackMLPreset
from cachefeat.data.simulate import simulate_events, write_event_file

C = 0.299792458  # GeV / (T m)


def ideal(preset: Preset, **changes) -> Preset:
    """The preset without material, smearing, inefficiency, noise or low-pT particles."""
    barrels = tuple(replace(b, x_over_x0=0.0, sigma_rphi=0.0, sigma_z=0.0) for b in preset.barrels)
    disks = tuple(replace(d, x_over_x0=0.0, sigma_rphi=0.0, sigma_r=0.0) for d in preset.disks)
    base = dict(barrels=barrels, disks=disks, efficiency=1.0, n_noise=(0, 0), n_lowpt_per_particle=0.0, min_hits=1)
    return replace(preset, **{**base, **changes})


def per_hit_particle(arrays):
    """For every hit on a stored particle: (hit row, global particle row)."""
    counts = np.diff(arrays.hit_offsets)
    event = np.repeat(np.arange(counts.size), counts)
    pidx = arrays.hits["particle_index"].astype(np.int64)
    rows = np.flatnonzero(pidx >= 0)
    return rows, arrays.particle_offsets[event[rows]] + pidx[rows]


def test_helix_crossings_match_the_analytic_helix():
    # Vertex (0, 0, vz): the track reaches radius R after turning alpha = 2 asin(R / 2rho), at
    # azimuth phi0 - q alpha / 2 (a positive track turns clockwise in +Bz), and z = vz + rho alpha sinh(eta).
    preset = ideal(TrackMLPreset(), n_particles=(30, 30))
    a = simulate_events(preset, 4, seed=3)
    rows, part = per_hit_particle(a)
    h = {k: a.hits[k][rows].astype(np.float64) for k in HIT_FIELDS}
    p = {k: a.particles[k][part].astype(np.float64) for k in PARTICLE_FIELDS}
    rho = p["pt"] / (C * preset.bz)
    nb = len(preset.barrels)

    barrel = h["layer"] < nb
    R = np.array([b.radius for b in preset.barrels])[h["layer"][barrel].astype(int)]
    alpha = 2 * np.arcsin(R / (2 * rho[barrel]))
    assert barrel.sum() > 500
    np.testing.assert_allclose(h["r"][barrel], R, rtol=1e-6)
    dphi = np.angle(np.exp(1j * (h["phi"][barrel] - (p["phi"][barrel] - p["q"][barrel] * alpha / 2))))
    np.testing.assert_allclose(dphi, 0, atol=2e-6)
    z = p["vz"][barrel] + rho[barrel] * alpha * np.sinh(p["eta"][barrel])
    np.testing.assert_allclose(h["z"][barrel], z, atol=2e-6)

    disk = ~barrel
    alpha = (h["z"][disk] - p["vz"][disk]) / np.sinh(p["eta"][disk]) / rho[disk]
    assert disk.sum() > 200
    np.testing.assert_allclose(h["r"][disk], 2 * rho[disk] * np.sin(alpha / 2), rtol=1e-5)
    dphi = np.angle(np.exp(1j * (h["phi"][disk] - (p["phi"][disk] - p["q"][disk] * alpha / 2))))
    np.testing.assert_allclose(dphi, 0, atol=1e-5)


def test_curvature_sign_follows_charge_and_field():
    for bz in (2.0, -2.0):
        preset = ideal(TrackMLPreset(), bz=bz, n_particles=(40, 40), eta_max=0.5, pt_min=1.0, pt_max=2.0)
        a = simulate_events(preset, 2, seed=5)
        rows, part = per_hit_particle(a)
        q = a.particles["q"][part]
        # Azimuth change from the innermost to each hit: sign is -q * sign(Bz).
        dphi = np.angle(np.exp(1j * (a.hits["phi"][rows] - a.particles["phi"][part])))
        outer = a.hits["r"][rows] > 0.3
        assert np.all(np.sign(dphi[outer]) == -q[outer] * np.sign(bz))


def test_loopers_stop_after_half_a_turn():
    # The turning angle at a hit follows from its z: alpha = (z - vz) / (rho sinh(eta)); the first
    # pass is alpha <= pi, along which the radius only grows.
    preset = ideal(TrackMLPreset(), n_particles=(60, 60), pt_min=0.1, pt_max=0.3, eta_max=2.5)
    a = simulate_events(preset, 2, seed=7)
    rows, part = per_hit_particle(a)
    eta = a.particles["eta"][part].astype(np.float64)
    keep = np.abs(eta) > 0.2
    rows, part, eta = rows[keep], part[keep], eta[keep]
    rho = a.particles["pt"][part] / (C * preset.bz)
    alpha = (a.hits["z"][rows] - a.particles["vz"][part]) / (rho * np.sinh(eta))
    assert alpha.max() > 2.0
    assert np.all(alpha <= np.pi * (1 + 1e-5))
    order = np.lexsort((alpha, part))
    same = np.diff(part[order]) == 0
    assert np.all(np.diff(a.hits["r"][rows][order])[same] > 0)


# ids avoid the bare word "trackml", which the root conftest reserves for TrackML-scale benchmarks.
@pytest.mark.parametrize("name", ["muon", "trackml"], ids=["muon_preset", "trackml_preset"])
def test_hits_lie_on_their_layers(name):
    preset = PRESETS[name]
    if name == "trackml":
        preset = replace(preset, n_particles=(100, 100))
    a = simulate_events(preset, 3 if name == "trackml" else 50, seed=11)
    layer = a.hits["layer"].astype(int)
    nb = len(preset.barrels)
    barrel = layer < nb
    R = np.array([b.radius for b in preset.barrels])
    L = np.array([b.half_length for b in preset.barrels])
    sz = np.array([b.sigma_z for b in preset.barrels])
    np.testing.assert_allclose(a.hits["r"][barrel], R[layer[barrel]], rtol=1e-6)
    assert np.all(np.abs(a.hits["z"][barrel]) <= L[layer[barrel]] + 6 * sz[layer[barrel]])
    if preset.disks:
        zs = np.sort([-d.z for d in preset.disks] + [d.z for d in preset.disks])
        disks = sorted([(-d.z, d) for d in preset.disks] + [(d.z, d) for d in preset.disks], key=lambda t: t[0])
        rmin = np.array([d.rmin - 6 * d.sigma_r for _, d in disks])
        rmax = np.array([d.rmax + 6 * d.sigma_r for _, d in disks])
        k = layer[~barrel] - nb
        np.testing.assert_array_equal(a.hits["z"][~barrel], zs[k].astype(np.float32))
        r = a.hits["r"][~barrel]
        assert np.all((r >= rmin[k]) & (r <= rmax[k]))
    # Derived fields, from x, y, z.
    x, y, z = (a.hits[k].astype(np.float64) for k in "xyz")
    np.testing.assert_allclose(a.hits["s"], np.sqrt(x**2 + y**2 + z**2), rtol=1e-6)
    np.testing.assert_allclose(a.hits["u"], x / (x**2 + y**2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.hits["eta"], np.arcsinh(z / np.hypot(x, y)), rtol=1e-5, atol=1e-6)


def test_efficiency_and_noise_counts():
    barrels = tuple(Barrel(radius=r, half_length=10.0, x_over_x0=0.0, sigma_rphi=0.0, sigma_z=0.0)
                    for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
    preset = replace(MuonPreset(), barrels=barrels, efficiency=0.8, n_particles=(20, 20), n_noise=(30, 30),
                     min_hits=1, eta_max=0.5, events_per_chunk=100)
    E = 200
    a = simulate_events(preset, E, seed=13)
    pidx = a.hits["particle_index"]
    counts = np.diff(a.hit_offsets)
    event = np.repeat(np.arange(E), counts)
    np.testing.assert_array_equal(np.bincount(event[pidx < 0], minlength=E), 30)
    # Every particle crosses all 6 layers: hits on particles ~ Binomial(20 * 6 * E, 0.8).
    n = 20 * 6 * E
    eff = (pidx >= 0).sum() / n
    assert abs(eff - 0.8) < 4 * np.sqrt(0.8 * 0.2 / n)
    # Noise is spread by area: layer k gets a share proportional to its radius.
    noise_layers = np.bincount(a.hits["layer"][pidx < 0].astype(int), minlength=6)
    share = np.array([b.radius for b in barrels]) / sum(b.radius for b in barrels)
    expected = share * 30 * E
    assert np.all(np.abs(noise_layers - expected) < 5 * np.sqrt(expected * (1 - share)))


def test_multiple_scattering_follows_highland():
    # Straight-ish 10 GeV tracks at eta = 0 through one 0.1 X0 layer at r = 0.5 m: the hit at r = 1 m
    # is displaced by (1 - 0.5) m * theta in r-phi and in z, theta ~ N(0, theta0) from the Highland formula.
    barrels = (
        Barrel(radius=0.5, half_length=5.0, x_over_x0=0.1, sigma_rphi=0.0, sigma_z=0.0),
        Barrel(radius=1.0, half_length=5.0, x_over_x0=0.0, sigma_rphi=0.0, sigma_z=0.0),
    )
    preset = replace(MuonPreset(), bz=1e-4, barrels=barrels, efficiency=1.0, n_particles=(200, 200), n_noise=(0, 0),
                     min_hits=2, eta_max=0.0, vz_sigma=0.0, pt_min=10.0, pt_max=10.0 + 1e-9, events_per_chunk=20)
    a = simulate_events(preset, 20, seed=17)
    rows, part = per_hit_particle(a)
    outer = a.hits["layer"][rows] == 1
    p = 10.0
    beta = p / np.hypot(p, preset.mass)
    theta0 = 0.0136 / (beta * p) * np.sqrt(0.1) * (1 + 0.038 * np.log(0.1 / beta**2))
    dphi = np.angle(np.exp(1j * (a.hits["phi"][rows][outer] - a.particles["phi"][part][outer])))
    n = outer.sum()
    assert n == 4000
    for spread in (dphi * 1.0 / 0.5, a.hits["z"][rows][outer] / 0.5):
        assert abs(np.std(spread) / theta0 - 1) < 5 / np.sqrt(2 * n)
        assert abs(np.mean(spread)) < 5 * theta0 / np.sqrt(n)


def test_trackml_particles_below_threshold_are_labelled_noise():
    preset = replace(TrackMLPreset(), n_particles=(100, 100), n_noise=(0, 0))
    a = simulate_events(preset, 2, seed=19)
    assert np.all(a.particles["pt"] >= preset.pt_min)
    assert np.all(np.abs(a.particles["eta"]) <= preset.eta_max)
    # Every stored particle has at least min_hits hits; some hits (low-pT particles) have none.
    rows, part = per_hit_particle(a)
    assert np.bincount(part, minlength=a.particles["pt"].size).min() >= preset.min_hits
    assert 0 < np.mean(a.hits["particle_index"] < 0) < 0.5


def test_hits_are_sorted_by_layer_then_phi():
    a = simulate_events(replace(TrackMLPreset(), n_particles=(50, 50)), 2, seed=23)
    for e in range(2):
        sl = slice(a.hit_offsets[e], a.hit_offsets[e + 1])
        key = a.hits["layer"][sl].astype(np.float64) * 10 + (a.hits["phi"][sl] + np.pi)
        assert np.all(np.diff(key) >= 0)


def test_same_seed_same_content_and_chunk_prefix(tmp_path):
    preset = replace(MuonPreset(), events_per_chunk=10)
    paths = [tmp_path / f"{i}.h5" for i in range(3)]
    write_event_file(paths[0], preset, 25, seed=1)
    write_event_file(paths[1], preset, 25, seed=1)
    write_event_file(paths[2], preset, 25, seed=2)
    hashes = []
    for path in paths:
        with EventFile(path, ["x"], ["pt"]) as f:
            hashes.append(f.content_hash())
    assert hashes[0] == hashes[1] != hashes[2]
    # The first whole chunks do not depend on the number of events.
    short, long = simulate_events(preset, 20, seed=1), simulate_events(preset, 25, seed=1)
    n = short.hit_offsets[-1]
    np.testing.assert_array_equal(short.hits["x"], long.hits["x"][:n])
    np.testing.assert_array_equal(short.hit_offsets, long.hit_offsets[:21])


def test_preset_validation():
    with pytest.raises(ValueError, match="radii"):
        replace(MuonPreset(), barrels=tuple(reversed(MuonPreset().barrels)))
    with pytest.raises(ValueError, match="disks"):
        replace(TrackMLPreset(), disks=(Disk(z=1.0, rmin=0.5, rmax=0.2, x_over_x0=0, sigma_rphi=0, sigma_r=0),))
