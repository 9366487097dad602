"""Extraction under a 2-process launch (torchrun, gloo on CPU) equals the 1-process extraction."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


@pytest.mark.slow
def test_two_processes_equal_one(ref, cache, config_file, checkpoint, events_file, tmp_path):
    """3 blocks over 2 ranks (rank 0: block 0, rank 1: blocks 1-2): the same arrays and bytes."""
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    out = tmp_path / "two.zarr"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "cachefeat",
            "extract",
            *ref.extract_args(config_file, checkpoint, events_file, out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("extracted 48 events") == 1, result.stderr[-3000:]  # one summary, from rank 0

    arrays_1, arrays_2 = ref.cache_arrays(cache), ref.cache_arrays(out)
    for key in arrays_1:
        assert (arrays_1[key] == arrays_2[key]).all(), key
    assert ref.block_manifests(cache) == ref.block_manifests(out)


def test_cli_destroys_the_process_group(cache, tmp_path):
    """`main` destroys a process group a command ran under before it returns: left to interpreter
    exit, a gloo worker thread still releasing the last collective's tensors aborts the process
    (SIGABRT, "terminate called without an active exception") after a successful extraction."""
    import torch.distributed as dist

    from cachefeat.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert main(["info", str(cache)]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
