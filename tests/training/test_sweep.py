"""Sweeps: variants parsed from the config, the shared pair weights equal the head's own, a variant
trained in a sweep equals the same variant trained alone by `train(...)`, the command's outputs."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from cachefeat.cli import main
from cachefeat.errors import UserError
from cachefeat.model.checkpoint import load_checkpoint
from cachefeat.training import loop as loop_module
from cachefeat.training import sweep as sweep_module
from cachefeat.training.sweep import stack_setting, sweep, sweep_settings, sweep_variants
from cachefeat.training.train import train


def _config(muon_config, sweep_block: dict, **train_settings) -> dict:
    config = copy.deepcopy(muon_config)
    config["train"].update({"batch_size": 16, "epochs": 2, **train_settings})
    config["sweep"] = sweep_block
    return config


def test_variants_are_the_grid_then_the_list(muon_config):
    config = _config(muon_config, {
        "grid": {"head.init_args.hidden_dim": [64, 120], "train.lr": [1.0e-3, 3.0e-3]},
        "variants": [{"name": "deep", "head.init_args.num_layers": 4}],
    }, lr=1.0e-3)  # the base lr, which "deep" keeps
    variants = sweep_variants(config)
    assert [v.name for v in variants] == ["hidden_dim64-lr0.001", "hidden_dim64-lr0.003", "hidden_dim120-lr0.001",
                                          "hidden_dim120-lr0.003", "deep"]
    assert [(v.config["head"]["init_args"]["hidden_dim"], v.config["train"]["lr"]) for v in variants] == [
        (64, 1e-3), (64, 3e-3), (120, 1e-3), (120, 3e-3), (120, 1e-3)]
    assert variants[4].config["head"]["init_args"]["num_layers"] == 4
    assert variants[0].config["head"]["init_args"]["num_layers"] == 3
    assert all("sweep" not in v.config for v in variants)
    assert config["head"]["init_args"]["hidden_dim"] == 120  # the base config is untouched


@pytest.mark.parametrize("block, message", [
    ({"grid": {"train.batch_size": [8, 16]}}, "cannot be swept"),
    ({"grid": {"head.init_args.hiden_dim": [8]}}, "did you mean 'head.init_args.hidden_dim'"),
    ({"grid": {"train.lr": []}}, "non-empty list"),
    ({"grid": {"head.init_args.hidden_dim": [8.5]}}, "must be an integer"),
    ({"grid": {"head.init_args.dropout": [1.0]}}, r"in \[0, 1\)"),
    ({"variants": [{"name": "a", "train.lr": 1e-3}, {"name": "a", "train.lr": 2e-3}]}, "two sweep variants"),
    ({"variants": [{"name": "x/y"}]}, "must use only"),
    ({"variants": [{"train.lr": 1e-3}]}, "with a name"),
    ({}, "defines no variant"),
    ({"grid": {"train.lr": [1e-3]}, "metrc": "val_loss"}, "unknown key 'sweep.metrc'"),
    ({"grid": {"train.lr": [1e-3]}, "stack": "maybe"}, "^sweep.stack must be one of auto, true, false, not 'maybe'$"),
    ({"grid": {"train.lr": [1e-3]}, "stack": 1}, "^sweep.stack must be one of auto, true, false, not 1$"),
])
def test_bad_sweep_blocks_are_refused(muon_config, block, message):
    with pytest.raises(UserError, match=message):
        sweep_variants(_config(muon_config, block))


def test_stack_setting_by_device_and_processes(muon_config):
    """auto stacks on CUDA in one process only; true under several processes is one line; false never stacks."""
    assert sweep_settings(_config(muon_config, {"grid": {"train.lr": [1e-3]}}))["stack"] == "auto"
    for value in ("auto", True, False):
        assert sweep_settings(_config(muon_config, {"grid": {"train.lr": [1e-3]}, "stack": value}))["stack"] == value

    class Accelerator:
        def __init__(self, device, num_processes):
            self.device, self.num_processes = torch.device(device), num_processes

    cpu, cuda, two = Accelerator("cpu", 1), Accelerator("cuda", 1), Accelerator("cuda", 2)
    assert [stack_setting(v, cpu) for v in ("auto", True, False)] == [False, True, False]
    assert [stack_setting(v, cuda) for v in ("auto", True, False)] == [True, True, False]
    assert [stack_setting(v, two) for v in ("auto", False)] == [False, False]
    with pytest.raises(UserError, match="^sweep.stack: true needs one process, not 2 .*; use stack: auto or false$"):
        stack_setting(True, two)


def test_frame_can_be_swept(muon_config, cache32, val_cache32, tmp_path):
    """head.init_args.frame is sweepable: each variant equals its separate run, bit for bit."""
    config = _config(muon_config, {"grid": {"head.init_args.frame": ["none", "track"]}}, batch_size=32)
    variants = sweep_variants(config)
    assert [v.name for v in variants] == ["framenone", "frametrack"]
    sweep(config, tmp_path / "sweep", cache=cache32.path, val_cache=val_cache32.path, data_mode="memory",
          device="cpu", max_steps=3, workers=1)
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    for variant in variants:
        alone = train(variant.config, tmp_path / variant.name, cache=cache32.path, val_cache=val_cache32.path,
                      data_mode="memory", device="cpu", max_steps=3)
        assert report["variants"][variant.name]["step_losses"] == alone["step_losses"], variant.name
        a = load_checkpoint(tmp_path / variant.name / "head.ckpt")
        b = load_checkpoint(tmp_path / "sweep" / variant.name / "head.ckpt")
        assert a["head_config"]["frame"] == b["head_config"]["frame"] == variant.value("head.init_args.frame")
        for name in a["state_dict"]:
            assert torch.equal(a["state_dict"][name], b["state_dict"][name]), (variant.name, name)
    with pytest.raises(UserError, match="head.init_args.frame must be one of none, track, not 'event'"):
        sweep_variants(_config(muon_config, {"grid": {"head.init_args.frame": ["event"]}}))


@pytest.mark.parametrize("workers", [1, 2])
def test_each_variant_equals_its_separate_run(muon_config, cache32, val_cache32, tmp_path, monkeypatch, workers):
    """3 variants of 3 shapes (2 thresholds, another seed), dropout on, across an epoch boundary: the
    per-step losses, validation history and final weights equal `train(...)` alone, bit for bit, with
    the variants stepped one after another or on 2 threads. One torch thread throughout: a variant's
    arithmetic (e.g. a matmul's split-K) may round differently with another intra-op thread count."""
    block = {
        "grid": {"head.init_args.hidden_dim": [16, 40]},
        "variants": [{"name": "deep", "head.init_args.num_layers": 4, "head.init_args.assignment_threshold": 0.3,
                      "head.init_args.dropout": 0.3, "train.lr": 3.0e-3, "train.weight_decay": 0.01,
                      "train.seed": 7}],
    }
    config = _config(muon_config, block, batch_size=32)
    config["head"]["init_args"]["dropout"] = 0.2
    steps = 6  # 160 events / 32 = 5 steps per epoch
    sweep(config, tmp_path / "sweep", cache=cache32.path, val_cache=val_cache32.path, data_mode="memory",
          device="cpu", max_steps=steps, workers=workers)
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())

    # The sweep's event order comes from the base seed: the separate run of "deep" must use it too.
    source = loop_module.CacheMemorySource
    monkeypatch.setattr(loop_module, "CacheMemorySource",
                        lambda reader, batch, seed, *rest: source(reader, batch, config["train"]["seed"], *rest))
    variants = sweep_variants(config)
    assert len({(v.value("head.init_args.hidden_dim"), v.value("head.init_args.num_layers"))
                for v in variants}) == 3
    for variant in variants:
        alone = train(variant.config, tmp_path / variant.name, cache=cache32.path, val_cache=val_cache32.path,
                      data_mode="memory", device="cpu", max_steps=steps)
        swept = report["variants"][variant.name]
        assert len(alone["step_losses"]) == steps
        assert swept["step_losses"] == alone["step_losses"], variant.name
        history = json.loads((tmp_path / variant.name / "metrics.json").read_text())
        assert [h["val_loss"] for h in swept["history"]] == [h["val_loss"] for h in history]
        a = load_checkpoint(tmp_path / variant.name / "head.ckpt")
        b = load_checkpoint(tmp_path / "sweep" / variant.name / "head.ckpt")
        assert a["head_config"] == b["head_config"]
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for name in a["state_dict"]:
            assert torch.equal(a["state_dict"][name], b["state_dict"][name]), (variant.name, name)


def test_command_writes_ranked_results(muon_config, cache32, val_cache32, tmp_path, capsys):
    config = _config(muon_config, {"metric": "val_loss",
                                   "grid": {"train.lr": [3.0e-4, 3.0e-3], "head.init_args.hidden_dim": [16]},
                                   "variants": [{"name": "narrow", "head.init_args.hidden_dim": 8}]}, epochs=2)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # the grid's key order names the variants
    out = tmp_path / "run"
    args = ["sweep", "--config", str(path), "--cache", str(cache32.path), "--val-cache", str(val_cache32.path),
            "--output", str(out), "--batch-size", "32", "--device", "cpu"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    names = ["lr0.0003-hidden_dim16", "lr0.003-hidden_dim16", "narrow"]
    for name in names:
        assert name in stdout
        assert {"head.ckpt", "metrics.json", "metrics.csv", "config.json"} <= {p.name for p in (out / name).iterdir()}
    report = json.loads((out / "sweep.json").read_text())
    best = {name: min(h["val_loss"] for h in report["variants"][name]["history"]) for name in names}
    assert [r["variant"] for r in report["rows"]] == sorted(names, key=best.get)
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == sorted(names, key=best.get)
    assert [float(r["best_val_loss"]) for r in rows] == pytest.approx(sorted(best.values()))
    assert {"lr", "hidden_dim", "val_pt_rel_res68", "val_eta_res68", "val_phi_res68", "val_q_accuracy", "epochs",
            "train_s"} <= set(rows[0])
    assert all(r["epochs"] == "2" for r in rows)
    assert (out / "sweep_val_loss.png").stat().st_size > 1000
    assert main(args) == 2  # the output already holds a sweep


def test_bad_input_exits_2_with_one_line(muon_config, cache32, val_cache32, tmp_path, capsys):
    cases = [({"variants": [{"name": "low", "head.init_args.assignment_threshold": 0.05}]}, "below the cache floor"),
             ({"metric": "val_nothing", "grid": {"train.lr": [1e-3]}}, "not a validation metric")]
    for i, (block, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(_config(muon_config, block)))
        code = main(["sweep", "--config", str(path), "--cache", str(cache32.path), "--val-cache",
                     str(val_cache32.path), "--output", str(tmp_path / f"run{i}"), "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert message in err[-1] and err[-1].startswith("cachefeat sweep: error:")


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(muon_config, cache32, val_cache32, tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 8 each: each variant == `train` in 1 process, batch 16."""
    config = _config(muon_config, {"grid": {"head.init_args.hidden_dim": [16, 40]}}, epochs=1)
    config["head"]["init_args"]["dropout"] = 0.0
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cachefeat",
         "sweep", "--config", str(path), "--cache", str(cache32.path), "--val-cache", str(val_cache32.path),
         "--output", str(tmp_path / "two"), "--batch-size", "8", "--max-steps", "4", "--data", "memory"],
        env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    for variant in sweep_variants(config):
        train(variant.config, tmp_path / variant.name, cache=cache32.path, val_cache=val_cache32.path,
              data_mode="memory", device="cpu", batch_size=16, max_steps=4)
        a = load_checkpoint(tmp_path / variant.name / "head.ckpt")["state_dict"]
        b = load_checkpoint(tmp_path / "two" / variant.name / "head.ckpt")["state_dict"]
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


# A stacked sweep (sweep.stack: true) against each variant's separate run, measured (1 torch thread,
# 6 batches over an epoch boundary, float32, accumulation 1 and 2): step and val losses 1.1e-7 and
# 1.4e-7 relative, final weights 1.4e-6 relative to each tensor's largest entry (AdamW divides by
# the root mean square of the gradients, so their last-bit differences grow in the updates); the
# tolerances are about 10x that.
STACKED_LOSS_RTOL, STACKED_WEIGHT_TOL = 1e-6, 1.5e-5


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| relative to b's largest entry."""
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_stacked_sweep_equals_each_separate_run(muon_config, cache32, val_cache32, tmp_path, monkeypatch, capsys,
                                                accumulation, device):
    """sweep.stack: true, 4 variants: 3 of one shape (base, another lr and weight decay, another seed and
    dropout) stepped as one stacked group, 1 of another hidden_dim stepped alone. Each variant's
    per-step losses, validation history and final weights equal `train(...)` alone, within the
    stated tolerances (gradient accumulation 1 and 2); "wide", stepped alone, bit for bit."""
    block = {
        "stack": True,
        "variants": [{"name": "base"},
                     {"name": "fast", "train.lr": 3.0e-3, "train.weight_decay": 0.01},
                     {"name": "other", "train.seed": 7, "head.init_args.dropout": 0.3},
                     {"name": "wide", "head.init_args.hidden_dim": 40}],
    }
    config = _config(muon_config, block, batch_size=32, gradient_accumulation_steps=accumulation)
    config["head"]["init_args"].update(dropout=0.2, hidden_dim=16)
    steps = 6 // accumulation  # optimizer steps; 160 events / 32 = 5 batches per epoch: crosses an epoch
    sweep(config, tmp_path / "sweep", cache=cache32.path, val_cache=val_cache32.path, data_mode="memory",
          device=device, max_steps=steps, workers=1)
    assert "3 stacked in 1 group(s)" in capsys.readouterr().out
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())

    source = loop_module.CacheMemorySource
    monkeypatch.setattr(loop_module, "CacheMemorySource",
                        lambda reader, batch, seed, *rest: source(reader, batch, config["train"]["seed"], *rest))
    worst = {"loss": 0.0, "val": 0.0, "weight": 0.0}
    for variant in sweep_variants(config):
        alone = train(variant.config, tmp_path / variant.name, cache=cache32.path, val_cache=val_cache32.path,
                      data_mode="memory", device=device, max_steps=steps)
        swept = report["variants"][variant.name]
        assert len(swept["step_losses"]) == len(alone["step_losses"]) == 6
        a, b = torch.tensor(swept["step_losses"]), torch.tensor(alone["step_losses"])
        worst["loss"] = max(worst["loss"], ((a - b).abs() / b.abs()).max().item())
        history = json.loads((tmp_path / variant.name / "metrics.json").read_text())
        a, b = torch.tensor([h["val_loss"] for h in swept["history"]]), torch.tensor([h["val_loss"] for h in history])
        assert a.shape == b.shape
        worst["val"] = max(worst["val"], ((a - b).abs() / b.abs()).max().item())
        sa = load_checkpoint(tmp_path / "sweep" / variant.name / "head.ckpt")
        sb = load_checkpoint(tmp_path / variant.name / "head.ckpt")
        assert sa["head_config"] == sb["head_config"]
        assert sa["state_dict"].keys() == sb["state_dict"].keys()
        if variant.name == "wide":
            assert swept["step_losses"] == alone["step_losses"]
            assert all(torch.equal(sa["state_dict"][k], v) for k, v in sb["state_dict"].items())
        for name, value in sb["state_dict"].items():
            if value.is_floating_point():
                worst["weight"] = max(worst["weight"], _max_rel(sa["state_dict"][name], value))
            else:  # the dropout streams: the same masks drawn
                assert torch.equal(sa["state_dict"][name], value), (variant.name, name)
    assert worst["loss"] <= STACKED_LOSS_RTOL and worst["val"] <= STACKED_LOSS_RTOL, worst
    assert worst["weight"] <= STACKED_WEIGHT_TOL, worst


def test_stacked_sweep_steps_never_wait_for_the_device(muon_config, cache32, val_cache32, tmp_path, monkeypatch,
                                                       capsys):
    """The stacked step (shipped head: frame track, dropout; 2 variants of one shape) over a resident
    cache, each step under `DeviceWaits` (tests/training/test_lean_step.py): no host read, no
    data-dependent shape."""
    from test_lean_step import watch_steps

    waits = watch_steps(sweep_module, monkeypatch)
    monkeypatch.setattr(loop_module, "PROGRESS_S", math.inf)
    config = _config(muon_config, {"stack": True, "grid": {"train.lr": [1.0e-3, 3.0e-3]}}, batch_size=32, epochs=1,
                     grad_clip=1.0)
    rows = sweep(config, tmp_path / "sweep", cache=cache32.path, val_cache=val_cache32.path, data_mode="memory",
                 device="cpu", workers=1)
    assert "2 stacked in 1 group(s)" in capsys.readouterr().out
    assert waits.found == []
    assert all(row["steps"] == cache32.num_events // 32 for row in rows)


def test_stacked_sweep_under_bf16_autocast(muon_config, cache32, val_cache32, tmp_path, monkeypatch):
    """mixed_precision bf16: the stacked forward runs under the accelerator's autocast as the separate
    variants' prepared forwards do: its step losses are close to the separate sweep's (bf16 rounding),
    and the stacked forward is called with bfloat16 autocast on."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the state of the others' fp32 accelerators
    seen = []
    real = sweep_module.StackedHeads.predict_from_pairs

    def spy(self, hb, pairs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(self, hb, pairs)

    monkeypatch.setattr(sweep_module.StackedHeads, "predict_from_pairs", spy)
    losses = {}
    for stack in (True, False):
        config = _config(muon_config, {"stack": stack, "grid": {"train.lr": [1.0e-3, 3.0e-3]}}, batch_size=32,
                         mixed_precision="bf16")
        sweep(config, tmp_path / f"stack-{stack}", cache=cache32.path, val_cache=val_cache32.path,
              data_mode="memory", device="cpu", max_steps=3, workers=1)
        report = json.loads((tmp_path / f"stack-{stack}" / "sweep.json").read_text())
        losses[stack] = torch.tensor([v["step_losses"] for v in report["variants"].values()])
    AcceleratorState._reset_state(reset_partial_state=True)
    assert seen == [True] * 3
    assert losses[True].shape == losses[False].shape == (2, 3)
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-2, atol=0)


@pytest.mark.gpu
def test_stacked_sweep_steps_on_a_gpu_never_synchronise(muon_config, cache32, val_cache32, tmp_path, monkeypatch):
    """The stacked step on a CUDA-resident cache under `torch.cuda.set_sync_debug_mode("error")` (after a
    first step outside the check, which creates AdamW's state and the CUDA handles)."""
    real_fit, checked = sweep_module.fit, []

    def watched_fit(accelerator, state, trainees, batches, step, end_epoch, **kwargs):
        def watched(batch):
            if not checked:
                checked.append(False)
                out = step(batch)
                torch.cuda.synchronize()
                return out
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked.append(True)
            return out
        real_fit(accelerator, state, trainees, batches, watched, end_epoch, **kwargs)

    monkeypatch.setattr(sweep_module, "fit", watched_fit)
    monkeypatch.setattr(loop_module, "PROGRESS_S", math.inf)
    config = _config(muon_config, {"stack": True, "grid": {"train.lr": [1.0e-3, 3.0e-3]}}, batch_size=32, epochs=2,
                     grad_clip=1.0)
    sweep(config, tmp_path / "sweep", cache=cache32.path, val_cache=val_cache32.path, data_mode="memory",
          device="cuda", workers=1)
    assert checked.count(True) == 2 * (cache32.num_events // 32) - 1
