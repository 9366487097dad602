"""The error experience across commands: every user mistake is one clear line on stderr,
`cachefeat <command>: error: ...`, exit code 2, no traceback (unless `--debug`); every
command's `--help` shows an example.

Most rows run in-process through `cachefeat.cli.main`; a few run `python -m cachefeat` to
prove the exit code as the shell sees it.
"""

from __future__ import annotations

import argparse
import json
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
    """`train` builds an Accelerator in-process; later tests must not inherit its global state."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, cache32, muon_config) -> dict:
    """Small inputs for the mistakes: 20 events, broken variants of files, another checkpoint and
    a cache extracted with it, a head trained (in name) on `cache32`."""
    from cachefeat.cache.extract import extract
    from cachefeat.config import instantiate
    from cachefeat.data.presets import get_preset
    from cachefeat.data.simulate import write_event_file
    from cachefeat.model.checkpoint import load_checkpoint, load_model_state, save_checkpoint, weights_sha256
    from cachefeat.training.train import build_head

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

    config = yaml.safe_load(CONFIG.read_text())
    typo = json.loads(json.dumps(config))
    typo["train"]["lr_rate"] = typo["train"].pop("lr")
    p["typo_config"] = work / "typo.yaml"
    p["typo_config"].write_text(yaml.safe_dump(typo))
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
    p["not_cache"] = work / "plain_dir"
    p["not_cache"].mkdir()

    head = build_head(muon_config, muon_config["data"]["hit_fields"], muon_config["data"]["particle_fields"])
    state = {f"head.{k}": v for k, v in head.state_dict().items()}
    p["head"] = work / "head.ckpt"
    torch.save({"state_dict": state, "head_config": head.head_config(), "config": muon_config,
                "cache_fingerprint": cache32.fingerprint, "metrics": {}, "weights_sha256": weights_sha256(state)},
               p["head"])
    return p


def _extract(p, *extra):
    return ["extract", "--config", p["config"], "--checkpoint", p["ckpt"], "--input", p["events"],
            "--output", p["work"] / "out.zarr", *extra]


def _train(p, *extra, config=None):
    return ["train", "--config", config or p["config"], "--cache", p["cache"], "--val-cache", p["cache"],
            "--output", p["work"] / "run", *extra]


def _pretrain(p, *extra, config=None, output="stage1"):
    return ["pretrain", "--config", config or p["config"], "--train", p["events"], "--val", p["events"],
            "--output", p["work"] / output, "--epochs", "1", *extra]


def _evaluate(p, *extra, head=None, cache=None):
    return ["evaluate", "--config", p["config"], "--head", head or p["head"], "--cache", cache or p["cache"],
            "--output", p["work"] / "eval", *extra]


def _verify(p, *extra, cache=None, ckpt=None):
    return ["verify", cache or p["cache"], "--config", p["config"], "--checkpoint", ckpt or p["ckpt"],
            "--input", p["events"], *extra]


def _simulate(p, *extra, output=None):
    return ["simulate", "--preset", "muon", "--events", "2", "--output", output or p["work"] / "sim.h5", *extra]


# (command, argv builder, fragment the one error line must contain)
MISTAKES = {
    # simulate
    "simulate-existing-output": ("simulate", lambda p: _simulate(p, output=p["events"]), "exists; pass --overwrite"),
    "simulate-unknown-preset": ("simulate", lambda p: ["simulate", "--preset", "muonn", "--events", "2", "--output",
                                                       p["work"] / "s.h5"], "(did you mean 'muon'?)"),
    "simulate-zero-events": ("simulate", lambda p: ["simulate", "--preset", "muon", "--events", "0", "--output",
                                                    p["work"] / "s.h5"], "--events: must be >= 1, got 0"),
    "simulate-events-not-int": ("simulate", lambda p: ["simulate", "--preset", "muon", "--events", "ten",
                                                       "--output", p["work"] / "s.h5"], "must be an integer, got 'ten'"),
    "simulate-missing-dir": ("simulate", lambda p: _simulate(p, output=p["work"] / "no" / "s.h5"),
                             "output directory"),
    # pretrain
    "pretrain-missing-train": ("pretrain", lambda p: ["pretrain", "--config", p["config"], "--train",
                                                      p["work"] / "nope.h5", "--val", p["events"], "--output",
                                                      p["work"] / "stage1"], "event file not found"),
    "pretrain-zero-epochs": ("pretrain", lambda p: _pretrain(p, "--epochs", "0"), "--epochs must be at least 1"),
    "pretrain-lr-not-number": ("pretrain", lambda p: _pretrain(p, "--set", "pretrain.lr=fast"),
                               "pretrain.lr must be a number, not 'fast'"),
    "pretrain-resume-nothing": ("pretrain", lambda p: _pretrain(p, "--resume", output="never-run"), "nothing to resume"),
    "pretrain-no-data-section": ("pretrain", lambda p: _pretrain(p, config=p["no_data_config"]),
                                 "has no 'data' section"),
    # extract
    "extract-missing-config": ("extract", lambda p: ["extract", "--config", p["work"] / "nope.yaml", "--checkpoint",
                                                     p["ckpt"], "--input", p["events"], "--output",
                                                     p["work"] / "o.zarr"], "config file not found"),
    "extract-set-unknown-key": ("extract", lambda p: _extract(p, "--set", "extract.batch_sise=8"),
                                "(did you mean 'batch_size'?)"),
    "extract-set-model-typo": ("extract", lambda p: _extract(p, "--set", "model.init_args.dimm=3"),
                               "unknown key 'model.init_args.dimm' (did you mean 'dim'?)"),
    "extract-missing-checkpoint": ("extract", lambda p: ["extract", "--config", p["config"], "--checkpoint",
                                                         p["work"] / "nope.ckpt", "--input", p["events"], "--output",
                                                         p["work"] / "o.zarr"], "checkpoint not found"),
    "extract-other-architecture": ("extract", lambda p: _extract(p, "--set", "model.init_args.dim=16"),
                                   "does not fit this config"),
    "extract-not-a-checkpoint": ("extract", lambda p: ["extract", "--config", p["config"], "--checkpoint",
                                                       p["events"], "--input", p["events"], "--output",
                                                       p["work"] / "o.zarr"], "is not a readable cachefeat checkpoint"),
    "extract-missing-input": ("extract", lambda p: ["extract", "--config", p["config"], "--checkpoint", p["ckpt"],
                                                    "--input", p["work"] / "nope.h5", "--output",
                                                    p["work"] / "o.zarr"], "event file not found"),
    "extract-input-not-hdf5": ("extract", lambda p: ["extract", "--config", p["config"], "--checkpoint", p["ckpt"],
                                                     "--input", p["text"], "--output", p["work"] / "o.zarr"],
                               "is not an HDF5 file"),
    "extract-missing-field": ("extract", lambda p: ["extract", "--config", p["config"], "--checkpoint", p["ckpt"],
                                                    "--input", p["no_eta"], "--output", p["work"] / "o.zarr"],
                              "no hit field 'eta'"),
    "extract-zero-batch": ("extract", lambda p: _extract(p, "--batch-size", "0"), "batch_size must be a positive"),
    "extract-floor-above-1": ("extract", lambda p: _extract(p, "--floor", "1.5"), "floor must be a probability"),
    "extract-unknown-dtype": ("extract", lambda p: _extract(p, "--dtype", "float8"), "invalid choice: 'float8'"),
    "extract-dtype-typo": ("extract", lambda p: _extract(p, "--dtype", "flaot16"), "(did you mean 'float16'?)"),
    "extract-existing-output": ("extract", lambda p: ["extract", "--config", p["config"], "--checkpoint", p["ckpt"],
                                                      "--input", p["events"], "--output", p["other_cache"]],
                                "exists; use --overwrite"),
    "extract-resume-nothing": ("extract", lambda p: _extract(p, "--resume"), "cannot resume"),
    # info
    "info-missing": ("info", lambda p: ["info", p["work"] / "nope.zarr"], "no cache at"),
    "info-not-a-cache": ("info", lambda p: ["info", p["not_cache"]], "is not a cachefeat cache"),
    "info-incomplete": ("info", lambda p: ["info", p["incomplete"]], "is incomplete"),
    # train
    "train-config-key-typo": ("train", lambda p: _train(p, config=p["typo_config"]),
                              "unknown key 'train.lr_rate' (did you mean 'lr'?)"),
    "train-set-unknown-section": ("train", lambda p: _train(p, "--set", "trian.lr=3"), "(did you mean 'train'?)"),
    "train-epochs-not-int": ("train", lambda p: _train(p, "--set", "train.epochs=abc"),
                             "train.epochs must be an integer, not 'abc'"),
    "train-mixed-precision": ("train", lambda p: _train(p, "--set", "train.mixed_precision=fp8"),
                              "mixed_precision must be one of no, bf16, fp16"),
    "train-zero-batch": ("train", lambda p: _train(p, "--batch-size", "0"), "--batch-size must be at least 1"),
    "train-cache-other-checkpoint": ("train", lambda p: _train(p, "--checkpoint", p["other_ckpt"]),
                                     "checkpoint weights differ"),
    "train-val-cache-other-checkpoint": ("train", lambda p: ["train", "--config", p["config"], "--cache", p["cache"],
                                                             "--val-cache", p["other_cache"], "--output",
                                                             p["work"] / "run"], "validation cache"),
    "train-cache-other-input": ("train", lambda p: _train(p, "--input", p["events"]), "input events differ"),
    "train-incomplete-cache": ("train", lambda p: ["train", "--config", p["config"], "--cache", p["incomplete"],
                                                   "--val-cache", p["cache"], "--output", p["work"] / "run"],
                               "is incomplete"),
    "train-live-without-checkpoint": ("train", lambda p: _train(p, "--source", "live"),
                                      "required with --source live"),
    "train-no-data-section": ("train", lambda p: _train(p, config=p["no_data_config"]), "has no 'data' section"),
    # evaluate
    "evaluate-missing-head": ("evaluate", lambda p: _evaluate(p, head=p["work"] / "nope.ckpt"),
                              "checkpoint not found"),
    "evaluate-stage1-as-head": ("evaluate", lambda p: _evaluate(p, head=p["ckpt"]), "is not a head checkpoint"),
    "evaluate-head-other-backbone": ("evaluate", lambda p: _evaluate(p, cache=p["other_cache"]),
                                     "other backbone weights than the head was trained on"),
    "evaluate-zero-field": ("evaluate", lambda p: _evaluate(p, "--bz", "0"), "non-zero number of tesla"),
    # verify
    "verify-zero-events": ("verify", lambda p: _verify(p, "--events", "0"), "--events must be at least 1"),
    "verify-zero-batch": ("verify", lambda p: _verify(p, "--batch-size", "0"), "--batch-size must be at least 1"),
    "verify-other-checkpoint": ("verify", lambda p: _verify(p, cache=p["other_cache"]),
                                "checkpoint weights differ"),
    "verify-other-input": ("verify", lambda p: _verify(p), "input data differs"),
    "verify-not-a-cache": ("verify", lambda p: _verify(p, cache=p["not_cache"]), "is not a cachefeat cache"),
    # demo
    "demo-missing-config": ("demo", lambda p: ["demo", "--config", p["work"] / "nope.yaml", "--workdir",
                                               p["work"] / "demo"], "config file not found"),
    # sweep
    "sweep-without-sweep-block": ("sweep", lambda p: ["sweep", "--config", p["config"], "--cache", p["cache"],
                                                      "--val-cache", p["cache"], "--output", p["work"] / "sweep"],
                                  "has no sweep block"),
}


def _run(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "command,build,fragment",
    [pytest.param(*row, id=name, marks=pytest.mark.skipif(row[0] not in COMMANDS, reason=f"no {row[0]} command"))
     for name, row in MISTAKES.items()],
)
def test_mistake_is_one_line_and_exit_2(paths, capsys, command, build, fragment):
    rc, _, err = _run(build(paths), capsys)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cachefeat {command}: error: "), lines[0]
    assert fragment in lines[0]
    assert "Traceback" not in err


def test_table_covers_every_command():
    assert len(MISTAKES) >= 20
    assert {command for command, _, _ in MISTAKES.values()} >= set(COMMANDS)


def test_command_typo_has_did_you_mean(capsys):
    rc, _, err = _run(["extrct"], capsys)
    assert rc == 2 and err.startswith("cachefeat: error: ") and "(did you mean 'extract'?)" in err
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback_in_process(paths):
    with pytest.raises(UserError, match="no cache at"):
        main(["--debug", "info", str(paths["work"] / "nope.zarr")])


def _shell(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cachefeat", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("argv,prefix", [
    (["info", "missing.zarr"], "cachefeat info: error: no cache at missing.zarr"),
    (["extract", "--config", CONFIG, "--checkpoint", CHECKPOINT, "--input", "x.h5", "--output", "y.zarr",
      "--floor", "1.5"], "cachefeat extract: error: floor must be a probability"),
])
def test_exit_code_from_the_shell(argv, prefix):
    proc = _shell(*argv)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(prefix)
    assert "Traceback" not in proc.stderr


def test_debug_traceback_from_the_shell():
    proc = _shell("--debug", "info", "missing.zarr")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "UserError: no cache at missing.zarr" in proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(command, capsys):
    rc, out, _ = _run([command, "--help"], capsys)
    assert rc == 0
    assert "example:" in out and f"cachefeat {command}" in out.split("example:", 1)[1]
