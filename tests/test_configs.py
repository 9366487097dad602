"""Every shipped config loads, and every part of it builds: each section against its module's
defaults (unknown keys refused), the backbone and the head (a hepattn config needs hepattn:
skipped with the reason without it), and its header shows the commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachefeat.cache.extract import EXTRACT_DEFAULTS
from cachefeat.config import load_config, section
from cachefeat.evaluation.predict import EVALUATE_DEFAULTS
from cachefeat.head.checkpoint import build_head
from cachefeat.model.hepattn import is_hepattn_block
from cachefeat.training.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from cachefeat.training.sweep import SWEEP_DEFAULTS
from cachefeat.training.train import DEFAULTS as TRAIN_DEFAULTS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SECTIONS = {"extract": EXTRACT_DEFAULTS, "train": TRAIN_DEFAULTS, "pretrain": PRETRAIN_DEFAULTS,
            "evaluate": EVALUATE_DEFAULTS, "sweep": SWEEP_DEFAULTS}


def test_the_shipped_configs_are_all_here():
    assert {p.name for p in CONFIGS} >= {"muon.yaml", "trackml.yaml", "hepattn_muon.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_builds(path, request):
    config = load_config(path, require=("data", "model", "head"))
    for name, defaults in SECTIONS.items():
        if name in config:
            section(config, name, defaults)
    if is_hepattn_block(config["model"]):
        request.getfixturevalue("hepattn_src")  # skips with the reason when hepattn is not importable
    from cachefeat.model.backbone import build_backbone

    backbone = build_backbone(config)
    assert sum(p.numel() for p in backbone.parameters()) > 0
    data = config["data"]
    head = build_head(config, data["hit_fields"], data["particle_fields"])
    assert head.head_config()["dim"] == backbone.dim
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("cachefeat extract" in line for line in header) and any("cachefeat train" in line for line in header)
