"""Tiny synthetic padded batches for the stage-1 model tests (no dependence on cachefeat.data)."""

import math

import numpy as np
import pytest
import torch

HIT_FIELDS = ["x", "y", "z", "r", "s", "eta", "phi", "u", "v", "layer"]
PARTICLE_FIELDS = ["pt", "eta", "phi", "q", "vz"]


def _event(rng, num_particles, num_layers, num_noise):
    """Helix-like tracks through cylindrical layers r = 1..num_layers (metres), plus uniform noise."""
    hits = []  # (r, phi, z, layer, particle)
    particles = []
    for p in range(num_particles):
        pt = rng.uniform(2.0, 20.0)
        eta = rng.uniform(-1.5, 1.5)
        phi0 = rng.uniform(-math.pi, math.pi)
        q = rng.choice([-1.0, 1.0])
        vz = rng.normal(0.0, 0.05)
        particles.append((pt, eta, phi0, q, vz))
        for layer in range(1, num_layers + 1):
            r = float(layer)
            phi = math.remainder(phi0 + q * 0.3 * r / pt, 2 * math.pi)
            hits.append((r, phi, vz + r * math.sinh(eta), layer, p))
    for _ in range(num_noise):
        layer = int(rng.integers(1, num_layers + 1))
        hits.append((float(layer), rng.uniform(-math.pi, math.pi), rng.uniform(-5, 5), layer, -1))
    order = rng.permutation(len(hits))
    return [hits[i] for i in order], particles


def synthetic_batch(
    seed=0,
    num_events=3,
    num_particles=(2, 1, 0),
    num_layers=6,
    num_noise=3,
    extra_hit_pad=0,
    extra_particle_pad=0,
    pad_value=0.0,
):
    """Padded batch in the model's input contract; `pad_value` fills padded hit/particle fields."""
    rng = np.random.default_rng(seed)
    counts = list(num_particles) if isinstance(num_particles, (list, tuple)) else [num_particles] * num_events
    events = [_event(rng, counts[b % len(counts)], num_layers, num_noise) for b in range(num_events)]
    M = max(len(h) for h, _ in events) + extra_hit_pad
    P = max(len(p) for _, p in events) + extra_particle_pad
    B = num_events
    batch = {"event_id": torch.arange(B, dtype=torch.int64) + 100}
    fields = {f: torch.full((B, M), pad_value) for f in HIT_FIELDS}
    hit_valid = torch.zeros(B, M, dtype=torch.bool)
    hit_particle = torch.full((B, M), -1, dtype=torch.int64)
    pfields = {f: torch.full((B, P), pad_value) for f in PARTICLE_FIELDS}
    particle_valid = torch.zeros(B, P, dtype=torch.bool)
    for b, (hits, particles) in enumerate(events):
        for m, (r, phi, z, layer, p) in enumerate(hits):
            x, y = r * math.cos(phi), r * math.sin(phi)
            s = math.hypot(r, z)
            values = {
                "x": x,
                "y": y,
                "z": z,
                "r": r,
                "s": s,
                "eta": math.asinh(z / r),
                "phi": phi,
                "u": x / r**2,
                "v": y / r**2,
                "layer": layer,
            }
            for f, value in values.items():
                fields[f][b, m] = value
            hit_valid[b, m] = True
            hit_particle[b, m] = p
        for p, values in enumerate(particles):
            for f, value in zip(PARTICLE_FIELDS, values):
                pfields[f][b, p] = value
            particle_valid[b, p] = True
    batch.update({f"hit_{f}": v for f, v in fields.items()})
    batch["hit_valid"] = hit_valid
    batch["hit_particle_index"] = hit_particle
    batch.update({f"particle_{f}": v for f, v in pfields.items()})
    batch["particle_valid"] = particle_valid
    batch["particle_hit_valid"] = (hit_particle[:, None, :] == torch.arange(P)[None, :, None]) & hit_valid[:, None, :]
    return batch


def repad(batch, extra_hits, pad_value, seed=0):
    """The same events with `extra_hits` more padding hits and random padded hit values."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(batch)
    B, M = batch["hit_valid"].shape
    valid = torch.cat([batch["hit_valid"], torch.zeros(B, extra_hits, dtype=torch.bool)], dim=1)
    for key, value in batch.items():
        if key.startswith("hit_") and key not in ("hit_valid", "hit_particle_index"):
            noise = pad_value * torch.randn(B, M + extra_hits, generator=gen)
            padded = torch.cat([value, torch.zeros(B, extra_hits)], dim=1)
            out[key] = torch.where(valid, padded, noise)
    out["hit_valid"] = valid
    out["hit_particle_index"] = torch.cat([batch["hit_particle_index"], torch.full((B, extra_hits), -1)], dim=1)
    out["particle_hit_valid"] = torch.cat(
        [batch["particle_hit_valid"], torch.zeros(B, batch["particle_valid"].shape[1], extra_hits, dtype=torch.bool)],
        dim=2,
    )
    return out


@pytest.fixture
def make_batch():
    return synthetic_batch


@pytest.fixture
def hit_fields():
    return list(HIT_FIELDS)


@pytest.fixture
def repad_batch():
    return repad
