"""A small detector simulation: helices in a solenoid, crossing barrel cylinders and endcap disks.

Per event: a vertex (0, 0, vz) with vz ~ N(0, vz_sigma); charged particles with pT from a
power law, eta and phi uniform, charge ±1. Each particle is propagated surface to surface along
its helix (radius [m] = pT [GeV] / (0.2998 Bz [T])); at every crossing it leaves a hit with
probability `efficiency` and is deflected by multiple scattering (Highland, x/X0 scaled by
the path length through the surface), then continues from there. Only the first half turn of
the helix is followed (no looper re-crossings). Hits are smeared in r-phi and z (barrel) or
r-phi and r (disks); noise hits are spread uniformly by area over all surfaces.

Everything is vectorised over the particles of a chunk of `preset.events_per_chunk` events;
chunk k draws from its own stream seeded by (seed, k), so the first k·events_per_chunk events
of a file do not depend on how many events it holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from cachefeat import __version__
from cachefeat.data.events import CHUNK_ROWS, HIT_FIELDS, PARTICLE_FIELDS, SCHEMA_VERSION, UNITS
from cachefeat.data.presets import Preset

log = logging.getLogger(__name__)

C_LIGHT = 0.299792458  # GeV / (T m): helix radius [m] = pT [GeV] / (C_LIGHT * Bz [T])
_MIN_COS = 0.05  # path through a surface is capped at 1/_MIN_COS times its thickness (grazing)


@dataclass
class EventArrays:
    """Events in CSR form, as stored in the HDF5 file (see `cachefeat.data.events`).

    hits: float32 [H] per field of HIT_FIELDS and int32 [H] `particle_index`;
    particles: float32 [P] per field of PARTICLE_FIELDS;
    hit_offsets, particle_offsets: int64 [E+1]; event_id: int64 [E].
    """

    hits: dict[str, np.ndarray]
    particles: dict[str, np.ndarray]
    hit_offsets: np.ndarray
    particle_offsets: np.ndarray
    event_id: np.ndarray

    @staticmethod
    def concat(parts: list[EventArrays]) -> EventArrays:
        def offsets(name):
            out, base = [np.zeros(1, np.int64)], 0
            for p in parts:
                off = getattr(p, name)
                out.append(off[1:] + base)
                base += off[-1]
            return np.concatenate(out)

        return EventArrays(
            hits={k: np.concatenate([p.hits[k] for p in parts]) for k in parts[0].hits},
            particles={k: np.concatenate([p.particles[k] for p in parts]) for k in parts[0].particles},
            hit_offsets=offsets("hit_offsets"),
            particle_offsets=offsets("particle_offsets"),
            event_id=np.concatenate([p.event_id for p in parts]),
        )


@dataclass(frozen=True)
class _Geometry:
    """The preset's surfaces as arrays, indexed by layer (barrels, then disks by signed z)."""

    barrel_r: np.ndarray
    barrel_half: np.ndarray
    disk_z: np.ndarray
    disk_rmin: np.ndarray
    disk_rmax: np.ndarray
    x_over_x0: np.ndarray
    sigma_rphi: np.ndarray
    sigma_long: np.ndarray  # z on barrels, r on disks
    area: np.ndarray

    @staticmethod
    def of(preset: Preset) -> _Geometry:
        barrels = preset.barrels
        signed = sorted([(-d.z, d) for d in preset.disks] + [(d.z, d) for d in preset.disks], key=lambda t: t[0])
        disks = [d for _, d in signed]
        surfaces = (*barrels, *disks)
        return _Geometry(
            barrel_r=np.array([b.radius for b in barrels], float),
            barrel_half=np.array([b.half_length for b in barrels], float),
            disk_z=np.array([z for z, _ in signed], float),
            disk_rmin=np.array([d.rmin for d in disks], float),
            disk_rmax=np.array([d.rmax for d in disks], float),
            x_over_x0=np.array([s.x_over_x0 for s in surfaces], float),
            sigma_rphi=np.array([s.sigma_rphi for s in surfaces], float),
            sigma_long=np.array([b.sigma_z for b in barrels] + [d.sigma_r for d in disks], float),
            area=np.array([4 * np.pi * b.radius * b.half_length for b in barrels]
                          + [np.pi * (d.rmax**2 - d.rmin**2) for d in disks]),
        )


def _power_law(rng, lo: float, hi: float, power: float, n: int) -> np.ndarray:
    """n draws from dN/dx ~ x^-power on [lo, hi] (inverse CDF)."""
    u = rng.random(n)
    if n == 0:
        return u
    if power == 1.0:
        return lo * (hi / lo) ** u
    a = 1.0 - power
    return (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)


def _next_crossing(geo: _Geometry, x, y, z, phi, cot, kappa, turn):
    """Transverse arc length [m] to the next surface along each helix and that surface's layer.

    A barrel counts only outside the current radius, within its half-length; a disk only
    ahead in z, within [rmin, rmax]; and only crossings within half a turn of the vertex.
    Returns (s, layer); s is inf where nothing is crossed.

    With the circle's centre c = d (cos psi_c, sin psi_c), radius rho, and psi the angle of a
    point about c (psi advances by kappa per metre of arc), the point's radius obeys
    r^2 = (d - rho)^2 + 4 rho d cos^2((psi - psi_c) / 2), written so that nearly straight
    tracks (rho >> r, d ~ rho) keep their precision.
    """
    sign = np.sign(kappa)[:, None]
    absk = np.abs(kappa)[:, None]
    xc, yc = x - np.sin(phi) / kappa, y + np.cos(phi) / kappa
    rho = 1.0 / absk
    d = np.hypot(xc, yc)[:, None]
    psi_c = np.arctan2(yc, xc)[:, None]
    psi0 = np.arctan2(y - yc, x - xc)[:, None]
    room = np.pi - turn[:, None]  # turning angle left in the first half turn

    R = geo.barrel_r[None, :]
    # Radius R is reached at psi = psi_c ± half, with cos^2(half/2) = inner and sin^2(half/2) = outer.
    inner = (R**2 - (d - rho) ** 2) / (4 * rho * d)
    outer = ((d + rho) ** 2 - R**2) / (4 * rho * d)
    half = 2 * np.arctan2(np.sqrt(np.maximum(outer, 0)), np.sqrt(np.maximum(inner, 0)))
    reach = (inner >= 0) & (outer >= 0) & (np.hypot(x, y)[:, None] < R - 1e-9)
    s_barrel = np.full(half.shape, np.inf)
    for side in (1.0, -1.0):
        dpsi = np.mod((psi_c + side * half - psi0) * sign, 2 * np.pi)
        z_cross = z[:, None] + cot[:, None] * dpsi * rho
        ok = reach & (dpsi > 1e-12) & (dpsi <= room) & (np.abs(z_cross) <= geo.barrel_half)
        s_barrel = np.minimum(s_barrel, np.where(ok, dpsi * rho, np.inf))

    # Only the disks on the side the track heads to (disks are sorted by z: -z side first).
    nd = geo.disk_z.size // 2
    disk = np.arange(nd)[None, :] + np.where(cot > 0, nd, 0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        s_disk = (geo.disk_z[disk] - z[:, None]) / cot[:, None]
        dpsi = s_disk * absk
        r2 = (d - rho) ** 2 + 4 * rho * d * np.cos((psi0 + sign * dpsi - psi_c) / 2) ** 2
    ok = (s_disk > 1e-9) & (dpsi <= room) & (r2 >= geo.disk_rmin[disk] ** 2) & (r2 <= geo.disk_rmax[disk] ** 2)
    s_disk = np.where(ok, s_disk, np.inf)

    s_all = np.concatenate([s_barrel, s_disk], axis=1)
    rows = np.arange(x.size)
    best = np.argmin(s_all, axis=1)
    s_best, layer = s_all[rows, best], best.copy()
    on_disk = best >= R.size
    layer[on_disk] = R.size + disk[rows[on_disk], best[on_disk] - R.size]
    return s_best, layer


def _propagate(geo: _Geometry, preset: Preset, rng, pt, eta, phi, q, vz):
    """Follow particles from the vertex through the surfaces.

    Args: float64 [N] arrays at the vertex (pt [GeV], eta, phi [rad], q, vz [m]).
    Returns (particle, layer, x, y, z) of every crossing that left a hit (before smearing).
    """
    p = pt * np.cosh(eta)
    beta = p / np.sqrt(p**2 + preset.mass**2)
    x, y, z = np.zeros_like(pt), np.zeros_like(pt), vz.copy()
    cot = np.sinh(eta)
    phi, pt = phi.copy(), pt.copy()
    turn = np.zeros_like(pt)
    alive = np.arange(pt.size)
    nb = geo.barrel_r.size
    found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0))]
    for _ in range(preset.n_layers):
        if alive.size == 0:
            break
        kappa = -q[alive] * C_LIGHT * preset.bz / pt[alive]
        s, layer = _next_crossing(geo, x[alive], y[alive], z[alive], phi[alive], cot[alive], kappa, turn[alive])
        keep = np.isfinite(s)
        alive, s, layer, kappa = alive[keep], s[keep], layer[keep], kappa[keep]
        phi0 = phi[alive]
        phi1 = phi0 + kappa * s
        x[alive] += (np.sin(phi1) - np.sin(phi0)) / kappa
        y[alive] -= (np.cos(phi1) - np.cos(phi0)) / kappa
        z[alive] += cot[alive] * s
        turn[alive] += np.abs(kappa) * s
        hit = rng.random(alive.size) < preset.efficiency
        found.append((alive[hit], layer[hit], x[alive][hit], y[alive][hit], z[alive][hit]))

        # Multiple scattering: two Gaussian angles in the planes transverse to the direction.
        sin_t = 1.0 / np.sqrt(1.0 + cot[alive] ** 2)
        cos_t = cot[alive] * sin_t
        barrel = layer < nb
        r = np.hypot(x[alive], y[alive])
        radial = sin_t * (np.cos(phi1) * x[alive] + np.sin(phi1) * y[alive]) / r
        incidence = np.maximum(np.abs(np.where(barrel, radial, cos_t)), _MIN_COS)
        t = geo.x_over_x0[layer] / incidence
        with np.errstate(divide="ignore"):
            log_term = np.maximum(1 + 0.038 * np.log(t / beta[alive] ** 2), 0)
        theta0 = np.where(t > 0, 0.0136 / (p[alive] * beta[alive]) * np.sqrt(t) * log_term, 0)
        g1, g2 = np.tan(theta0 * rng.standard_normal((2, alive.size)))
        dx = np.cos(phi1) * sin_t - g1 * np.sin(phi1) + g2 * cos_t * np.cos(phi1)
        dy = np.sin(phi1) * sin_t + g1 * np.cos(phi1) + g2 * cos_t * np.sin(phi1)
        dz = cos_t - g2 * sin_t
        dt = np.hypot(dx, dy)
        phi[alive] = np.arctan2(dy, dx)
        cot[alive] = dz / dt
        pt[alive] = p[alive] * dt / np.sqrt(dt**2 + dz**2)
    return tuple(np.concatenate(parts) for parts in zip(*found))


def _smear(geo: _Geometry, rng, layer, x, y, z):
    """Measured positions: Gaussian r-phi and z (barrels) or r-phi and r (disks) resolution."""
    nb = geo.barrel_r.size
    barrel = layer < nb
    r_true = np.hypot(x, y)
    r = np.where(barrel, r_true, r_true + geo.sigma_long[layer] * rng.standard_normal(layer.size))
    phi = np.arctan2(y, x) + geo.sigma_rphi[layer] * rng.standard_normal(layer.size) / r_true
    z = np.where(barrel, z + geo.sigma_long[layer] * rng.standard_normal(layer.size), z)
    return r * np.cos(phi), r * np.sin(phi), z


def _noise(geo: _Geometry, rng, n: int):
    """n hits placed uniformly by area over all surfaces: (layer, x, y, z)."""
    nb = geo.barrel_r.size
    layer = rng.choice(geo.area.size, size=n, p=geo.area / geo.area.sum())
    phi = rng.uniform(-np.pi, np.pi, n)
    u = rng.random(n)
    barrel = layer < nb
    bl, dl = np.minimum(layer, nb - 1), np.maximum(layer - nb, 0)
    if nb:
        r_barrel, z_barrel = geo.barrel_r[bl], (2 * u - 1) * geo.barrel_half[bl]
    else:
        r_barrel = z_barrel = np.zeros(n)
    if geo.disk_z.size:
        r_disk = np.sqrt(geo.disk_rmin[dl] ** 2 + u * (geo.disk_rmax[dl] ** 2 - geo.disk_rmin[dl] ** 2))
        z_disk = geo.disk_z[dl]
    else:
        r_disk = z_disk = np.zeros(n)
    r = np.where(barrel, r_barrel, r_disk)
    return layer, r * np.cos(phi), r * np.sin(phi), np.where(barrel, z_barrel, z_disk)


def simulate_chunk(preset: Preset, n_events: int, rng: np.random.Generator, first_event_id: int = 0) -> EventArrays:
    """Simulate `n_events` events with one random stream, vectorised over all their particles."""
    geo = _Geometry.of(preset)
    n_cand = rng.integers(preset.n_particles[0], preset.n_particles[1] + 1, n_events)
    n_low = rng.poisson(preset.n_lowpt_per_particle * n_cand)
    vz_event = rng.normal(0.0, preset.vz_sigma, n_events)
    n_cand_total = int(n_cand.sum())
    event = np.concatenate([np.repeat(np.arange(n_events), n_cand), np.repeat(np.arange(n_events), n_low)])
    n = event.size
    pt = np.concatenate([
        _power_law(rng, preset.pt_min, preset.pt_max, preset.pt_power, n_cand_total),
        _power_law(rng, preset.lowpt_min, preset.lowpt_max, preset.pt_power, n - n_cand_total),
    ])
    eta = rng.uniform(-preset.eta_max, preset.eta_max, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    q = rng.choice(np.array([-1.0, 1.0]), n)
    vz = vz_event[event]

    pid, layer, x, y, z = _propagate(geo, preset, rng, pt, eta, phi, q, vz)
    n_hits = np.bincount(pid, minlength=n)
    stored = n_hits >= preset.min_hits
    stored[n_cand_total:] = False  # low-pT particles are never reconstructable
    # Event-local index of each stored particle (particles are grouped by event, in order).
    rank = np.cumsum(stored) - 1
    first_rank = np.zeros(n_events, np.int64)
    per_event = np.bincount(event[stored], minlength=n_events)
    first_rank[1:] = np.cumsum(per_event)[:-1]
    local = np.where(stored, rank - first_rank[event], -1)

    x, y, z = _smear(geo, rng, layer, x, y, z)
    n_noise = rng.integers(preset.n_noise[0], preset.n_noise[1] + 1, n_events)
    noise_layer, nx, ny, nz = _noise(geo, rng, int(n_noise.sum()))
    hit_event = np.concatenate([event[pid], np.repeat(np.arange(n_events), n_noise)])
    layer = np.concatenate([layer, noise_layer])
    x, y, z = np.concatenate([x, nx]), np.concatenate([y, ny]), np.concatenate([z, nz])
    particle_index = np.concatenate([local[pid], np.full(nx.size, -1)])

    r2 = x**2 + y**2
    r = np.sqrt(r2)
    hit_phi = np.arctan2(y, x)
    fields = {
        "x": x, "y": y, "z": z, "r": r, "s": np.sqrt(r2 + z**2), "eta": np.arcsinh(z / r),
        "phi": hit_phi, "u": x / r2, "v": y / r2, "layer": layer,
    }
    order = np.lexsort((hit_phi, layer, hit_event))
    hits = {k: fields[k][order].astype(np.float32) for k in HIT_FIELDS}
    hits["particle_index"] = particle_index[order].astype(np.int32)
    vertex = {"pt": pt, "eta": eta, "phi": phi, "q": q, "vz": vz}
    particles = {k: vertex[k][stored].astype(np.float32) for k in PARTICLE_FIELDS}
    zero = np.zeros(1, np.int64)
    return EventArrays(
        hits=hits,
        particles=particles,
        hit_offsets=np.concatenate([zero, np.cumsum(np.bincount(hit_event, minlength=n_events))]),
        particle_offsets=np.concatenate([zero, np.cumsum(per_event)]),
        event_id=np.arange(first_event_id, first_event_id + n_events, dtype=np.int64),
    )


def iter_event_chunks(preset: Preset, n_events: int, seed: int) -> Iterator[EventArrays]:
    """Chunks of `preset.events_per_chunk` events (the last may be shorter); chunk k uses seed (seed, k)."""
    for k, start in enumerate(range(0, n_events, preset.events_per_chunk)):
        rng = np.random.default_rng([seed, k])
        yield simulate_chunk(preset, min(preset.events_per_chunk, n_events - start), rng, first_event_id=start)


def simulate_events(preset: Preset, n_events: int, seed: int) -> EventArrays:
    """All `n_events` events in memory; identical to what `write_event_file` stores."""
    return EventArrays.concat(list(iter_event_chunks(preset, n_events, seed)))


def write_event_file(path, preset: Preset, n_events: int, seed: int, progress: bool = False) -> dict:
    """Simulate and write an event file (schema in `cachefeat.data.events`).

    Writes to a temporary file beside `path` and renames it at the end, so `path` never holds
    a partial file. Returns summary counts: events, hits, particles, noise_hits, seconds.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    totals = {"events": 0, "hits": 0, "particles": 0, "noise_hits": 0}
    try:
        with h5py.File(tmp, "w") as f:
            layout = [(f"hits/{k}", np.float32) for k in HIT_FIELDS] + [("hits/particle_index", np.int32)]
            layout += [(f"particles/{k}", np.float32) for k in PARTICLE_FIELDS]
            layout += [(f"events/{k}", np.int64) for k in ("hit_offsets", "particle_offsets", "event_id")]
            for name, dtype in layout:
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK_ROWS,),
                                 compression="lzf", shuffle=True, fletcher32=True)
            _append(f["events/hit_offsets"], np.zeros(1, np.int64))
            _append(f["events/particle_offsets"], np.zeros(1, np.int64))
            with tqdm(total=n_events, unit="event", disable=not progress, desc=f"simulate {preset.name}") as bar:
                for chunk in iter_event_chunks(preset, n_events, seed):
                    for k, v in chunk.hits.items():
                        _append(f[f"hits/{k}"], v)
                    for k, v in chunk.particles.items():
                        _append(f[f"particles/{k}"], v)
                    _append(f["events/hit_offsets"], chunk.hit_offsets[1:] + totals["hits"])
                    _append(f["events/particle_offsets"], chunk.particle_offsets[1:] + totals["particles"])
                    _append(f["events/event_id"], chunk.event_id)
                    totals["events"] += chunk.event_id.size
                    totals["hits"] += int(chunk.hit_offsets[-1])
                    totals["particles"] += int(chunk.particle_offsets[-1])
                    totals["noise_hits"] += int((chunk.hits["particle_index"] < 0).sum())
                    bar.update(chunk.event_id.size)
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["hit_fields"] = json.dumps(list(HIT_FIELDS))
            f.attrs["particle_fields"] = json.dumps(list(PARTICLE_FIELDS))
            f.attrs["units"] = json.dumps(UNITS)
            f.attrs["generator"] = json.dumps({
                "preset": {"class": type(preset).__name__, **dataclasses.asdict(preset)},
                "seed": seed, "n_events": n_events, "cachefeat_version": __version__,
            })
            f.attrs["preset"] = preset.name
            f.attrs["seed"] = seed
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    totals["seconds"] = time.perf_counter() - start
    log.info(
        "wrote %d %s events to %s in %.1f s: %.1f hits/event, %.2f particles/event, %.1f %% hits on no particle",
        totals["events"], preset.name, path, totals["seconds"], totals["hits"] / max(totals["events"], 1),
        totals["particles"] / max(totals["events"], 1), 100 * totals["noise_hits"] / max(totals["hits"], 1),
    )
    return totals


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize((n + values.size,))
    ds[n:] = values
