"""Extraction of a hepattn data-module split is crash safe and parallel like an HDF5 one: SIGKILL
mid-run then `--resume` gives the same arrays and bytes as an uninterrupted run, and a 2-process
launch equals 1 process. Its events are read in a worker process by default (`extract.read_workers`):
the same cache as reading them on a thread, or in two workers. The validation split (48 events) in
blocks of 16."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from cachefeat.cli import main

pytestmark = pytest.mark.hepattn


def _args(config_path, checkpoint, output) -> list[str]:
    return ["--config", str(config_path), "--checkpoint", str(checkpoint), "--split", "val", "--output", str(output),
            "--no-progress", "--set", "extract.block_size=16"]


@pytest.fixture(scope="module")
def uninterrupted(hepattn_config_path, hepattn_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("hepattn_extract") / "val.zarr"
    assert main(["extract", *_args(hepattn_config_path, hepattn_checkpoint, out)]) == 0
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_events_read_on_a_thread_or_in_two_workers_give_the_same_cache(ref, uninterrupted, hepattn_config_path,
                                                                     hepattn_checkpoint, tmp_path, workers):
    out = tmp_path / "read.zarr"
    args = [*_args(hepattn_config_path, hepattn_checkpoint, out), "--set", f"extract.read_workers={workers}"]
    assert main(["extract", *args]) == 0
    ref.assert_same_cache(uninterrupted, out)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_cache(ref, uninterrupted, hepattn_config_path, hepattn_checkpoint,
                                                  tmp_path):
    out = tmp_path / "killed.zarr"
    args = _args(hepattn_config_path, hepattn_checkpoint, out)
    ref.kill_when(args, lambda: (out / "blocks" / "000001").exists())
    assert len(ref.committed_blocks(out)) < 3
    ref.assert_committed_blocks_intact(out)
    assert main(["extract", *args, "--resume"]) == 0
    ref.assert_same_cache(uninterrupted, out)


@pytest.mark.slow
def test_two_processes_equal_one(ref, uninterrupted, hepattn_config_path, hepattn_checkpoint, tmp_path):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    out = tmp_path / "two.zarr"
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "cachefeat", "extract",
                             *_args(hepattn_config_path, hepattn_checkpoint, out)],
                            env={**os.environ, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("extracted 48 events") == 1, result.stderr[-3000:]
    ref.assert_same_cache(uninterrupted, out)
