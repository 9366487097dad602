"""make_fingerprint contents and fingerprint_diff's stale/warning split, one difference at a time."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import torch
import zarr

import cachefeat
from cachefeat.cache import FORMAT_VERSION, fingerprint_diff, make_fingerprint

CONFIG = {"model": {"class_path": "cachefeat.model.maskformer.MaskFormer", "init_args": {"dim": 32}}}
SETTINGS = {
    "floor": 0.05,
    "embed_dtype": "float16",
    "precision": "fp32",
    "keep_hits": "assigned",
    "keep_queries": "all",
    "block_size": 4096,
    "batch_size": 64,
}


def fingerprint(**changes) -> dict:
    args = {
        "checkpoint_sha256": "ab12" * 16,
        "backbone_config": CONFIG,
        "input_hash": "in" * 32,
        "settings": SETTINGS,
    }
    args.update(changes)
    return make_fingerprint(**args)


def test_make_fingerprint_contents():
    fp = fingerprint()
    assert fp["format_version"] == FORMAT_VERSION
    assert fp["checkpoint_sha256"] == "ab12" * 16 and fp["input_hash"] == "in" * 32
    assert (
        fp["backbone_config_hash"] == hashlib.sha256(json.dumps(CONFIG, sort_keys=True).encode()).hexdigest()
    )
    # only the content-changing settings; layout settings (block_size, batch_size) do not make a cache stale
    assert fp["settings"] == {
        "floor": 0.05,
        "embed_dtype": "float16",
        "precision": "fp32",
        "keep_hits": "assigned",
        "keep_queries": "all",
    }
    assert fp["versions"] == {
        "cachefeat": cachefeat.__version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
    }
    assert json.loads(json.dumps(fp)) == fp
    assert fingerprint(settings={**SETTINGS, "block_size": 8}) == fp


def test_identical_fingerprints_have_no_difference():
    assert fingerprint_diff(fingerprint(), fingerprint()) == ([], [])


def test_each_kind_of_difference_is_listed():
    stored = fingerprint()
    cases = {
        "weights": (
            fingerprint(checkpoint_sha256="cd34" * 16),
            "checkpoint weights differ (sha256 ab12ab12… vs cd34cd34…)",
        ),
        "config": (
            fingerprint(backbone_config={"model": {"init_args": {"dim": 64}}}),
            "backbone config differs",
        ),
        "input": (fingerprint(input_hash="other"), "input data differs"),
        "floor": (fingerprint(settings={**SETTINGS, "floor": 0.1}), "settings.floor: 0.05 vs 0.1"),
        "dtype": (
            fingerprint(settings={**SETTINGS, "embed_dtype": "float32"}),
            "settings.embed_dtype: float16 vs float32",
        ),
    }
    for name, (expected, line) in cases.items():
        assert fingerprint_diff(stored, expected) == ([line], []), name

    fewer = fingerprint(settings={k: v for k, v in SETTINGS.items() if k != "keep_queries"})
    assert fingerprint_diff(stored, fewer) == (["settings.keep_queries: all vs <missing>"], [])

    newer = copy.deepcopy(stored)
    newer["format_version"] = FORMAT_VERSION + 1
    assert fingerprint_diff(stored, newer) == (
        [f"cache format version differs ({FORMAT_VERSION} vs {FORMAT_VERSION + 1})"],
        [],
    )


def test_library_versions_only_warn():
    stored, expected = fingerprint(), fingerprint()
    expected["versions"]["torch"] = "9.9.9"
    expected["versions"]["zarr"] = "4.0.0"
    stale, warnings = fingerprint_diff(stored, expected)
    assert stale == []
    assert warnings == [
        f"torch version {torch.__version__} vs 9.9.9",
        f"zarr version {zarr.__version__} vs 4.0.0",
    ]


def test_several_differences_at_once():
    expected = fingerprint(
        checkpoint_sha256="cd34" * 16, input_hash="other", settings={**SETTINGS, "floor": 0.2}
    )
    expected["versions"]["numpy"] = "0.0"
    stale, warnings = fingerprint_diff(fingerprint(), expected)
    assert len(stale) == 3 and len(warnings) == 1
    assert any("checkpoint weights differ" in s for s in stale)
    assert "input data differs" in stale and "settings.floor: 0.05 vs 0.2" in stale
