"""The error experience across commands: every user mistake is one clear line on stderr,
`cachefeat <command>: error: ...`, exit code 2, no traceback (unless `--debug`), and nothing new
left behind; every command's `--help` shows an example.

Most rows run in-process through `cachefeat.cli.main`; a few run `python -m cachefeat` to
prove the exit code as the shell sees it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
import yaml

from cachefeat.cli import build_parser, main
from cachefeat.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "muon.yaml"
CHECKPOINT = ROOT / "data" / "muon_stage1.ckpt"


def registered_commands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


COMMANDS = registered_commands()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """`train` builds an Accelerator in-process: start from, and leave, no global Accelerate state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, cache32, muon_config) -> dict:
    """Small inputs for the mistakes: 20 events, broken variants of files, another checkpoint and
    a cache extracted with it, a head trained (in name) on `cache32`."""
    from cachefeat.cache.extract import extract
    from cachefeat.config import instantiate
    from cachefeat.data.presets import get_preset
    from cachefeat.data.simulate import write_event_file
    from cachefeat.head.checkpoint import build_head
    from cachefeat.model.checkpoint import load_checkpoint, load_model_state, save_checkpoint, weights_sha256

    work = tmp_path_factory.mktemp("errors")
    p = {"work": work, "config": CONFIG, "ckpt": CHECKPOINT, "cache": Path(cache32.path)}

    p["events"] = work / "events.h5"
    write_event_file(p["events"], get_preset("muon"), 20, 5)
    p["no_eta"] = work / "no_eta.h5"
    shutil.copy(p["events"], p["no_eta"])
    with h5py.File(p["no_eta"], "a") as f:
        del f["hits/eta"]
    p["text"] = work / "notes.txt"
    p["text"].write_text("not an HDF5 file\n")
    p["truncated"] = work / "truncated.h5"
    p["truncated"].write_bytes(p["events"].read_bytes()[: p["events"].stat().st_size // 2])
    p["nan_hit"] = work / "nan_hit.h5"
    shutil.copy(p["events"], p["nan_hit"])
    with h5py.File(p["nan_hit"], "a") as f:
        offsets = f["events/hit_offsets"][:]
        x = f["hits/x"][:]
        x[offsets[13] + 2] = float("nan")  # a hit of the 14th event, read in the first batch
        f["hits/x"][:] = x

    config = yaml.safe_load(CONFIG.read_text())
    typo = json.loads(json.dumps(config))
    typo["train"]["lr_rate"] = typo["train"].pop("lr")
    p["typo_config"] = work / "typo.yaml"
    p["typo_config"].write_text(yaml.safe_dump(typo))
    head_typo = json.loads(json.dumps(config))
    head_typo["head"]["init_args"]["hiden_dim"] = head_typo["head"]["init_args"].pop("hidden_dim", 64)
    p["head_typo_config"] = work / "head_typo.yaml"
    p["head_typo_config"].write_text(yaml.safe_dump(head_typo))
    section_typo = {("trian" if k == "train" else k): v for k, v in config.items()}
    p["section_typo_config"] = work / "section_typo.yaml"
    p["section_typo_config"].write_text(yaml.safe_dump(section_typo))
    sweep_config = {**config, "sweep": {"variants": [{"name": "a", "head.init_args.dropout": 1.5}]}}
    p["sweep_config"] = work / "sweep.yaml"
    p["sweep_config"].write_text(yaml.safe_dump(sweep_config))
    no_data = {k: v for k, v in config.items() if k != "data"}
    p["no_data_config"] = work / "no_data.yaml"
    p["no_data_config"].write_text(yaml.safe_dump(no_data))

    model = instantiate(muon_config["model"], "model", hit_fields=muon_config["data"]["hit_fields"])
    load_model_state(model, load_checkpoint(CHECKPOINT))
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    p["other_ckpt"] = work / "other.ckpt"
    save_checkpoint(p["other_ckpt"], model, muon_config)
    p["other_cache"] = work / "other.zarr"
    extract(muon_config, p["other_ckpt"], p["events"], p["other_cache"], device="cpu", progress=False)

    p["incomplete"] = work / "incomplete.zarr"
    shutil.copytree(p["other_cache"], p["incomplete"])
    meta = json.loads((p["incomplete"] / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (p["incomplete"] / "zarr.json").write_text(json.dumps(meta))
    (p["incomplete"] / "checksums.json").unlink()  # an incomplete cache has none yet
    p["bad_root_json"] = work / "bad_root_json.zarr"
    shutil.copytree(p["other_cache"], p["bad_root_json"])
    (p["bad_root_json"] / "zarr.json").write_text("{not json")
    p["bad_root_json_unsummed"] = work / "bad_root_json_unsummed.zarr"  # completed before checksums.json
    shutil.copytree(p["bad_root_json"], p["bad_root_json_unsummed"])
    (p["bad_root_json_unsummed"] / "checksums.json").unlink()
    p["not_cache"] = work / "plain_dir"
    p["not_cache"].mkdir()

    head = build_head(muon_config, muon_config["data"]["hit_fields"], muon_config["data"]["particle_fields"])
    state = {f"head.{k}": v for k, v in head.state_dict().items()}
    p["head"] = work / "head.ckpt"
    torch.save({"state_dict": state, "head_config": head.head_config(), "config": muon_config,
                "cache_fingerprint": cache32.fingerprint, "metrics": {}, "weights_sha256": weights_sha256(state)},
               p["head"])
    return p


EXTRACT = "extract --config {config} --checkpoint {ckpt} --input {events} --output {work}/out.zarr"
TRAIN = "train --config {config} --cache {cache} --val-cache {cache} --output {work}/run"
PRETRAIN = "pretrain --config {config} --train {events} --val {events} --output {work}/stage1 --epochs 1"
EVALUATE = "evaluate --config {config} --head {head} --cache {cache} --output {work}/eval"
VERIFY = "verify {cache} --config {config} --checkpoint {ckpt} --input {events}"

# id: (command line, fragment the one error line must contain); {name} is a path of the `paths` fixture.
MISTAKES = {
    "simulate-existing-output": ("simulate --preset muon --events 2 --output {events}", "exists; pass --overwrite"),
    "simulate-unknown-preset": ("simulate --preset muonn --events 2 --output {work}/s.h5", "(did you mean 'muon'?)"),
    "simulate-zero-events": ("simulate --preset muon --events 0 --output {work}/s.h5", "--events: must be >= 1"),
    "simulate-events-not-int": ("simulate --preset muon --events ten --output {work}/s.h5",
                                "must be an integer, got 'ten'"),
    "simulate-missing-dir": ("simulate --preset muon --events 2 --output {work}/no/s.h5", "output directory"),
    "pretrain-missing-train": (PRETRAIN.replace("--train {events}", "--train {work}/nope.h5"),
                               "event file not found"),
    "pretrain-zero-epochs": (PRETRAIN + " --epochs 0", "--epochs must be at least 1"),
    "pretrain-init-missing": (PRETRAIN + " --init {work}/nope.ckpt", "--init checkpoint not found"),
    "pretrain-lr-not-number": (PRETRAIN + " --set pretrain.lr=fast", "pretrain.lr must be a number, not 'fast'"),
    "pretrain-resume-nothing": (PRETRAIN.replace("stage1", "never-run") + " --resume", "nothing to resume"),
    "pretrain-no-data-section": (PRETRAIN.replace("{config}", "{no_data_config}"), "has no 'data' section"),
    "extract-missing-config": (EXTRACT.replace("{config}", "{work}/nope.yaml"), "config file not found"),
    "extract-set-unknown-key": (EXTRACT + " --set extract.batch_sise=8", "(did you mean 'batch_size'?)"),
    "extract-set-model-typo": (EXTRACT + " --set model.init_args.dimm=3",
                               "unknown key 'model.init_args.dimm' (did you mean 'dim'?)"),
    "extract-missing-checkpoint": (EXTRACT.replace("{ckpt}", "{work}/nope.ckpt"), "checkpoint not found"),
    "extract-other-architecture": (EXTRACT + " --set model.init_args.dim=16", "does not fit this config"),
    "extract-not-a-checkpoint": (EXTRACT.replace("{ckpt}", "{events}"), "is not a readable cachefeat checkpoint"),
    "extract-missing-input": (EXTRACT.replace("--input {events}", "--input {work}/nope.h5"), "event file not found"),
    "extract-input-not-hdf5": (EXTRACT.replace("--input {events}", "--input {text}"), "is not an HDF5 file"),
    "extract-missing-field": (EXTRACT.replace("--input {events}", "--input {no_eta}"), "no hit field 'eta'"),
    "extract-zero-batch": (EXTRACT + " --batch-size 0", "extract.batch_size must be an integer >= 1, not 0"),
    "extract-floor-above-1": (EXTRACT + " --floor 1.5", "floor must be a probability"),
    "extract-unknown-dtype": (EXTRACT + " --dtype float8", "invalid choice: 'float8'"),
    "extract-dtype-typo": (EXTRACT + " --dtype flaot16", "(did you mean 'float16'?)"),
    "extract-existing-output": (EXTRACT.replace("{work}/out.zarr", "{other_cache}"), "exists; use --overwrite"),
    "extract-resume-not-a-cache": (EXTRACT.replace("{work}/out.zarr", "{work}") + " --resume",
                                   "is not a cachefeat cache"),
    "info-missing": ("info {work}/nope.zarr", "no cache at"),
    "info-not-a-cache": ("info {not_cache}", "is not a cachefeat cache"),
    "info-incomplete": ("info {incomplete}", "is incomplete"),
    "info-damaged-root-json": ("info {bad_root_json}", "is damaged: zarr.json differs from its entry"),
    "train-damaged-root-json": (TRAIN.replace("--cache {cache}", "--cache {bad_root_json}"),
                                "is damaged: zarr.json differs from its entry"),
    "train-damaged-root-json-unsummed": (TRAIN.replace("--cache {cache}", "--cache {bad_root_json_unsummed}"),
                                         "zarr.json is not valid JSON"),
    "train-config-key-typo": (TRAIN.replace("{config}", "{typo_config}"),
                              "unknown key 'train.lr_rate' (did you mean 'lr'?)"),
    "train-set-unknown-section": (TRAIN + " --set trian.lr=3", "(did you mean 'train'?)"),
    "train-epochs-not-int": (TRAIN + " --set train.epochs=abc", "train.epochs must be an integer, not 'abc'"),
    "train-mixed-precision": (TRAIN + " --set train.mixed_precision=fp8", "mixed_precision must be one of no, bf16"),
    "train-zero-batch": (TRAIN + " --batch-size 0", "--batch-size must be at least 1"),
    "train-cache-other-checkpoint": (TRAIN + " --checkpoint {other_ckpt}", "checkpoint weights differ"),
    "train-val-cache-other-checkpoint": (TRAIN.replace("--val-cache {cache}", "--val-cache {other_cache}"),
                                         "validation cache"),
    "train-cache-other-input": (TRAIN + " --input {events}", "input events differ"),
    "train-incomplete-cache": (TRAIN.replace("--cache {cache}", "--cache {incomplete}"), "is incomplete"),
    "train-live-without-checkpoint": (TRAIN + " --source live", "required with --source live"),
    "train-no-data-section": (TRAIN.replace("{config}", "{no_data_config}"), "has no 'data' section"),
    "evaluate-missing-head": (EVALUATE.replace("{head}", "{work}/nope.ckpt"), "head checkpoint not found"),
    "evaluate-stage1-as-head": (EVALUATE.replace("{head}", "{ckpt}"), "is not a head checkpoint"),
    "evaluate-head-other-backbone": (EVALUATE.replace("{cache}", "{other_cache}"),
                                     "other backbone weights than the head was trained on"),
    "evaluate-zero-field": (EVALUATE + " --bz 0", "non-zero number of tesla"),
    "verify-zero-events": (VERIFY + " --events 0", "--events must be at least 1"),
    "verify-zero-batch": (VERIFY + " --batch-size 0", "--batch-size must be at least 1"),
    "verify-unknown-device": (VERIFY + " --device tpu9", "--device 'tpu9' is not a torch device"),
    "verify-other-checkpoint": (VERIFY.replace("{cache}", "{other_cache}"), "checkpoint weights differ"),
    "verify-other-input": (VERIFY, "input data differs"),
    "verify-not-a-cache": (VERIFY.replace("{cache}", "{not_cache}"), "is not a cachefeat cache"),
    "demo-missing-config": ("demo --config {work}/nope.yaml --workdir {work}/demo", "config file not found"),
    "sweep-without-sweep-block": ("sweep --config {config} --cache {cache} --val-cache {cache} --output {work}/sweep",
                                  "has no sweep block"),
    # Every setting checked before work starts, whichever command reads it: key, value and what is allowed.
    "extract-set-head-typo": (EXTRACT + " --set head.init_args.assignment_treshold=0.2",
                              "unknown key 'head.init_args.assignment_treshold' "
                              "(did you mean 'assignment_threshold'?)"),
    "extract-config-head-typo": (EXTRACT.replace("{config}", "{head_typo_config}"),
                                 "unknown key 'head.init_args.hiden_dim' (did you mean 'hidden_dim'?)"),
    "train-config-section-typo": (TRAIN.replace("{config}", "{section_typo_config}"),
                                  "unknown config section 'trian' (did you mean 'train'?)"),
    "extract-model-zero-dim": (EXTRACT + " --set model.init_args.dim=0",
                               "model.init_args.dim must be an integer >= 1, not 0"),
    "extract-data-zero-max-hits": (EXTRACT + " --set data.max_hits=0",
                                   "data.max_hits must be an integer >= 1 or null, not 0"),
    "extract-dtype-typo-in-config": (EXTRACT + " --set extract.dtype=flaot16",
                                     "extract.dtype must be one of float32, float16, bfloat16, not 'flaot16' "
                                     "(did you mean 'float16'?)"),
    "train-negative-lr": (TRAIN + " --set train.lr=-1", "train.lr must be a number > 0, not -1"),
    "train-negative-weight-decay": (TRAIN + " --set train.weight_decay=-1", "train.weight_decay must be a number >= 0"),
    "train-zero-accumulation": (TRAIN + " --set train.gradient_accumulation_steps=0",
                                "train.gradient_accumulation_steps must be an integer >= 1, not 0"),
    "train-negative-batch-in-config": (TRAIN + " --set train.batch_size=-5",
                                       "train.batch_size must be an integer >= 1"),
    "train-zero-hidden-dim": (TRAIN + " --set head.init_args.hidden_dim=0",
                              "head.init_args.hidden_dim must be an integer >= 1 or null, not 0"),
    "train-dropout-above-1": (TRAIN + " --set head.init_args.dropout=1.5",
                              "head.init_args.dropout must be a number in [0, 1), not 1.5"),
    "train-negative-grad-clip": (TRAIN + " --set train.grad_clip=-1", "train.grad_clip must be a number >= 0"),
    "train-zero-layers": (TRAIN + " --set head.init_args.num_layers=0", "head.init_args.num_layers must be an integer"),
    "train-threshold-one": (TRAIN + " --set head.init_args.assignment_threshold=1",
                            "head.init_args.assignment_threshold must be a number in (0, 1), not 1"),
    "train-threshold-below-floor": (TRAIN + " --set head.init_args.assignment_threshold=0.05",
                                    "is below the cache floor"),
    "train-missing-cache": (TRAIN.replace("--cache {cache}", "--cache {work}/nope.zarr"), "no cache at"),
    # Remote caches (tests/cache/test_remote.py has the rows that need a server).
    "info-unsupported-url": ("info ftp://host/cache.zarr", "unsupported URL scheme ftp://"),
    "extract-unsupported-url": (EXTRACT.replace("--output {work}/out.zarr", "--output http://host/c.zarr"),
                                "unsupported URL scheme http://"),
    "info-s3-without-bucket": ("info s3:///cache.zarr", "names no bucket"),
    "extract-url-checkpoint": (EXTRACT.replace("{ckpt}", "root://localhost//data/stage1.ckpt"),
                               "--checkpoint root://localhost//data/stage1.ckpt is a URL, but configs, checkpoints"),
    "train-url-input": (TRAIN + " --input s3://bucket/events.h5", "--input s3://bucket/events.h5 is a URL"),
    "pretrain-url-events": (PRETRAIN.replace("--train {events}", "--train s3://bucket/train.h5"),
                            "--train s3://bucket/train.h5 is a URL"),
    "evaluate-url-head": (EVALUATE.replace("{head}", "s3://bucket/head.ckpt"), "--head s3://bucket/head.ckpt is a URL"),
    "pretrain-negative-grad-clip": (PRETRAIN + " --set pretrain.grad_clip=-1",
                                    "pretrain.grad_clip must be a number >= 0"),
    "evaluate-fit-not-bool": (EVALUATE + " --set evaluate.fit=maybe", "evaluate.fit must be true or false"),
    "verify-zero-extract-batch": (VERIFY + " --set extract.batch_size=0", "extract.batch_size must be an integer >= 1"),
    "demo-section-typo": ("demo --config {section_typo_config} --workdir {work}/demo",
                          "unknown config section 'trian'"),
    "sweep-dropout-above-1": ("sweep --config {sweep_config} --cache {cache} --val-cache {cache} --output {work}/sweep",
                              "head.init_args.dropout must be a number in [0, 1), not 1.5"),
    # Input files checked up front; a problem found mid-run names the event and leaves no cache.
    "extract-truncated-hdf5": (EXTRACT.replace("--input {events}", "--input {truncated}"),
                               "is not a readable HDF5 file (Unable to synchronously open file (truncated file"),
    "extract-nan-hit": (EXTRACT.replace("--input {events}", "--input {nan_hit}") + " --no-progress",
                        "hit field 'x' is NaN or infinite in event 13"),
    "sweep-zero-workers": ("sweep --config {config} --cache {cache} --val-cache {cache} --output {work}/sweep "
                           "--workers 0", "--workers must be at least 1"),
}


@pytest.mark.parametrize(
    "line,fragment",
    [pytest.param(line, fragment, id=name, marks=pytest.mark.skipif(
        line.split()[0] not in COMMANDS, reason=f"no {line.split()[0]} command"))
     for name, (line, fragment) in MISTAKES.items()],
)
def test_mistake_is_one_line_and_exit_2(paths, assert_cli_error, line, fragment):
    before = _tree(paths["work"])
    assert_cli_error(shlex.split(line.format(**paths)), fragment)
    assert _tree(paths["work"]) == before, "the failed command left files behind"


def _tree(root: Path) -> dict[str, int]:
    """Every file and directory under `root` with its size (directories: -1)."""
    return {str(p.relative_to(root)): (-1 if p.is_dir() else p.stat().st_size) for p in root.rglob("*")}


def test_table_covers_every_command():
    assert len(MISTAKES) >= 40
    assert {line.split()[0] for line, _ in MISTAKES.values()} >= set(COMMANDS)


def test_command_typo_has_did_you_mean(run_cli):
    rc, _, err = run_cli(["extrct"])
    assert rc == 2 and err.startswith("cachefeat: error: ") and "(did you mean 'extract'?)" in err
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback_in_process(paths):
    with pytest.raises(UserError, match="no cache at"):
        main(["--debug", "info", str(paths["work"] / "nope.zarr")])


def _shell(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cachefeat", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_exit_code_from_the_shell():
    proc = _shell("extract", "--config", CONFIG, "--checkpoint", CHECKPOINT, "--input", "x.h5", "--output", "y.zarr",
                  "--floor", "1.5")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("cachefeat extract: error: floor must be a probability")
    assert "Traceback" not in proc.stderr


def test_debug_traceback_from_the_shell():
    proc = _shell("--debug", "info", "missing.zarr")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "UserError: no cache at missing.zarr" in proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(command, run_cli):
    rc, out, _ = run_cli([command, "--help"])
    assert rc == 0
    assert "example:" in out and f"cachefeat {command}" in out.split("example:", 1)[1]
