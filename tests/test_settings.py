"""Settings are checked before work starts: the `Allowed` rules, the sections and blocks that
declare them, overrides, and how the CLI reports an exception it did not expect."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import cachefeat
from cachefeat.cli import check_config
from cachefeat.config import (
    DROPOUT,
    PROBABILITY,
    above,
    apply_override,
    at_least,
    check_block,
    load_config,
    one_of,
    section,
)
from cachefeat.errors import UserError, library_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "rule,good,bad,text",
    [
        (at_least(1, integer=True), [1, 7, 10**9], [0, -5, 1.5, True, "3", None], "an integer >= 1"),
        (at_least(1, integer=True, none=True), [None, 1], [0], "an integer >= 1 or null"),
        (above(0.0), [1e-12, 3, 2.5], [0, 0.0, -1, float("nan"), False], "a number > 0"),
        (at_least(0.0), [0, 0.0, 4], [-1e-9], "a number >= 0"),
        (DROPOUT, [0, 0.0, 0.5, 0.999], [1, 1.0, 1.5, -0.1], "a number in [0, 1)"),
        (PROBABILITY, [0.01, 0.5, 0.99], [0, 1, 1.0, 2], "a number in (0, 1)"),
        (one_of("no", "bf16"), ["no", "bf16"], ["fp8", None, 1], "one of no, bf16"),
    ],
)
def test_allowed_admits_exactly_its_values(rule, good, bad, text):
    assert rule.describe() == text
    for value in good:
        assert rule.admits(value), value
        rule.check("k", value)
    for value in bad:
        assert not rule.admits(value), value
        with pytest.raises(UserError, match="^" + re.escape(f"k must be {text}, not {value!r}")):
            rule.check("k", value)


def test_choice_has_did_you_mean():
    message = "x.dtype must be one of float32, float16, not 'flaot16' (did you mean 'float16'?)"
    with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
        one_of("float32", "float16").check("x.dtype", "flaot16")


def test_section_checks_keys_types_then_ranges():
    defaults, allowed = {"lr": 1e-3, "steps": 2}, {"lr": above(0.0), "steps": at_least(1, integer=True)}
    assert section({"s": {"lr": 0.5}}, "s", defaults, allowed) == {"lr": 0.5, "steps": 2}
    with pytest.raises(UserError, match=r"unknown key 's.lr_rate' \(did you mean 'lr'\?\)"):
        section({"s": {"lr_rate": 1}}, "s", defaults, allowed)
    with pytest.raises(UserError, match=r"s.lr must be a number, not '1e-3' \(YAML reads 1e-3 as text"):
        section({"s": {"lr": "1e-3"}}, "s", defaults, allowed)
    with pytest.raises(UserError, match=r"^s.steps must be an integer >= 1, not 0$"):
        section({"s": {"steps": 0}}, "s", defaults, allowed)


def test_every_default_is_allowed():
    """A module's defaults pass its own rules (else every run without the key would be refused)."""
    from cachefeat.cache import extract
    from cachefeat.data import loading
    from cachefeat.evaluation import predict
    from cachefeat.head.regression import RegressionHead
    from cachefeat.model import hepattn
    from cachefeat.model.maskformer import MaskFormer
    from cachefeat.training import pretrain, sweep, train

    tables = [(extract.EXTRACT_DEFAULTS, extract.EXTRACT_ALLOWED), (loading.DATA_DEFAULTS, loading.DATA_ALLOWED),
              (predict.EVALUATE_DEFAULTS, predict.EVALUATE_ALLOWED), (hepattn.DEFAULTS, hepattn.ALLOWED),
              (pretrain.DEFAULTS, pretrain.ALLOWED), (train.DEFAULTS, train.ALLOWED),
              (sweep.SWEEP_DEFAULTS, sweep.SWEEP_ALLOWED)]
    for cls in (RegressionHead, MaskFormer):
        import inspect

        params = inspect.signature(cls).parameters
        tables.append(({k: params[k].default for k in cls.ALLOWED}, cls.ALLOWED))
    for defaults, allowed in tables:
        assert set(allowed) <= set(defaults)
        for key, rule in allowed.items():
            assert rule.admits(defaults[key]), (key, defaults[key])


def test_check_block_refuses_without_building():
    block = {"class_path": "cachefeat.head.regression.RegressionHead", "init_args": {"dim": 8}}
    check_block(block, "head")
    with pytest.raises(UserError, match=r"unknown key 'head.init_args.hiden_dim' \(did you mean 'hidden_dim'\?\)"):
        check_block({**block, "init_args": {"hiden_dim": 4}}, "head")
    with pytest.raises(UserError, match=r"^head.init_args.dropout must be a number in \[0, 1\), not 1.5$"):
        check_block({**block, "init_args": {"dropout": 1.5}}, "head")
    with pytest.raises(UserError, match=r"unknown key 'head.init_arg' \(did you mean 'init_args'\?\)"):
        check_block({"class_path": block["class_path"], "init_arg": {}}, "head")


def test_override_creates_what_is_missing_and_the_check_judges_it():
    cfg = {"train": {"lr": 1.0}}
    apply_override(cfg, "evaluate.fit=false")
    apply_override(cfg, "train.lr=1e-3")
    assert cfg == {"train": {"lr": 1e-3}, "evaluate": {"fit": False}}
    with pytest.raises(UserError, match=r"train.lr is not a mapping"):
        apply_override(cfg, "train.lr.x=1")
    for bad in ("train.lr", "train..lr=1", "=3"):
        with pytest.raises(UserError, match="must look like key.path=value"):
            apply_override(cfg, bad)


@pytest.mark.parametrize("name", ["muon.yaml", "trackml.yaml", "hepattn_muon.yaml"])
def test_shipped_configs_pass_the_check(name):
    check_config(load_config(ROOT / "configs" / name))


def test_check_config_refuses_unknown_section(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "muon.yaml").read_text())
    config["evalute"] = {"bz": 2.0}
    with pytest.raises(UserError, match=r"unknown config section 'evalute' \(did you mean 'evaluate'\?\)"):
        check_config(config)
    config = yaml.safe_load((ROOT / "configs" / "muon.yaml").read_text())
    config["data"]["hit_fields"] = []
    with pytest.raises(UserError, match=r"config needs data.hit_fields, a non-empty list of field names"):
        check_config(config)


# --- an exception the CLI did not expect: a library's (exit 2) or a cachefeat bug (exit 1) -----


def _raise_in_cachefeat(exc: Exception):
    """Raise `exc` from a frame whose file lies in the cachefeat package, as a bug there would."""
    path = str(Path(cachefeat.__file__).parent / "imagined_module.py")
    scope = {"exc": exc}
    exec(compile("def run(args):\n    raise exc\n", path, "exec"), scope)
    return scope["run"]


def _torch_refuses(args):
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=-1.0)  # ValueError raised in torch's code


def _json_refuses(args):
    json.loads("{")  # json.JSONDecodeError: its class is the json module's


@pytest.mark.parametrize(
    "func,rc,start,library",
    [
        (_torch_refuses, 2, "cachefeat info: error: ValueError: Invalid learning rate: -1.0 (from torch; ", "torch"),
        (_json_refuses, 2, "cachefeat info: error: JSONDecodeError: Expecting property name", "json"),
        (_raise_in_cachefeat(OSError(28, "No space left on device")), 2,
         "cachefeat info: error: OSError: [Errno 28] No space left on device (from the system; ", "the system"),
        (_raise_in_cachefeat(ValueError("bad shape")), 1,
         "cachefeat info: internal error (a bug in cachefeat, please report it): ValueError: bad shape; ", None),
        (_raise_in_cachefeat(KeyError("hit_x")), 1, "cachefeat info: internal error", None),
        (lambda args: 1 / 0, 1, "cachefeat info: internal error (a bug in cachefeat, please report it): "
         "ZeroDivisionError: division by zero; rerun with --debug for the traceback", None),
    ],
    ids=["torch-valueerror", "json-error", "disk-full", "valueerror-in-cachefeat", "keyerror", "zerodivision"],
)
def test_unexpected_exception_is_one_line(monkeypatch, run_cli, tmp_path, func, rc, start, library):
    import cachefeat.cli.info as info

    monkeypatch.setattr(info, "run", func)
    code, _, err = run_cli(["info", tmp_path / "x.zarr"])
    assert code == rc, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(start), err
    assert "--debug" in err and "Traceback" not in err
    with pytest.raises(BaseException) as raised:
        cachefeat.cli.main(["--debug", "info", str(tmp_path / "x.zarr")])
    assert library_of(raised.value) == library


def test_failed_command_removes_only_what_it_created(monkeypatch, run_cli, tmp_path):
    import cachefeat.cli.train as train_cli

    def half_written(args):
        out = Path(args.output)
        out.mkdir(exist_ok=True)
        (out / "metrics.csv").write_text("epoch\n")
        raise UserError("stale cache")

    monkeypatch.setattr(train_cli, "run", half_written)
    argv = ["train", "--config", "c.yaml", "--cache", "c.zarr", "--val-cache", "v.zarr", "--output"]
    assert run_cli([*argv, tmp_path / "new_run"])[0] == 2
    assert not (tmp_path / "new_run").exists()
    existing = tmp_path / "old_run"
    existing.mkdir()
    (existing / "head.ckpt").write_text("weights")
    assert run_cli([*argv, existing])[0] == 2
    assert (existing / "head.ckpt").read_text() == "weights"
