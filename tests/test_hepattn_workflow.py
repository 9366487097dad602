"""A hepattn user's stage 2, end to end through the commands: their config, the Lightning
checkpoint their training wrote, their data module; extract -> info -> verify -> train (cache
and live) -> evaluate; and their mistakes, each one line and exit code 2 with nothing left."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.hepattn
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_extract_verify_train_evaluate(hepattn_config_path, hepattn_checkpoint, tmp_path, run_cli):
    cfg, ckpt = hepattn_config_path, hepattn_checkpoint
    steps = [
        f"extract --config {cfg} --checkpoint {ckpt} --split train --output {tmp_path}/train.zarr --no-progress",
        f"extract --config {cfg} --checkpoint {ckpt} --split val --output {tmp_path}/val.zarr --no-progress",
        f"info {tmp_path}/train.zarr",
        f"verify {tmp_path}/train.zarr --config {cfg} --checkpoint {ckpt} --split train --events 16",
        f"train --config {cfg} --cache {tmp_path}/train.zarr --val-cache {tmp_path}/val.zarr "
        f"--checkpoint {ckpt} --split train --output {tmp_path}/head",
        f"train --config {cfg} --source live --checkpoint {ckpt} --split train --val-split val "
        f"--output {tmp_path}/head-live --max-epochs 1",
        f"evaluate --config {cfg} --head {tmp_path}/head/head.ckpt --cache {tmp_path}/val.zarr "
        f"--output {tmp_path}/eval",
        f"evaluate --config {cfg} --head {tmp_path}/head/head.ckpt --source live --checkpoint {ckpt} --split val "
        f"--output {tmp_path}/eval-live",
    ]
    for line in steps:
        rc, out, err = run_cli(shlex.split(line))
        assert rc == 0, f"{line}\n{out}\n{err}"
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    live = json.loads((tmp_path / "eval-live" / "metrics.json").read_text())
    assert metrics["counts"]["events"] == live["counts"]["events"] == 48
    assert metrics["counts"]["matched"] == live["counts"]["matched"] > 0
    assert metrics["counts"]["fit_ok"] == 0  # evaluate.fit: false, no solenoid helix fit here
    assert metrics["head"]["pt_rel_res68"] == pytest.approx(live["head"]["pt_rel_res68"], rel=1e-4)
    # model.ckpt (backbone + head) holds the hepattn weights unchanged, loadable as a stage 1
    from cachefeat.cache.frozen import FrozenBackbone

    combined = FrozenBackbone(yaml.safe_load(cfg.read_text()), tmp_path / "head" / "model.ckpt")
    theirs = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in combined.model.stage1_module.state_dict().items():
        assert torch.equal(value, theirs[f"model.{key}"]), key


def _write_variant(config: dict, path: Path, edit) -> Path:
    config = json.loads(json.dumps(config))
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _drop_task(name):
    def edit(config):
        modules = config["model"]["init_args"]["tasks"]["init_args"]["modules"]
        modules[:] = [m for m in modules if m["init_args"]["name"] != name]
    return edit


MISTAKES = {
    "input-with-datamodule": ("extract --config {cfg} --checkpoint {ckpt} --input {work}/events.h5 --output {out}",
                              "--input is for HDF5 event files"),
    "split-without-datamodule": ("extract --config {muon_cfg} --checkpoint {ckpt} --split train --output {out}",
                                 "--split needs a config with a data module"),
    "checkpoint-of-muon-model": ("extract --config {cfg} --checkpoint {muon_ckpt} --split train --output {out}",
                                 "does not fit this config: weights"),
    "no-hit-task": ("extract --config {no_hit_task} --checkpoint {ckpt} --split train --output {out}",
                    "no hit-assignment task 'track_hit_valid'"),
    "no-valid-task": ("extract --config {no_valid_task} --checkpoint {ckpt} --split train --output {out}",
                      "no validity task 'track_valid'"),
    "task-typo": ("extract --config {cfg} --checkpoint {ckpt} --split train --output {out} "
                  "--set hepattn.hit_task=track_hit_vaild", "(did you mean 'track_hit_valid'?)"),
    "missing-hit-field": ("extract --config {extra_field} --checkpoint {ckpt} --split train --output {out}",
                          "has no hit field 'driftTime'"),
    "missing-particle-field": ("extract --config {cfg} --checkpoint {ckpt} --split train --output {out} "
                               "--set data.particle_sources.pt=truthMuon_ptt", "no particle_truthMuon_ptt"),
    "train-live-input": ("train --config {cfg} --source live --checkpoint {ckpt} --input {work}/events.h5 "
                         "--val-split val --output {out}", "--input is for HDF5 event files"),
    "pretrain-hepattn": ("pretrain --config {cfg} --train {work}/events.h5 --val {work}/events.h5 --output {out}",
                         "hepattn's run_tracking.py"),
}


@pytest.fixture(scope="module")
def paths(hepattn_config, hepattn_config_path, hepattn_checkpoint, stage1_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("hepattn_errors")
    (work / "events.h5").write_bytes(b"")
    return {
        "work": work, "out": work / "out", "cfg": hepattn_config_path, "ckpt": hepattn_checkpoint,
        "muon_cfg": ROOT / "configs" / "muon.yaml", "muon_ckpt": stage1_checkpoint,
        "no_hit_task": _write_variant(hepattn_config, work / "no_hit.yaml", _drop_task("track_hit_valid")),
        "no_valid_task": _write_variant(hepattn_config, work / "no_valid.yaml", _drop_task("track_valid")),
        "extra_field": _write_variant(hepattn_config, work / "extra.yaml",
                                      lambda c: c["data"]["hit_fields"].append("driftTime")),
    }


@pytest.mark.parametrize("line,fragment", list(MISTAKES.values()), ids=list(MISTAKES))
def test_mistake_is_one_line_and_exit_2(paths, assert_cli_error, line, fragment):
    assert_cli_error(shlex.split(line.format(**paths)), fragment)
    assert not paths["out"].exists()


def test_hepattn_not_importable_says_how_to_install(hepattn_config_path, hepattn_checkpoint, tmp_path):
    """Without hepattn on the path (a user who has not installed it): one line, exit 2, the hint."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-m", "cachefeat", "extract", "--config", str(hepattn_config_path),
                          "--checkpoint", str(hepattn_checkpoint), "--split", "train",
                          "--output", str(tmp_path / "out.zarr")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and "cannot be imported" in lines[0] and "cachefeat[hepattn]" in lines[0], run.stderr
    assert not (tmp_path / "out.zarr").exists()
