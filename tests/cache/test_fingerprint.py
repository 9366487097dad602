"""make_fingerprint contents, fingerprint_diff's stale/warning split one difference at a time, and
cache_differences / check_cache, the staleness check of train, sweep, evaluate, verify and demo."""

from __future__ import annotations

import copy
import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

import cachefeat
from cachefeat.cache import FORMAT_VERSION, fingerprint_diff, make_fingerprint
from cachefeat.cache.fingerprint import cache_differences, check_cache, config_hash
from cachefeat.config import stable_hash
from cachefeat.errors import UserError

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


CONFIG_LINE = "backbone config differs (model block or data fields) from the one it was extracted with"
INPUT_LINE = "input data differs (the input events differ from the ones it was extracted from)"


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
            CONFIG_LINE,
        ),
        "input": (fingerprint(input_hash="other"), INPUT_LINE),
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
    assert INPUT_LINE in stale and "settings.floor: 0.05 vs 0.2" in stale


def test_cache_differences_compare_what_is_given_in_fingerprint_diff_words():
    stored = fingerprint()
    assert cache_differences(stored) == []
    assert cache_differences(stored, backbone_config_hash=stable_hash(CONFIG), checkpoint_sha256="ab12" * 16,
                             input_hash="in" * 32) == []
    assert cache_differences(stored, backbone_config_hash="x", checkpoint_sha256="cd34" * 16,
                             input_hash="other") == [
        CONFIG_LINE, "checkpoint weights differ (sha256 ab12ab12… vs cd34cd34…)", INPUT_LINE]
    # the same line as the whole-fingerprint comparison of the writer
    assert cache_differences(stored, input_hash="other") == fingerprint_diff(stored, fingerprint(input_hash="other"))[0]


def test_check_cache_refuses_a_stale_cache_unless_allowed(caplog):
    config = {"model": CONFIG["model"], "data": {"hit_fields": ["x"], "particle_fields": ["pt"]}}
    reader = SimpleNamespace(path="c.zarr", fingerprint=fingerprint() | {"backbone_config_hash": config_hash(config)})
    assert check_cache(reader, config, checkpoint_sha256="ab12" * 16) == []
    with pytest.raises(UserError, match=r"^val c.zarr does not match: input data differs .*\(re-extract it"):
        check_cache(reader, config, input_hash="other", what="val")
    with pytest.raises(UserError, match=r"backbone config differs .*\(pass the right config\)$"):
        check_cache(reader, {**config, "data": {"hit_fields": ["y"]}}, hint="pass the right config")
    assert check_cache(reader, config, input_hash="other", allow_stale=True) == [INPUT_LINE]
    assert "c.zarr does not match: input data differs" in caplog.text and "--allow-stale" in caplog.text


def test_demo_reuses_a_cache_only_when_it_is_not_stale(muon_config, stage1_checkpoint, muon_events, muon_val_events,
                                                        cache32, monkeypatch):
    from pathlib import Path

    import cachefeat.cache.extract
    from cachefeat.cli.demo import _cache

    monkeypatch.setattr(cachefeat.cache.extract, "extract", lambda *args, **kwargs: {"seconds": 0.0})
    path = Path(cache32.path)
    assert _cache(muon_config, stage1_checkpoint, muon_events, path, "cpu")[1] == "reused"
    assert _cache(muon_config, stage1_checkpoint, muon_val_events, path, "cpu")[1] == "extracted"
    other = copy.deepcopy(muon_config)
    other["model"]["init_args"]["mask_attention_threshold"] = 0.2
    assert _cache(other, stage1_checkpoint, muon_events, path, "cpu")[1] == "extracted"
