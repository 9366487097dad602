"""Crash safety of `cachefeat extract`: SIGKILL mid-run and a full disk, then `--resume`."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from cachefeat.cli import main
from cachefeat.errors import UserError


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_cache(ref, cache, config_file, checkpoint, events_file, tmp_path):
    """Killed while block 1 is being written, resumed and killed again after 2 commits, resumed
    to the end: the same arrays and bytes as the uninterrupted `cache` (3 blocks of 16 events)."""
    from cachefeat.cache.reader import CacheReader

    out = tmp_path / "killed.zarr"
    args = ref.extract_args(config_file, checkpoint, events_file, out)
    ref.kill_when(args, lambda: (out / "blocks" / "000001").exists())
    assert len(ref.committed_blocks(out)) < 3
    assert (out / ".lock").exists()  # left by the killed writer; stale now
    with pytest.raises(UserError, match="incomplete"):
        CacheReader(out)
    ref.assert_committed_blocks_intact(out)

    ref.kill_when([*args, "--resume"], lambda: len(ref.committed_blocks(out)) >= 2)
    assert len(ref.committed_blocks(out)) >= 2  # 3 if the kill came after the last commit, before finalize
    ref.assert_committed_blocks_intact(out)

    assert main(["extract", *args, "--resume"]) == 0
    assert not (out / ".lock").exists()
    ref.assert_same_cache(cache, out)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only); yields (dir, grow) where grow() remounts it at 64 MiB."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or 'not permitted'})")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)

    try:
        yield mnt, grow
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_disk_full_then_resume(ref, capsys, small_disk, cache, config_file, checkpoint, events_file):
    """A full disk: exit 2 with one line naming the cache, only whole blocks committed; after
    the disk grows, --resume completes to the same cache as an uninterrupted run."""
    mnt, grow = small_disk
    out = mnt / "c.zarr"
    args = ["extract", *ref.extract_args(config_file, checkpoint, events_file, out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cachefeat extract: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "disk full" in lines[0] and str(out) in lines[0]
    assert len(ref.committed_blocks(out)) < -(-ref.NUM_EVENTS // 16)
    ref.assert_committed_blocks_intact(out)
    assert not (out / ".lock").exists()

    grow()
    assert main([*args, "--resume"]) == 0
    ref.assert_same_cache(cache, out)


def test_lock_of_a_live_writer_is_respected(ref, capsys, config_file, checkpoint, events_file, tmp_path):
    """A second writer on a cache locked by a running pid is refused with exit 2."""
    out = tmp_path / "locked.zarr"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    code = main(["extract", *ref.extract_args(config_file, checkpoint, events_file, out)])
    assert code == 2 and "locked by pid" in capsys.readouterr().err
