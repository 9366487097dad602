"""`cachefeat simulate` end to end: the file it writes, overwrite protection, usage errors."""

import subprocess
import sys

import numpy as np
import pytest

from cachefeat.cli import main
from cachefeat.data.events import HIT_FIELDS, PARTICLE_FIELDS, EventFile
from cachefeat.data.presets import MuonPreset
from cachefeat.data.simulate import simulate_events


def test_simulate_writes_the_seeded_events(tmp_path):
    out = tmp_path / "x.h5"
    assert main(["simulate", "--preset", "muon", "--events", "200", "--seed", "1", "--output", str(out)]) == 0
    expected = simulate_events(MuonPreset(), 200, seed=1)
    with EventFile(out, list(HIT_FIELDS), list(PARTICLE_FIELDS)) as f:
        assert len(f) == 200
        np.testing.assert_array_equal(f.hit_counts, np.diff(expected.hit_offsets))
        assert f.metadata["preset"] == "muon" and f.metadata["seed"] == 1
        assert f.metadata["generator"]["preset"]["efficiency"] == MuonPreset().efficiency
    assert list(tmp_path.iterdir()) == [out], "no temporary file left behind"


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "x.h5"
    args = ["simulate", "--preset", "muon", "--events", "3", "--output", str(out)]
    assert main(args) == 0
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--seed", "2"]) == 0


@pytest.mark.parametrize("bad", [["--preset", "muons"], ["--preset", "muon", "--events", "0"],
                                 ["--preset", "muon", "--events", "2", "--seed", "-1"]])
def test_usage_errors_exit_2(tmp_path, bad):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", *bad, "--output", str(tmp_path / "x.h5")])
    assert exc.value.code == 2


def test_bad_preset_from_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cachefeat", "simulate", "--preset", "atlas", "--events", "1",
                           "--output", str(tmp_path / "x.h5")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice: 'atlas'" in proc.stderr and "Traceback" not in proc.stderr
