"""Fixtures shared across the test suite: the shipped config and stage-1 checkpoint, and small
simulated `muon` event files (session-scoped: simulated once per test run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachefeat.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MUON_CONFIG = ROOT / "configs" / "muon.yaml"
MUON_CHECKPOINT = ROOT / "data" / "muon_stage1.ckpt"


@pytest.fixture(scope="session")
def muon_config() -> dict:
    return load_config(MUON_CONFIG)


@pytest.fixture(scope="session")
def stage1_checkpoint() -> Path:
    return MUON_CHECKPOINT


def _simulate(path: Path, events: int, seed: int) -> Path:
    from cachefeat.data.presets import get_preset
    from cachefeat.data.simulate import write_event_file

    write_event_file(path, get_preset("muon"), events, seed)
    return path


@pytest.fixture(scope="session")
def muon_events(tmp_path_factory) -> Path:
    """160 simulated muon events (seed 21)."""
    return _simulate(tmp_path_factory.mktemp("muon") / "train.h5", 160, 21)


@pytest.fixture(scope="session")
def muon_val_events(tmp_path_factory) -> Path:
    """48 simulated muon events (seed 22)."""
    return _simulate(tmp_path_factory.mktemp("muon") / "val.h5", 48, 22)


def _extract(config, checkpoint, events, out, dtype="float32"):
    from cachefeat.cache.extract import extract
    from cachefeat.cache.reader import CacheReader

    extract(config, checkpoint, events, out, batch_size=24, block_size=64, dtype=dtype, device="cpu",
            progress=False)
    return CacheReader(out)


@pytest.fixture(scope="session")
def cache32(muon_config, stage1_checkpoint, muon_events, tmp_path_factory):
    """float32 cache of `muon_events` (extraction batches of 24 events, blocks of 64)."""
    return _extract(muon_config, stage1_checkpoint, muon_events, tmp_path_factory.mktemp("cache") / "train.zarr")


@pytest.fixture(scope="session")
def val_cache32(muon_config, stage1_checkpoint, muon_val_events, tmp_path_factory):
    return _extract(muon_config, stage1_checkpoint, muon_val_events, tmp_path_factory.mktemp("cache") / "val.zarr")
