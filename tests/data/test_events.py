"""Event files: schema round-trip, padded batches against a per-event loop, errors, bucketing."""

import json
import pickle
import shutil
from dataclasses import replace

import h5py
import numpy as np
import pytest

from cachefeat.data.events import HIT_FIELDS, PARTICLE_FIELDS, SCHEMA_VERSION, EventFile, bucketed_batches
from cachefeat.data.presets import MuonPreset
from cachefeat.data.simulate import simulate_events, write_event_file
from cachefeat.errors import UserError

# Small events, some of them empty (no particles, no noise), in chunks of 8.
PRESET = replace(MuonPreset(), n_particles=(0, 2), n_noise=(0, 2), events_per_chunk=8)
N_EVENTS = 30


@pytest.fixture(scope="module")
def event_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("events") / "events.h5"
    write_event_file(path, PRESET, N_EVENTS, seed=4)
    return path


@pytest.fixture(scope="module")
def arrays():
    return simulate_events(PRESET, N_EVENTS, seed=4)


def dense_reference(a, indices, hit_fields, particle_fields):
    """The padded batch built event by event with Python loops."""
    B = len(indices)
    hit_n = [a.hit_offsets[e + 1] - a.hit_offsets[e] for e in indices]
    part_n = [a.particle_offsets[e + 1] - a.particle_offsets[e] for e in indices]
    M, P = max(max(hit_n), 1), max(max(part_n), 1)
    ref = {"event_id": np.array([a.event_id[e] for e in indices]),
           "hit_valid": np.zeros((B, M), bool), "hit_particle_index": np.full((B, M), -1),
           "particle_valid": np.zeros((B, P), bool), "particle_hit_valid": np.zeros((B, P, M), bool)}
    for f in hit_fields:
        ref[f"hit_{f}"] = np.zeros((B, M), np.float32)
    for f in particle_fields:
        ref[f"particle_{f}"] = np.zeros((B, P), np.float32)
    for b, e in enumerate(indices):
        for m in range(hit_n[b]):
            row = a.hit_offsets[e] + m
            ref["hit_valid"][b, m] = True
            for f in hit_fields:
                ref[f"hit_{f}"][b, m] = a.hits[f][row]
            p = a.hits["particle_index"][row]
            ref["hit_particle_index"][b, m] = p
            if p >= 0:
                ref["particle_hit_valid"][b, p, m] = True
        for p in range(part_n[b]):
            ref["particle_valid"][b, p] = True
            for f in particle_fields:
                ref[f"particle_{f}"][b, p] = a.particles[f][a.particle_offsets[e] + p]
    return ref


def test_file_layout_and_attributes(event_file, arrays):
    with h5py.File(event_file) as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert json.loads(f.attrs["hit_fields"]) == list(HIT_FIELDS)
        assert json.loads(f.attrs["particle_fields"]) == list(PARTICLE_FIELDS)
        assert json.loads(f.attrs["generator"])["seed"] == 4
        assert f.attrs["preset"] == "muon" and f.attrs["seed"] == 4
        assert json.loads(f.attrs["units"])["hits"]["x"] == "m"
        for k in HIT_FIELDS:
            assert f[f"hits/{k}"].dtype == np.float32
            np.testing.assert_array_equal(f[f"hits/{k}"][:], arrays.hits[k])
        assert f["hits/particle_index"].dtype == np.int32
        for k in PARTICLE_FIELDS:
            np.testing.assert_array_equal(f[f"particles/{k}"][:], arrays.particles[k])
        for k in ("hit_offsets", "particle_offsets", "event_id"):
            assert f[f"events/{k}"].dtype == np.int64
        np.testing.assert_array_equal(f["events/hit_offsets"][:], arrays.hit_offsets)
        assert f["hits/x"].compression == "lzf" and f["hits/x"].shuffle and f["hits/x"].chunks


def test_read_matches_a_per_event_loop(event_file, arrays):
    hit_fields, particle_fields = ["x", "phi", "layer"], ["pt", "q"]
    counts = np.diff(arrays.hit_offsets)
    assert (counts == 0).any(), "the fixture should hold an empty event"
    rng = np.random.default_rng(0)
    with EventFile(event_file, hit_fields, particle_fields) as f:
        assert len(f) == N_EVENTS
        np.testing.assert_array_equal(f.hit_counts, counts)
        np.testing.assert_array_equal(f.particle_counts, np.diff(arrays.particle_offsets))
        for indices in ([0], [np.flatnonzero(counts == 0)[0]], [5, 3, 4, 29, 3], rng.permutation(N_EVENTS)):
            batch = f.read(indices)
            ref = dense_reference(arrays, list(indices), hit_fields, particle_fields)
            assert set(batch) == set(ref)
            for k, v in ref.items():
                np.testing.assert_array_equal(batch[k].numpy(), v, err_msg=k)
            assert batch["hit_x"].dtype.is_floating_point and batch["hit_particle_index"].dtype.itemsize == 8
        empty = f.read([])
        assert empty["hit_x"].shape == (0, 1) and empty["particle_hit_valid"].shape == (0, 1, 1)


def test_pickled_event_file_reopens(event_file):
    with EventFile(event_file, ["x"], ["pt"]) as f:
        first = f.read([1, 2])["hit_x"]
        g = pickle.loads(pickle.dumps(f))
        np.testing.assert_array_equal(g.read([1, 2])["hit_x"], first)
        g.close()


def test_content_hash_ignores_path_and_attributes(event_file, tmp_path):
    copy = tmp_path / "copy.h5"
    shutil.copy(event_file, copy)
    with h5py.File(copy, "a") as f:
        f.attrs["generator"] = "{}"
    with EventFile(event_file, ["x"], ["pt"]) as a, EventFile(copy, ["x"], ["pt"]) as b:
        assert a.content_hash() == b.content_hash()
    with h5py.File(copy, "a") as f:
        f["hits/layer"][3] += 1
    with EventFile(copy, ["x"], ["pt"]) as b:
        assert a.content_hash() != b.content_hash()


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="event file not found: .*nope.h5"):
        EventFile(tmp_path / "nope.h5", ["x"], ["pt"])
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(UserError, match="text.h5 is not an HDF5 file"):
        EventFile(text, ["x"], ["pt"])
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
    with pytest.raises(UserError, match="not a cachefeat event file"):
        EventFile(other, ["x"], ["pt"])


def test_missing_field(event_file):
    with pytest.raises(UserError, match=r"events.h5: no hit field 'rr' \(did you mean 'r'\?\)"):
        EventFile(event_file, ["x", "rr"], ["pt"])
    with pytest.raises(UserError, match="no particle field 'charge'"):
        EventFile(event_file, ["x"], ["charge"])


def test_wrong_schema_version(event_file, tmp_path):
    copy = tmp_path / "old.h5"
    shutil.copy(event_file, copy)
    with h5py.File(copy, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(UserError, match="old.h5: event schema_version 99 is not supported \\(expected 1\\)"):
        EventFile(copy, ["x"], ["pt"])


def test_nan_in_a_field_names_field_and_event(event_file, arrays, tmp_path):
    copy = tmp_path / "nan.h5"
    shutil.copy(event_file, copy)
    event = int(np.flatnonzero(np.diff(arrays.hit_offsets) > 3)[2])
    with h5py.File(copy, "a") as f:
        f["hits/eta"][arrays.hit_offsets[event] + 2] = np.nan
    with EventFile(copy, ["x", "eta"], ["pt"]) as f:
        f.read([event - 1])
        with pytest.raises(UserError, match=f"hit field 'eta' is NaN or infinite in event {event}$"):
            f.read([0, event])


def test_corrupt_chunk_is_a_user_error(event_file, tmp_path):
    copy = tmp_path / "corrupt.h5"
    shutil.copy(event_file, copy)
    with h5py.File(copy) as f:
        info = f["hits/z"].id.get_chunk_info(0)
    with open(copy, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with EventFile(copy, ["x", "z"], ["pt"]) as f:
        with pytest.raises(UserError, match="corrupt.h5: cannot read hits/z"):
            f.read([0])


def test_too_many_hits(event_file, arrays):
    counts = np.diff(arrays.hit_offsets)
    big = int(np.argmax(counts))
    with EventFile(event_file, ["x"], ["pt"], max_hits=int(counts[big]) - 1) as f:
        small = int(np.flatnonzero(counts < counts[big])[0])
        f.read([small])
        message = f"event {big} has {counts[big]} hits, more than max_hits={counts[big] - 1}"
        with pytest.raises(UserError, match=message):
            f.read([small, big])


def test_bucketed_batches_by_hand():
    counts = np.array([5, 1, 4, 2, 3, 0])
    got = bucketed_batches(counts, batch_size=2, seed=None, bucket_size=2)
    assert [b.tolist() for b in got] == [[1, 3], [2, 0], [5, 4]]


def test_bucketed_batches_partition_determinism_and_epochs():
    counts = np.random.default_rng(1).integers(0, 600, 1000)
    for seed in (None, 3):
        for epoch in (0, 1):
            batches = bucketed_batches(counts, 16, seed=seed, epoch=epoch, bucket_size=4)
            flat = np.concatenate(batches)
            np.testing.assert_array_equal(np.sort(flat), np.arange(1000))
            assert all(b.dtype == np.int64 for b in batches)
            assert sum(len(b) != 16 for b in batches) <= 1
            again = bucketed_batches(counts, 16, seed=seed, epoch=epoch, bucket_size=4)
            assert all(np.array_equal(x, y) for x, y in zip(batches, again))
    a = bucketed_batches(counts, 16, seed=3, epoch=0)
    b = bucketed_batches(counts, 16, seed=3, epoch=1)
    c = bucketed_batches(counts, 16, seed=4, epoch=0)
    assert not np.array_equal(np.concatenate(a), np.concatenate(b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    # Bucketing reduces padding against random batches of the same size.
    padded = sum(len(x) * counts[x].max() for x in a)
    perm = np.random.default_rng(0).permutation(1000)
    random_padded = sum(16 * counts[perm[i:i + 16]].max() for i in range(0, 1000, 16))
    assert padded < 0.8 * random_padded
    # Without a seed, events stay inside their window of bucket_size * batch_size events.
    for i, x in enumerate(bucketed_batches(counts, 16, seed=None, bucket_size=4)):
        assert x.min() // 64 == x.max() // 64 == i // 4


def test_bucketed_batches_rejects_bad_sizes():
    with pytest.raises(UserError, match="batch_size"):
        bucketed_batches(np.ones(4), 0)
