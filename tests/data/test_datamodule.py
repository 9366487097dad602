"""Events from a hepattn data module (`AtlasMuonDataModule`, `dummy_data: true`) read as
cachefeat's padded batches: the same events as hepattn's dataset gives, deterministic in any
order and process, fingerprinted by the data config."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cachefeat.data.datamodule import DataModuleEvents, DataSplit
from cachefeat.data.loading import open_events, resolve_input
from cachefeat.errors import UserError

pytestmark = pytest.mark.hepattn


@pytest.fixture(scope="module")
def events(hepattn_config) -> DataModuleEvents:
    return open_events(hepattn_config, DataSplit("train"))


def test_events_are_the_datasets(events, hepattn_config):
    """Event k of the batch == item k of hepattn's own dataset (read under the same torch seed),
    valid hits first, particle fields renamed by data.particle_sources."""
    data = hepattn_config["data"]
    batch = events.read(np.array([11, 2]))
    for b, k in enumerate((11, 2)):
        torch.manual_seed(data["seed"] * 1_000_003 + k)
        inputs, targets = events.dataset[k]
        n = inputs["hit_valid"].shape[-1]
        assert batch["hit_valid"][b].sum() == n and batch["hit_valid"][b, :n].all()
        for field in data["hit_fields"]:
            assert torch.equal(batch[f"hit_{field}"][b, :n], inputs[f"hit_{field}"][0].float()), field
        assert torch.equal(batch["particle_valid"][b, :2], targets["particle_valid"][0])
        assert torch.equal(batch["particle_hit_valid"][b, :2, :n], targets["particle_hit_valid"][0])
        for ours, theirs in data["particle_sources"].items():
            assert torch.equal(batch[f"particle_{ours}"][b, :2], targets[f"particle_{theirs}"][0]), ours
    assert batch["event_id"].tolist() == [11, 2]


def test_reads_are_deterministic_in_any_order(events, hepattn_config):
    """hepattn's dummy events draw hit-to-particle links from torch's global RNG: seeded per event,
    an event is the same alone, in another batch, in a new reader, whatever the global RNG did."""
    first = events.read(np.array([5, 9, 1]))
    torch.manual_seed(12345)
    torch.rand(100)
    alone = events.read(np.array([9]))
    again = open_events(hepattn_config, DataSplit("train")).read(np.array([1, 5, 9]))
    n = int(alone["hit_valid"].sum())
    for key in ("hit_valid", "particle_hit_valid", "hit_phi", "particle_pt"):
        assert torch.equal(first[key][1, ..., :n] if key != "particle_pt" else first[key][1],
                           alone[key][0, ..., :n] if key != "particle_pt" else alone[key][0]), key
        assert torch.equal(first[key][0], again[key][1][..., :first[key].shape[-1]]), key


def test_reads_are_deterministic_while_torch_compile_runs_on_another_thread(events):
    """torch.compile saves torch's global RNG state before each compilation and restores it after;
    an event drawn on another thread meanwhile must not draw from the restored state (extraction
    reads events on one thread while hepattn's compiled matching costs compile on another)."""
    import threading

    expected = [events.read(np.array([k]))["particle_hit_valid"] for k in range(len(events))]
    done, compiled = threading.Event(), [0]

    def compile_many():  # 60 compilations: a new code object each, eager backend (tracing only)
        try:
            x = torch.ones(3)
            for i in range(60):
                scope = {}
                exec(f"def f(x):\n    return x * {i} + 1", scope)  # noqa: S102
                torch.compile(scope["f"], backend="eager")(x)
                compiled[0] += 1
        finally:
            done.set()

    thread = threading.Thread(target=compile_many)
    thread.start()
    reads, between = 0, set()  # between: how many compilations had finished at each read
    while not done.is_set():
        between.add(compiled[0])
        k = reads % len(events)
        got = events.read(np.array([k]))["particle_hit_valid"]
        assert torch.equal(got, expected[k]), f"event {k}, read {reads}, differs while torch.compile ran"
        reads += 1
    thread.join()
    assert len(between) >= 3  # the reads fell between several of the compilations (18-34 here)


def test_block_batches_are_reads_bucketed_by_hit_count(events):
    """Extraction's batches: every event of the block once, batches of similar hit counts (sorted
    within the block's window), each batch equal to `read` of its events."""
    seen = []
    for local, batch in events.block_batches(20, 60, 16):
        expected = events.read(20 + local)
        assert batch.keys() == expected.keys()
        for key in batch:
            assert torch.equal(batch[key], expected[key]), key
        seen.append(local)
    order = np.concatenate(seen)
    assert sorted(order.tolist()) == list(range(40))
    counts = [int(events.read(np.array([20 + i]))["hit_valid"].sum()) for i in order]
    assert counts == sorted(counts)


def test_fingerprint_follows_the_data_config(hepattn_config):
    base = open_events(hepattn_config, DataSplit("train")).content_hash()
    assert open_events(hepattn_config, DataSplit("train")).content_hash() == base
    assert open_events(hepattn_config, DataSplit("val")).content_hash() != base
    for key, value in (("seed", 1), ("module.init_args.num_train", 150)):
        config = copy.deepcopy(hepattn_config)
        node = config["data"]
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
        assert open_events(config, DataSplit("train")).content_hash() != base, key


def test_missing_fields_are_named(hepattn_config):
    config = copy.deepcopy(hepattn_config)
    config["data"]["hit_fields"] = [*config["data"]["hit_fields"], "driftTime"]
    with pytest.raises(UserError, match="event 0 has no hit field 'driftTime'"):
        open_events(config, DataSplit("train")).read(np.array([0]))
    config = copy.deepcopy(hepattn_config)
    config["data"]["particle_sources"]["pt"] = "truthMuon_ptt"
    with pytest.raises(UserError, match="no particle_truthMuon_ptt in its targets"):
        open_events(config, DataSplit("train")).read(np.array([0]))


def test_input_and_split_are_exclusive(hepattn_config, muon_config):
    with pytest.raises(UserError, match="--input is for HDF5 event files.*--split"):
        resolve_input(hepattn_config, "train.h5", None)
    with pytest.raises(UserError, match="--split needs a config with a data module"):
        resolve_input(muon_config, None, "train")
    assert resolve_input(hepattn_config, None, "val") == DataSplit("val")
    assert resolve_input(muon_config, "x.h5", None) == "x.h5"
