"""Detector and event presets for `cachefeat simulate`: the benchmark conditions.

A preset fixes the geometry (barrel cylinders, endcap disks), the field, the material and
resolutions, and the event content (particle counts and spectra, noise). Units: metres, GeV,
tesla; `x_over_x0` is the thickness of a surface in radiation lengths at normal incidence.
Presets are frozen dataclasses; derive variants with `dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cachefeat.config import did_you_mean
from cachefeat.errors import UserError


@dataclass(frozen=True)
class Barrel:
    """A cylindrical barrel layer centred on the beam axis.

    radius [m], half_length [m] (covers |z| <= half_length), x_over_x0 at normal incidence,
    sigma_rphi / sigma_z: Gaussian hit resolution [m] along r-phi and along z.
    """

    radius: float
    half_length: float
    x_over_x0: float
    sigma_rphi: float
    sigma_z: float


@dataclass(frozen=True)
class Disk:
    """A pair of endcap disks at z = +z and z = -z, covering rmin <= r <= rmax.

    z [m] (> 0), rmin/rmax [m], x_over_x0 at normal incidence,
    sigma_rphi / sigma_r: Gaussian hit resolution [m] along r-phi and along r.
    """

    z: float
    rmin: float
    rmax: float
    x_over_x0: float
    sigma_rphi: float
    sigma_r: float


@dataclass(frozen=True)
class Preset:
    """Everything the simulation draws from; the same preset and seed give the same file.

    Layer indices: barrels are 0..nb-1 in the order given (increasing radius); disks
    follow as nb + k with the 2·nd disk surfaces ordered by z, from the most negative.

    Attributes:
        name: preset name.
        bz: solenoid field [T] along +z.
        barrels, disks: the surfaces (disks are mirrored to -z).
        efficiency: probability that a crossing leaves a hit, on every layer.
        n_particles: (min, max) candidate particles per event, drawn uniformly.
        pt_min, pt_max, pt_power: pT [GeV] spectrum dN/dpT ~ pT^-pt_power on [pt_min, pt_max];
            pt_min is the reconstructability threshold.
        eta_max: |eta| acceptance; eta and phi are uniform.
        vz_sigma: Gaussian spread [m] of the vertex z (the vertex is on the beam axis).
        mass: particle mass [GeV], for beta in the multiple-scattering formula.
        min_hits: a particle with fewer hits is not reconstructable: it is not stored and its
            hits get particle_index -1.
        n_lowpt_per_particle: mean number (Poisson) of low-pT particles per candidate particle;
            they are never stored and their hits get particle_index -1.
        lowpt_min, lowpt_max: their pT range [GeV] (same power law).
        n_noise: (min, max) noise hits per event, drawn uniformly; placed uniformly by area
            over all surfaces.
        events_per_chunk: events generated together (one random stream per chunk).
    """

    name: str
    bz: float
    barrels: tuple[Barrel, ...]
    disks: tuple[Disk, ...]
    efficiency: float
    n_particles: tuple[int, int]
    pt_min: float
    pt_max: float
    pt_power: float
    eta_max: float
    vz_sigma: float
    mass: float
    min_hits: int
    n_lowpt_per_particle: float
    lowpt_min: float
    lowpt_max: float
    n_noise: tuple[int, int]
    events_per_chunk: int

    def __post_init__(self):
        radii = [b.radius for b in self.barrels]
        if radii != sorted(radii):
            raise ValueError(f"preset {self.name}: barrel radii must increase")
        if self.bz == 0:
            raise ValueError(f"preset {self.name}: bz must be nonzero (helices need a field)")
        if not self.barrels and not self.disks:
            raise ValueError(f"preset {self.name}: needs at least one surface")
        if any(d.z <= 0 or d.rmin >= d.rmax for d in self.disks):
            raise ValueError(f"preset {self.name}: disks need z > 0 and rmin < rmax")
        if self.n_particles[0] > self.n_particles[1] or self.n_noise[0] > self.n_noise[1]:
            raise ValueError(f"preset {self.name}: (min, max) ranges must have min <= max")

    @property
    def n_layers(self) -> int:
        return len(self.barrels) + 2 * len(self.disks)


def _muon_barrels() -> tuple[Barrel, ...]:
    stations = [4.5 + i * (10.4 - 4.5) / 9 for i in range(10)]
    return tuple(
        Barrel(radius=round(r + dr, 6), half_length=12.0, x_over_x0=0.02, sigma_rphi=1e-3, sigma_z=1e-3)
        for r in stations
        for dr in (0.0, 0.05, 0.10)
    )


@dataclass(frozen=True)
class MuonPreset(Preset):
    """ATLAS-muon scale: 1-2 muons (pT 5-100 GeV, |eta| < 1) in a 0.6 T solenoid crossing 10
    stations of 3 layers (5 cm apart) between r = 4.5 and 10.5 m (|z| < 12 m, barrel only);
    1 mm resolution, 95 % efficiency, 0.02 X0 per layer, so ~28 hits per muon; 70-540 uniform
    background hits, so an event holds ~100-600 hits, most of them background."""

    name: str = "muon"
    bz: float = 0.6
    barrels: tuple[Barrel, ...] = _muon_barrels()
    disks: tuple[Disk, ...] = ()
    efficiency: float = 0.95
    n_particles: tuple[int, int] = (1, 2)
    pt_min: float = 5.0
    pt_max: float = 100.0
    pt_power: float = 2.0
    eta_max: float = 1.0
    vz_sigma: float = 0.05
    mass: float = 0.1057
    min_hits: int = 8
    n_lowpt_per_particle: float = 0.0
    lowpt_min: float = 0.0
    lowpt_max: float = 0.0
    n_noise: tuple[int, int] = (70, 540)
    events_per_chunk: int = 2000


_PIXEL = dict(half_length=0.49, x_over_x0=0.015, sigma_rphi=1.5e-5, sigma_z=1.5e-5)
_STRIP = dict(half_length=1.08, x_over_x0=0.025, sigma_rphi=4e-5, sigma_z=3.5e-4)
_PIXEL_DISK = dict(rmin=0.03, rmax=0.175, x_over_x0=0.015, sigma_rphi=1.5e-5, sigma_r=1.5e-5)
_STRIP_DISK = dict(rmin=0.23, rmax=0.70, x_over_x0=0.025, sigma_rphi=4e-5, sigma_r=3.5e-4)


@dataclass(frozen=True)
class TrackMLPreset(Preset):
    """TrackML-pixel scale in a 2 T solenoid: 4 pixel barrel layers (r = 32-172 mm, |z| < 0.49 m),
    4 short-strip layers (r = 0.26-0.66 m, |z| < 1.08 m), 7 pixel and 6 strip disks per side;
    200-1000 pions above 1 GeV with |eta| < 2.5, plus low-pT (0.1-1 GeV) pions whose hits are
    labelled -1 (loopers stop after half a turn) and 100-400 noise hits, so ~20-30 % of the
    hits belong to no reconstructable particle."""

    name: str = "trackml"
    bz: float = 2.0
    barrels: tuple[Barrel, ...] = (
        *(Barrel(radius=r, **_PIXEL) for r in (0.032, 0.072, 0.116, 0.172)),
        *(Barrel(radius=r, **_STRIP) for r in (0.26, 0.36, 0.50, 0.66)),
    )
    disks: tuple[Disk, ...] = (
        *(Disk(z=z, **_PIXEL_DISK) for z in (0.60, 0.70, 0.82, 0.96, 1.10, 1.30, 1.50)),
        *(Disk(z=z, **_STRIP_DISK) for z in (1.22, 1.50, 1.82, 2.15, 2.50, 2.95)),
    )
    efficiency: float = 0.97
    n_particles: tuple[int, int] = (200, 1000)
    pt_min: float = 1.0
    pt_max: float = 50.0
    pt_power: float = 3.0
    eta_max: float = 2.5
    vz_sigma: float = 0.055
    mass: float = 0.1396
    min_hits: int = 3
    n_lowpt_per_particle: float = 0.3
    lowpt_min: float = 0.1
    lowpt_max: float = 1.0
    n_noise: tuple[int, int] = (100, 400)
    events_per_chunk: int = 20


PRESETS: dict[str, Preset] = {p.name: p for p in (MuonPreset(), TrackMLPreset())}


def get_preset(name: str) -> Preset:
    """The preset called `name`; UserError with a did-you-mean if there is none."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'{did_you_mean(name, PRESETS)}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
