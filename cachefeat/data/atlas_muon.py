"""Simulated events in hepattn's ATLAS-muon on-disk layout, the directory that
`AtlasMuonDataModule` reads with `dummy_data: false` (hepattn's `AtlasMuonDataset.load_event`).

So a hepattn user can run the real data path (not the data module's generated `dummy_data`,
whose hits and targets are random) on events with tracks: `cachefeat simulate --layout atlas-muon`.

A directory holds:

- `metadata.yaml`: `hit_features` (the columns of `hits`, `HIT_FEATURES`), `track_features`
  (`TRACK_FEATURES`), `event_mapping.chunk_summary` (one entry per HDF5 file: `h5_file`,
  `num_events`, `first_event`) and `generator` (preset and seed);
- `event_file_indices.npy`, `event_row_indices.npy`: int64 [E], the file and row of event k;
- `events_<k>.h5`: `hits` float32 [n, max_hits, F] and `tracks` float32 [n, max_tracks, T],
  NaN-padded; `num_hits`, `num_tracks` int64 [n]; `event_numbers` int64 [n].

Hit columns, from a simulated hit (units as hepattn's loader expects them before its rescaling):
`spacePoint_globEdgeLow{X,Y,Z}` and `spacePoint_globEdgeHigh{X,Y,Z}` the hit position in mm (a
space point: both edges at the hit), `spacePoint_channel` the phi bin of the hit (0..999), `spacePoint_layer` and
`spacePoint_stationIndex` the simulated layer index, `spacePoint_stationPhi` the 1-based sector
of 16 in phi, `spacePoint_stationEta` the signed 0.25-wide eta bin, `spacePoint_technology`
0 on a barrel layer and 1 on a disk, `spacePoint_truthLink` the event-local particle index (-1 for
a hit on no stored particle); `spacePoint_time`, `spacePoint_driftR` and the `spacePoint_cov*`
terms are not simulated and hold 0. Track columns: the stored particles' pT [GeV], eta, phi and
charge, in particle-index order, which is the order hepattn gives them (its particle ids are the
sorted truth links; every stored particle has hits).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import yaml
from tqdm import tqdm

from cachefeat.data.presets import Preset
from cachefeat.data.simulate import iter_event_chunks

log = logging.getLogger(__name__)

HIT_FEATURES = (
    "spacePoint_globEdgeHighX", "spacePoint_globEdgeHighY", "spacePoint_globEdgeHighZ",
    "spacePoint_globEdgeLowX", "spacePoint_globEdgeLowY", "spacePoint_globEdgeLowZ",
    "spacePoint_time", "spacePoint_driftR",
    "spacePoint_covXX", "spacePoint_covXY", "spacePoint_covYX", "spacePoint_covYY",
    "spacePoint_channel", "spacePoint_layer", "spacePoint_stationPhi", "spacePoint_stationEta",
    "spacePoint_technology", "spacePoint_stationIndex", "spacePoint_truthLink",
)
TRACK_FEATURES = ("truthMuon_pt", "truthMuon_eta", "truthMuon_phi", "truthMuon_q")
# hepattn's names of the simulated particle fields (`data.particle_sources` of a config)
PARTICLE_SOURCES = {"pt": "truthMuon_pt", "eta": "truthMuon_eta", "phi": "truthMuon_phi", "q": "truthMuon_q"}
MM_PER_M = 1000.0
CHANNELS = 1000
SECTORS = 16
ETA_BIN = 0.25


def hit_columns(hits: dict[str, np.ndarray], num_barrels: int) -> np.ndarray:
    """float32 [H, len(HIT_FEATURES)] hit rows from simulated hits (`EventArrays.hits`, metres)."""
    x, y, z, phi, eta = (hits[k].astype(np.float64) for k in ("x", "y", "z", "phi", "eta"))
    layer = hits["layer"].astype(np.float64)
    turn = (phi + np.pi) / (2 * np.pi)  # [0, 1]
    columns = {
        "spacePoint_globEdgeHighX": x * MM_PER_M, "spacePoint_globEdgeHighY": y * MM_PER_M,
        "spacePoint_globEdgeHighZ": z * MM_PER_M,
        "spacePoint_globEdgeLowX": x * MM_PER_M, "spacePoint_globEdgeLowY": y * MM_PER_M,
        "spacePoint_globEdgeLowZ": z * MM_PER_M,
        "spacePoint_channel": np.minimum(np.floor(turn * CHANNELS), CHANNELS - 1),
        "spacePoint_layer": layer,
        "spacePoint_stationPhi": 1 + np.minimum(np.floor(turn * SECTORS), SECTORS - 1),
        "spacePoint_stationEta": np.floor(eta / ETA_BIN),
        "spacePoint_technology": (layer >= num_barrels).astype(np.float64),
        "spacePoint_stationIndex": layer,
        "spacePoint_truthLink": hits["particle_index"].astype(np.float64),
    }
    out = np.zeros((x.shape[0], len(HIT_FEATURES)), np.float32)
    for i, name in enumerate(HIT_FEATURES):
        if name in columns:
            out[:, i] = columns[name]
    return out


def _write_file(path: Path, chunk, num_barrels: int) -> int:
    """One HDF5 file of the layout from one simulated chunk; returns its number of events."""
    hit_off, part_off = chunk.hit_offsets, chunk.particle_offsets
    n = chunk.event_id.size
    num_hits, num_tracks = np.diff(hit_off), np.diff(part_off)
    rows = hit_columns(chunk.hits, num_barrels)
    tracks = np.stack([chunk.particles[k] for k in ("pt", "eta", "phi", "q")], axis=1).astype(np.float32)
    hits_padded = np.full((n, max(int(num_hits.max(initial=0)), 1), len(HIT_FEATURES)), np.nan, np.float32)
    tracks_padded = np.full((n, max(int(num_tracks.max(initial=0)), 1), len(TRACK_FEATURES)), np.nan, np.float32)
    for e in range(n):
        hits_padded[e, :num_hits[e]] = rows[hit_off[e]:hit_off[e + 1]]
        tracks_padded[e, :num_tracks[e]] = tracks[part_off[e]:part_off[e + 1]]
    with h5py.File(path, "w") as f:
        f.create_dataset("hits", data=hits_padded, chunks=(1, *hits_padded.shape[1:]), compression="lzf")
        f.create_dataset("tracks", data=tracks_padded, chunks=(1, *tracks_padded.shape[1:]))
        f.create_dataset("num_hits", data=num_hits.astype(np.int64))
        f.create_dataset("num_tracks", data=num_tracks.astype(np.int64))
        f.create_dataset("event_numbers", data=chunk.event_id.astype(np.int64))
    return n


def write_atlas_muon_dir(directory, preset: Preset, n_events: int, seed: int, progress: bool = False) -> dict:
    """Simulate `n_events` events of `preset` (the events `write_event_file` would store for the
    same seed) into hepattn's ATLAS-muon layout at `directory`, one HDF5 file per simulated chunk.

    Written into a temporary directory beside `directory` and renamed at the end, so `directory`
    never holds a partial layout; an existing `directory` is replaced only then. Returns counts:
    events, hits, particles, files, seconds.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    start = time.perf_counter()
    totals = {"events": 0, "hits": 0, "particles": 0, "files": 0}
    chunks, file_index, row_index = [], [], []
    try:
        with tqdm(total=n_events, unit="event", disable=not progress, desc=f"simulate {preset.name}") as bar:
            for k, chunk in enumerate(iter_event_chunks(preset, n_events, seed)):
                name = f"events_{k:04d}.h5"
                n = _write_file(tmp / name, chunk, len(preset.barrels))
                chunks.append({"h5_file": name, "num_events": n, "first_event": totals["events"]})
                file_index.append(np.full(n, k, np.int64))
                row_index.append(np.arange(n, dtype=np.int64))
                totals["events"] += n
                totals["hits"] += int(chunk.hit_offsets[-1])
                totals["particles"] += int(chunk.particle_offsets[-1])
                totals["files"] += 1
                bar.update(n)
        np.save(tmp / "event_file_indices.npy", np.concatenate(file_index))
        np.save(tmp / "event_row_indices.npy", np.concatenate(row_index))
        metadata = {
            "hit_features": list(HIT_FEATURES),
            "track_features": list(TRACK_FEATURES),
            "event_mapping": {"total_events": totals["events"], "chunk_summary": chunks},
            "generator": {"program": "cachefeat simulate", "preset": preset.name, "seed": seed},
        }
        (tmp / "metadata.yaml").write_text(yaml.safe_dump(metadata, sort_keys=False))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    totals["seconds"] = time.perf_counter() - start
    log.info("wrote %d %s events (%.1f hits/event, %.2f particles/event) in hepattn's ATLAS-muon layout to %s "
             "in %.1f s", totals["events"], preset.name, totals["hits"] / max(totals["events"], 1),
             totals["particles"] / max(totals["events"], 1), directory, totals["seconds"])
    return totals
