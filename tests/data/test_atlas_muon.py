"""Simulated events in hepattn's ATLAS-muon layout (`cachefeat simulate --layout atlas-muon`):
the files hold the simulated events, hepattn's own loader (`AtlasMuonDataset`, dummy_data off)
reads them back as those events, and cachefeat reads hepattn's real data path through the
data module, fingerprinted by the files' bytes."""

from __future__ import annotations

import copy
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import yaml

from cachefeat.data.atlas_muon import HIT_FEATURES, PARTICLE_SOURCES, TRACK_FEATURES, write_atlas_muon_dir
from cachefeat.data.datamodule import DataSplit
from cachefeat.data.loading import open_events
from cachefeat.data.presets import PRESETS
from cachefeat.data.simulate import simulate_events

N_EVENTS, SEED = 40, 7


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    directory = tmp_path_factory.mktemp("atlas_muon") / "train"
    write_atlas_muon_dir(directory, PRESETS["muon"], N_EVENTS, SEED)
    return directory


@pytest.fixture(scope="module")
def simulated():
    return simulate_events(PRESETS["muon"], N_EVENTS, SEED)


def test_files_hold_the_simulated_events(layout, simulated):
    """Read with h5py and numpy alone: event k's rows are the simulated event k (positions in mm,
    truth links = particle index), NaN padding after them, tracks = the particles in order."""
    meta = yaml.safe_load((layout / "metadata.yaml").read_text())
    assert meta["hit_features"] == list(HIT_FEATURES) and meta["track_features"] == list(TRACK_FEATURES)
    files = np.load(layout / "event_file_indices.npy")
    rows = np.load(layout / "event_row_indices.npy")
    assert len(files) == len(rows) == N_EVENTS
    col = {name: i for i, name in enumerate(HIT_FEATURES)}
    for k in (0, 17, N_EVENTS - 1):
        lo, hi = simulated.hit_offsets[k], simulated.hit_offsets[k + 1]
        plo, phi = simulated.particle_offsets[k], simulated.particle_offsets[k + 1]
        with h5py.File(layout / meta["event_mapping"]["chunk_summary"][files[k]]["h5_file"]) as f:
            n, t = int(f["num_hits"][rows[k]]), int(f["num_tracks"][rows[k]])
            hits, tracks = f["hits"][rows[k]], f["tracks"][rows[k]]
            assert int(f["event_numbers"][rows[k]]) == simulated.event_id[k]
        assert (n, t) == (hi - lo, phi - plo)
        for ours, axis in (("x", "X"), ("y", "Y"), ("z", "Z")):
            for edge in ("Low", "High"):
                np.testing.assert_allclose(hits[:n, col[f"spacePoint_globEdge{edge}{axis}"]],
                                           simulated.hits[ours][lo:hi] * 1000.0, rtol=1e-6)
        assert np.array_equal(hits[:n, col["spacePoint_truthLink"]], simulated.hits["particle_index"][lo:hi])
        assert np.array_equal(hits[:n, col["spacePoint_layer"]], simulated.hits["layer"][lo:hi])
        assert np.isnan(hits[n:]).all() and np.isnan(tracks[t:]).all()
        for i, name in enumerate(("pt", "eta", "phi", "q")):
            assert np.array_equal(tracks[:t, i], simulated.particles[name][plo:phi]), name


def test_no_partial_directory_and_overwrite_replaces(tmp_path):
    target = tmp_path / "events"
    write_atlas_muon_dir(target, PRESETS["muon"], 3, 1)
    first = (target / "events_0000.h5").read_bytes()
    write_atlas_muon_dir(target, PRESETS["muon"], 5, 2)
    assert (target / "events_0000.h5").read_bytes() != first
    assert len(np.load(target / "event_row_indices.npy")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events"]  # no temporary directory left


def test_cli_refuses_an_existing_output(tmp_path):
    target = tmp_path / "events"
    target.mkdir()
    run = subprocess.run([sys.executable, "-m", "cachefeat", "simulate", "--preset", "muon", "--events", "2",
                          "--layout", "atlas-muon", "--output", str(target)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--overwrite" in run.stderr
    assert list(target.iterdir()) == []


@pytest.mark.hepattn
def test_hepattns_loader_reads_the_simulated_events(hepattn_src, layout, simulated):
    """hepattn's `AtlasMuonDataset` (its real-data path) gives back the simulated events: its derived
    r, phi, eta (from the mm positions it rescales to m) equal the simulation's, its hit-to-particle
    masks are the truth links, its regression targets the particles."""
    from hepattn.experiments.atlas_muon.data import AtlasMuonDataset

    dataset = AtlasMuonDataset(dirpath=str(layout), inputs={"hit": ["r", "phi", "eta", "spacePoint_globEdgeLowZ"]},
                               targets={"particle": list(TRACK_FEATURES)}, num_events=N_EVENTS,
                               event_max_num_particles=2)
    for k in (0, 17, N_EVENTS - 1):
        inputs, targets = dataset[k]
        lo, hi = simulated.hit_offsets[k], simulated.hit_offsets[k + 1]
        plo, phi_ = simulated.particle_offsets[k], simulated.particle_offsets[k + 1]
        for ours in ("r", "phi", "eta"):
            np.testing.assert_allclose(inputs[f"hit_{ours}"][0].numpy(), simulated.hits[ours][lo:hi],
                                       rtol=2e-5, atol=2e-5, err_msg=ours)
        np.testing.assert_allclose(inputs["hit_spacePoint_globEdgeLowZ"][0].numpy(), simulated.hits["z"][lo:hi],
                                   rtol=1e-6, atol=1e-7)
        links = simulated.hits["particle_index"][lo:hi]
        n_particles = phi_ - plo
        assert targets["particle_valid"][0].tolist() == [j < n_particles for j in range(2)]
        for j in range(n_particles):
            assert np.array_equal(targets["particle_hit_valid"][0, j].numpy(), links == j)
            for ours, theirs in PARTICLE_SOURCES.items():
                assert float(targets[f"particle_{theirs}"][0, j]) == float(simulated.particles[ours][plo + j])


@pytest.mark.hepattn
def test_datamodule_reads_the_layout_and_hashes_its_files(hepattn_config, layout, simulated):
    """cachefeat's data-module source over hepattn's real data path: the batch holds the simulated
    values, in the order hepattn's dataset gives them, and the fingerprint follows the files' bytes
    (one byte changed in an HDF5 chunk file changes it)."""
    config = copy.deepcopy(hepattn_config)
    init = config["data"]["module"]["init_args"]
    init.update(dummy_data=False, train_dir=str(layout), val_dir=str(layout), test_dir=str(layout),
                num_train=N_EVENTS, num_val=N_EVENTS, num_test=N_EVENTS)
    events = open_events(config, DataSplit("train"))
    batch = events.read(np.array([3, 0]))
    for b, k in enumerate((3, 0)):
        lo, hi = simulated.hit_offsets[k], simulated.hit_offsets[k + 1]
        n = int(batch["hit_valid"][b].sum())
        assert n == hi - lo
        np.testing.assert_allclose(batch["hit_spacePoint_globEdgeLowX"][b, :n].numpy(),
                                   simulated.hits["x"][lo:hi], rtol=1e-6, atol=1e-7)
        plo, phi_ = simulated.particle_offsets[k], simulated.particle_offsets[k + 1]
        assert torch.equal(batch["particle_pt"][b, :phi_ - plo], torch.from_numpy(simulated.particles["pt"][plo:phi_]))
    base = events.content_hash()

    assert open_events(config, DataSplit("train")).content_hash() == base
    chunk = layout / "events_0000.h5"
    original = chunk.read_bytes()
    try:
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        chunk.write_bytes(bytes(data))
        assert open_events(config, DataSplit("train")).content_hash() != base
    finally:
        chunk.write_bytes(original)
