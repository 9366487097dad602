"""YAML configs with `class_path`/`init_args` blocks (as in hepattn and LightningCLI).

A config is a plain dict loaded from YAML. Model parts are blocks of the form::

    model:
      class_path: cachefeat.model.maskformer.MaskFormer
      init_args: {dim: 32, ...}

`instantiate` imports the class and calls it with `init_args`; unknown argument names are
refused with a did-you-mean. Dotted overrides (`model.init_args.dim=64`) are applied after
loading, their values parsed as YAML scalars.

What a setting may take is declared next to it, as an `Allowed` per key: a module's section
defaults come with an `ALLOWED` dict (`section(cfg, "train", DEFAULTS, ALLOWED)`), a class
built from `init_args` carries one as its `ALLOWED` attribute (checked by `check_block` and
`instantiate`). A value outside its range is one line naming the key, the value and what is
allowed.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cachefeat.errors import UserError


def did_you_mean(name: str, options) -> str:
    """' (did you mean X?)' when a close option exists, else ''.

    Close: a similar spelling (difflib), else an option that starts the name or that the name
    starts (`lr_rate` -> `lr`, `batch` -> `batch_size`), the longest such option.
    """
    options = [str(o) for o in options]
    close = difflib.get_close_matches(name, options, n=1)
    if not close and len(name) >= 2:
        close = sorted((o for o in options if len(o) >= 2 and (name.startswith(o) or o.startswith(name))),
                       key=len, reverse=True)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_config(path: str | Path, overrides: list[str] | None = None, require: tuple[str, ...] = ()) -> dict:
    """Read a YAML config and apply dotted `key.path=value` overrides.

    `require` names top-level sections that must be present (after the overrides).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(cfg, dict):
        raise UserError(f"config {path} must be a mapping at top level")
    for item in overrides or []:
        apply_override(cfg, item)
    for name in require:
        if name not in cfg:
            raise UserError(f"config {path} has no '{name}' section{did_you_mean(name, cfg)}")
        if not isinstance(cfg[name], dict):
            raise UserError(f"config {path}: section '{name}' must be a mapping")
    return cfg


def apply_override(cfg: dict, item: str) -> None:
    """Set `a.b.c=value` in place, creating the mappings on the way that are missing.

    Whether the key exists is not checked here but where its section is read (`section`,
    `check_block`), as for a key written in the file: `--set evaluate.fit=false` works on a
    config without that key, and a typo is refused with a did-you-mean there.
    """
    if "=" not in item:
        raise UserError(f"override '{item}' must look like key.path=value")
    dotted, raw = item.split("=", 1)
    keys = dotted.split(".")
    if not all(keys):
        raise UserError(f"override '{item}' must look like key.path=value")
    node = cfg
    for i, key in enumerate(keys[:-1]):
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise UserError(f"override '{dotted}': {'.'.join(keys[: i + 1])} is not a mapping")
    node[keys[-1]] = parse_value(raw)


def parse_value(raw: str):
    """A command-line value as YAML would read it, except that `1e-3` is a float (YAML 1.1 says str)."""
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return yaml.safe_load(raw)


@dataclass(frozen=True)
class Allowed:
    """The values one setting may take: a number in an interval, or one of some choices.

    `low`/`high`: bounds (None: unbounded), excluded when `low_open`/`high_open`; `integer`:
    whole numbers only; `choices`: the only values allowed; `none`: null is allowed too.
    Booleans are never numbers here.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    choices: tuple = ()
    none: bool = False

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            text = "an integer" if self.integer else "a number"
            if self.low is not None and self.high is not None:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text += f" in {left}{self.low:g}, {self.high:g}{right}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {self.high:g}"
        return text + (" or null" if self.none else "")

    def admits(self, value) -> bool:
        if value is None:
            return self.none
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if value != value:  # NaN
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def check(self, key: str, value) -> None:
        """UserError `KEY must be WHAT, not VALUE` (with a did-you-mean for choices) unless allowed."""
        if not self.admits(value):
            hint = did_you_mean(value, self.choices) if self.choices and isinstance(value, str) else ""
            raise UserError(f"{key} must be {self.describe()}, not {value!r}{hint}")


def at_least(low: float, *, integer: bool = False, none: bool = False) -> Allowed:
    return Allowed(low=low, integer=integer, none=none)


def above(low: float, *, none: bool = False) -> Allowed:
    return Allowed(low=low, low_open=True, none=none)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
            none: bool = False) -> Allowed:
    return Allowed(low=low, high=high, low_open=low_open, high_open=high_open, none=none)


def one_of(*choices, none: bool = False) -> Allowed:
    return Allowed(choices=tuple(choices), none=none)


POSITIVE_INT = at_least(1, integer=True)
PROBABILITY = between(0.0, 1.0, low_open=True, high_open=True)  # a threshold on a sigmoid: (0, 1)
DROPOUT = between(0.0, 1.0, high_open=True)


def check_allowed(where: str, values: dict, allowed: dict) -> None:
    """Check each of `values` that `allowed` has a rule for; keys are reported as `where.key`."""
    for key, rule in allowed.items():
        if key in values:
            rule.check(f"{where}.{key}", values[key])


def section(cfg: dict, name: str, defaults: dict, allowed: dict | None = None) -> dict:
    """Return `cfg[name]` merged over `defaults`.

    Unknown keys are refused with a did-you-mean, a value of another type than its default is
    refused, and so is one outside its `allowed` rule (`Allowed` per key).
    """
    given = cfg.get(name) or {}
    if not isinstance(given, dict):
        raise UserError(f"config section '{name}' must be a mapping")
    for key, value in given.items():
        if key not in defaults:
            raise UserError(f"unknown key '{name}.{key}'{did_you_mean(key, defaults)}")
        _check_type(f"{name}.{key}", value, defaults[key])
    check_allowed(name, given, allowed or {})
    out = copy.deepcopy(defaults)
    out.update(given)
    return out


def _check_type(key: str, value, default) -> None:
    """Refuse a value whose type differs from its default's (ints pass as floats; a None default takes any)."""
    if default is None:
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, (list, tuple)):
        ok, kind = isinstance(value, (list, tuple)), "a list"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    else:
        ok, kind = isinstance(value, type(default)), f"a {type(default).__name__}"
    if not ok:
        hint = ""
        if isinstance(value, str) and kind == "a number" and _is_number(value):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)"
        elif isinstance(value, bool) and kind == "a string":
            hint = " (YAML reads no/yes/off/on as booleans: quote the value)"
        raise UserError(f"{key} must be {kind}, not {value!r}{hint}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def resolve_class(class_path: str):
    module_name, _, attr = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"cannot import class_path '{class_path}': {exc}") from exc


def check_block(block: dict, where: str):
    """Check a `class_path`/`init_args` block without building it; returns the class.

    Refused: a missing class_path, keys beside class_path/init_args, init_args the class does not
    take (did-you-mean), and values outside the class's `ALLOWED` rules.
    """
    if not isinstance(block, dict) or "class_path" not in block:
        raise UserError(f"config '{where}' needs a class_path (and init_args)")
    unknown = set(block) - {"class_path", "init_args"}
    if unknown:
        key = sorted(unknown)[0]
        raise UserError(f"unknown key '{where}.{key}'{did_you_mean(key, ['class_path', 'init_args'])}")
    cls = resolve_class(block["class_path"])
    kwargs = block.get("init_args") or {}
    if not isinstance(kwargs, dict):
        raise UserError(f"config '{where}.init_args' must be a mapping")
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in params:
                raise UserError(f"unknown key '{where}.init_args.{key}'{did_you_mean(key, params)}")
    check_allowed(f"{where}.init_args", kwargs, getattr(cls, "ALLOWED", {}))
    return cls


def instantiate(block: dict, where: str, **extra: Any):
    """Build the object described by a `class_path`/`init_args` block (checked by `check_block`).

    `extra` are keyword arguments supplied by code (not by the config), e.g. field lists.
    """
    cls = check_block(block, where)
    kwargs = dict(block.get("init_args") or {})
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs.update({k: v for k, v in extra.items() if k in params or takes_any})
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"cannot build '{where}' ({block['class_path']}): {exc}") from exc


HEPATTN_HINT = ("install its runtime packages with `pip install 'cachefeat[hepattn]'` and put hepattn's src "
                "folder on PYTHONPATH (e.g. PYTHONPATH=path/to/hepattn/src)")


def build_tree(block: dict, base: type, where: str):
    """Build a nested `class_path`/`init_args` tree as LightningCLI builds it (jsonargparse), as an
    instance of `base` (e.g. `nn.Module`, `LightningDataModule`). A bad tree is one UserError that
    keeps jsonargparse's whole message (it names the failing key) on one line."""
    try:
        from jsonargparse import ArgumentParser
    except ImportError as exc:
        raise UserError(f"building config '{where}' needs jsonargparse: {HEPATTN_HINT}") from exc
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--tree", type=base)
    try:
        # `instantiate` since jsonargparse 4.49 (which deprecates `instantiate_classes` with a warning)
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        return instantiate(parser.parse_object({"tree": block})).tree
    except Exception as exc:  # jsonargparse reports bad trees as several exception types
        what = " ".join(str(exc).split())[:500] or type(exc).__name__
        raise UserError(f"cannot build config '{where}' ({block.get('class_path', '?')}): {what}") from exc


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (config hashing for fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
