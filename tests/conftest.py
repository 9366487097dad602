"""Fixtures shared across the test suite: the shipped config and stage-1 checkpoint, and small
simulated `muon` event files (session-scoped: simulated once per test run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cachefeat.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MUON_CONFIG = ROOT / "configs" / "muon.yaml"
MUON_CHECKPOINT = ROOT / "data" / "muon_stage1.ckpt"


def pytest_configure(config):
    """One intra-op torch thread for the whole run, here and (OMP_NUM_THREADS) in the commands the
    tests start. Results of some kernels depend on the thread count in their last bits (measured:
    torch 2.13's CPU scaled_dot_product_attention with 2 queries and an odd number of keys, on an
    AMD EPYC, 1 vs 2 threads), and tests compare caches byte for byte across processes (torchrun
    ranks start with one thread) and across fixtures built at different points of the run; the
    run's thread count must not depend on which tests ran before. Tiny tensors: one thread is
    also as fast, and immune to OpenMP spinning on a busy machine."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def run_cli(capsys):
    """`run_cli(argv)`: `cachefeat ARGV` in-process -> (exit code, stdout, stderr)."""
    from cachefeat.cli import main

    def run(argv) -> tuple[int, str, str]:
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture
def assert_cli_error(run_cli):
    """`assert_cli_error(argv, fragment)`: the command fails as a user mistake must: exit code 2, one
    line `cachefeat COMMAND: error: ...` containing `fragment`, no traceback."""

    def check(argv, fragment: str) -> None:
        rc, _, err = run_cli(argv)
        lines = err.strip().splitlines()
        assert rc == 2, err
        assert len(lines) == 1, err
        assert lines[0].startswith(f"cachefeat {argv[0]}: error: "), lines[0]
        assert fragment in lines[0]
        assert "Traceback" not in err

    return check


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


HEPATTN_CONFIG = ROOT / "configs" / "hepattn_muon.yaml"
# The shipped hepattn config at test size: hepattn's generated events, 160 training and 48
# validation events as for the muon fixtures, small blocks and batches.
HEPATTN_TEST_OVERRIDES = [
    "data.module.init_args.num_train=160", "data.module.init_args.num_val=48", "data.module.init_args.num_test=48",
    "extract.batch_size=24", "extract.block_size=64", "train.batch_size=16", "train.epochs=2",
]


@pytest.fixture(scope="session")
def hepattn_config(hepattn_src) -> dict:
    return load_config(HEPATTN_CONFIG, HEPATTN_TEST_OVERRIDES)


@pytest.fixture(scope="session")
def hepattn_config_path(hepattn_config, tmp_path_factory) -> Path:
    """`hepattn_config` as a file, for the commands."""
    import yaml

    path = tmp_path_factory.mktemp("hepattn") / "hepattn_muon.yaml"
    path.write_text(yaml.safe_dump(hepattn_config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def hepattn_checkpoint(hepattn_config_path, tmp_path_factory) -> Path:
    """A Lightning checkpoint written by hepattn's own training (its LightningCLI fit, `ModelWrapper`,
    the config's data module) after 4 steps on its generated events: tests/fit_hepattn_stage1.py."""
    import subprocess
    import sys

    log_dir = tmp_path_factory.mktemp("hepattn_fit")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "fit_hepattn_stage1.py"), str(hepattn_config_path),
                          str(log_dir), "4"], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"hepattn's fit failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return Path(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def hepattn_train_split():
    from cachefeat.data.datamodule import DataSplit

    return DataSplit("train")


@pytest.fixture(scope="session")
def hepattn_val_split():
    from cachefeat.data.datamodule import DataSplit

    return DataSplit("val")


@pytest.fixture(scope="session")
def hepattn_cache32(hepattn_config, hepattn_checkpoint, hepattn_train_split, tmp_path_factory):
    """float32 cache of the training split through the hepattn checkpoint (batches of 24, blocks of 64)."""
    return _extract(hepattn_config, hepattn_checkpoint, hepattn_train_split,
                    tmp_path_factory.mktemp("hepattn_cache") / "train.zarr")


@pytest.fixture(scope="session")
def hepattn_val_cache32(hepattn_config, hepattn_checkpoint, hepattn_val_split, tmp_path_factory):
    return _extract(hepattn_config, hepattn_checkpoint, hepattn_val_split,
                    tmp_path_factory.mktemp("hepattn_cache") / "val.zarr")
