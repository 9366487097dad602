"""What a cache was made from, and how to tell whether it is stale.

A fingerprint is a JSON dict stored in the cache's root attributes. Everything in it that
changes the cached numbers (weights, backbone config, input data, content settings, format)
makes a mismatch stale; library versions only warn, since they rarely change the numbers.

Two checks, one wording (`_difference`):

- `cache_differences` / `check_cache`: is a cache stale for what a caller knows (a config, a
  checkpoint, an input)? Used by train, sweep, evaluate, verify and demo.
- `fingerprint_diff`: are two whole fingerprints the same? Used by the writer, which resumes
  or joins a cache only when everything matches.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import zarr

import cachefeat
from cachefeat.cache.schema import FORMAT_VERSION
from cachefeat.config import stable_hash
from cachefeat.errors import UserError

log = logging.getLogger(__name__)

# Extraction settings that change what is stored (layout settings such as block_size do not).
CONTENT_SETTINGS = ("floor", "embed_dtype", "precision", "keep_hits", "keep_queries")
# The fingerprint entries of the backbone: a head trained on one backbone's features needs them equal.
BACKBONE_KEYS = ("checkpoint_sha256", "backbone_config_hash")

def library_versions() -> dict[str, str]:
    """The versions of the libraries that write and read a cache, as a fingerprint records them."""
    return {
        "cachefeat": cachefeat.__version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
    }


def make_fingerprint(
    *, checkpoint_sha256: str, backbone_config: dict, input_hash: str, settings: dict
) -> dict:
    """The fingerprint of a cache extracted with these inputs.

    `settings` may hold any extraction settings; only CONTENT_SETTINGS present in it are kept.
    """
    return {
        "format_version": FORMAT_VERSION,
        "checkpoint_sha256": checkpoint_sha256,
        "backbone_config_hash": stable_hash(backbone_config),
        "input_hash": input_hash,
        "settings": {k: settings[k] for k in CONTENT_SETTINGS if k in settings},
        "versions": library_versions(),
    }


def config_hash(config: dict) -> str:
    """The fingerprint's `backbone_config_hash` of a cache extracted with `config`."""
    from cachefeat.cache.frozen import backbone_fingerprint_inputs  # frozen imports the model package

    return stable_hash(backbone_fingerprint_inputs(config))


def _short(value) -> str:
    text = str(value)
    return text[:8] + "…" if len(text) > 12 else text


def _difference(key: str, a, b) -> str:
    """The line naming one differing fingerprint entry (not settings or versions): `a` stored, `b` expected."""
    if key == "checkpoint_sha256":
        return f"checkpoint weights differ (sha256 {_short(a)} vs {_short(b)})"
    if key == "format_version":
        return f"cache format version differs ({a} vs {b})"
    if key == "backbone_config_hash":
        return "backbone config differs (model block or data fields) from the one it was extracted with"
    if key == "input_hash":
        return "input data differs (the input events differ from the ones it was extracted from)"
    return f"{key}: {_short(a)} vs {_short(b)}"


def cache_differences(
    fingerprint: dict,
    *,
    config: dict | None = None,
    backbone_config_hash: str | None = None,
    checkpoint_sha256: str | None = None,
    input_hash: str | None = None,
) -> list[str]:
    """What makes a cache with `fingerprint` stale for the given inputs; [] when nothing does.

    Only what is given is compared: the backbone config (`config`, or its `backbone_config_hash`
    directly), the checkpoint weights' sha256 and the input's content hash. One line per
    difference, in that order, each naming the cache's value first.
    """
    if config is not None:
        backbone_config_hash = config_hash(config)
    expected = {
        "backbone_config_hash": backbone_config_hash,
        "checkpoint_sha256": checkpoint_sha256,
        "input_hash": input_hash,
    }
    return [
        _difference(key, fingerprint.get(key), value)
        for key, value in expected.items()
        if value is not None and fingerprint.get(key) != value
    ]


def check_cache(
    reader,
    config: dict | None,
    *,
    checkpoint_sha256: str | None = None,
    input_hash: str | None = None,
    allow_stale: bool = False,
    what: str = "cache",
    hint: str = "re-extract it, or pass --allow-stale",
) -> list[str]:
    """The `cache_differences` of `reader`'s cache against `config` (and the checkpoint / input when known).

    Returns the differences; raises UserError naming them (and `hint`) unless `allow_stale`,
    which logs them as a warning instead.
    """
    diffs = cache_differences(
        reader.fingerprint, config=config, checkpoint_sha256=checkpoint_sha256, input_hash=input_hash
    )
    if diffs:
        message = f"{what} {reader.path} does not match: " + "; ".join(diffs)
        if not allow_stale:
            raise UserError(f"{message} ({hint})")
        log.warning("%s (--allow-stale: training anyway)", message)
    return diffs


def version_changes(stored: dict, expected: dict) -> list[str]:
    """One line per library whose version differs between two `versions` entries."""
    stored, expected = stored or {}, expected or {}
    return [
        f"{lib} version {stored.get(lib, '<missing>')} vs {expected.get(lib, '<missing>')}"
        for lib in sorted(set(stored) | set(expected))
        if stored.get(lib) != expected.get(lib)
    ]


def fingerprint_diff(stored: dict, expected: dict) -> tuple[list[str], list[str]]:
    """(stale, warnings) between a cache's whole fingerprint and the one expected now.

    Each entry is one line, written "<stored> vs <expected>". `stale` lists differences that
    make the cached content wrong for the expected inputs; `warnings` lists library version
    changes only.
    """
    stale, warnings = [], []
    for key in sorted(set(stored) | set(expected)):
        a, b = stored.get(key), expected.get(key)
        if a == b:
            continue
        if key == "versions":
            warnings += version_changes(a, b)
        elif key == "settings":
            a, b = a or {}, b or {}
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    stale.append(f"settings.{name}: {a.get(name, '<missing>')} vs {b.get(name, '<missing>')}")
        else:
            stale.append(_difference(key, a, b))
    return stale, warnings
