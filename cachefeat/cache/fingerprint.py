"""What a cache was made from, and how to tell whether it is stale.

A fingerprint is a JSON dict stored in the cache's root attributes. Everything in it that
changes the cached numbers (weights, backbone config, input data, content settings, format)
makes a mismatch stale; library versions only warn, since they rarely change the numbers.
"""

from __future__ import annotations

import numpy as np
import torch
import zarr

import cachefeat
from cachefeat.cache.schema import FORMAT_VERSION
from cachefeat.config import stable_hash

# Extraction settings that change what is stored (layout settings such as block_size do not).
CONTENT_SETTINGS = ("floor", "embed_dtype", "precision", "keep_hits", "keep_queries")

_LABELS = {
    "format_version": "cache format version",
    "checkpoint_sha256": "checkpoint weights",
    "backbone_config_hash": "backbone config",
    "input_hash": "input data",
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
        "versions": {
            "cachefeat": cachefeat.__version__,
            "torch": torch.__version__,
            "zarr": zarr.__version__,
            "numpy": np.__version__,
        },
    }


def _short(value) -> str:
    text = str(value)
    return text[:8] + "…" if len(text) > 12 else text


def fingerprint_diff(stored: dict, expected: dict) -> tuple[list[str], list[str]]:
    """(stale, warnings) between a cache's fingerprint and the one expected now.

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
            a, b = a or {}, b or {}
            for lib in sorted(set(a) | set(b)):
                if a.get(lib) != b.get(lib):
                    warnings.append(f"{lib} version {a.get(lib, '<missing>')} vs {b.get(lib, '<missing>')}")
        elif key == "settings":
            a, b = a or {}, b or {}
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    stale.append(f"settings.{name}: {a.get(name, '<missing>')} vs {b.get(name, '<missing>')}")
        elif key == "checkpoint_sha256":
            stale.append(f"checkpoint weights differ (sha256 {_short(a)} vs {_short(b)})")
        elif key in _LABELS:
            detail = f" ({a} vs {b})" if key == "format_version" else ""
            stale.append(f"{_LABELS[key]} differs{detail}")
        else:
            stale.append(f"{key}: {_short(a)} vs {_short(b)}")
    return stale, warnings
