"""`FrozenBackbone`: the frozen forward shared by extraction and the live training path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cachefeat.cache.frozen import FrozenBackbone, backbone_fingerprint_inputs
from cachefeat.errors import UserError


@pytest.fixture(scope="session")
def batch(tiny_config, edge_events_file):
    """A padded batch mixing hit-less, noise-only and muon events."""
    from cachefeat.data.events import EventFile

    data = tiny_config["data"]
    with EventFile(edge_events_file, data["hit_fields"], data["particle_fields"]) as events:
        return events.read([20, 0, 9, 5, 13, 23])


def test_frozen_state(ref, tiny_config, checkpoint):
    from cachefeat.model.checkpoint import load_checkpoint

    frozen = FrozenBackbone(tiny_config, checkpoint)
    assert not frozen.model.training
    assert not any(p.requires_grad for p in frozen.model.parameters())
    assert frozen.checkpoint_sha256 == load_checkpoint(checkpoint)["weights_sha256"]
    assert frozen.raw_fields == frozen.hit_fields == tiny_config["data"]["hit_fields"]
    assert frozen.particle_fields == tiny_config["data"]["particle_fields"]


@pytest.mark.parametrize("floor", [0.1, 0.5])
def test_head_batch_equals_brute_force(ref, tiny_config, checkpoint, batch, floor):
    """head_batch == the model run directly, sparsified by brute force, event by event."""
    frozen = FrozenBackbone(tiny_config, checkpoint)
    hb, metrics = frozen.head_batch(batch, floor)
    live = ref.live_batch(ref.load_tiny(tiny_config, checkpoint), batch, tiny_config["data"])
    assert hb.num_events == len(live)
    for e, ev in enumerate(live):
        got, want = ref.cached_event(hb, e), ref.expected_event(ev, floor)
        for key, value in want.items():
            if key == "event_id":
                assert got[key] == value
            else:
                assert torch.equal(got[key], value.to(got[key].dtype)), (e, key)
        for name, value in ev["metrics"].items():
            assert metrics[name][e] == value, (e, name)
    np.testing.assert_array_equal(metrics["n_valid_hits"], batch["hit_valid"].sum(1).numpy())
    assert all(v.dtype == np.int64 and v.shape == (len(live),) for v in metrics.values())


def test_forward_is_the_models(ref, tiny_config, checkpoint, batch):
    frozen = FrozenBackbone(tiny_config, checkpoint)
    with torch.no_grad():
        want = ref.load_tiny(tiny_config, checkpoint)(batch)
    got = frozen.forward(batch)
    for key in ("hit_embed", "query_embed", "track_valid", "track_hit_logit"):
        assert torch.equal(got[key], want[key]), key


def test_bf16_forward_is_close(tiny_config, checkpoint, batch):
    """precision="bf16" autocasts the forward; logits come back as float32, near the fp32 ones."""
    hb32, _ = FrozenBackbone(tiny_config, checkpoint).head_batch(batch, 0.1, keep_hits="all")
    hb16, _ = FrozenBackbone(tiny_config, checkpoint, precision="bf16").head_batch(batch, 0.1, keep_hits="all")
    assert hb16.query_valid_logit.dtype == torch.float32 and hb16.pair_logit.dtype == torch.float32
    assert torch.equal(hb16.hit_offsets, hb32.hit_offsets)
    torch.testing.assert_close(hb16.query_valid_logit, hb32.query_valid_logit, atol=0.1, rtol=0.05)
    torch.testing.assert_close(hb16.query_embed.float(), hb32.query_embed, atol=0.1, rtol=0.05)


def test_errors(ref, tiny_config, checkpoint, tmp_path):
    from cachefeat.model.checkpoint import save_checkpoint

    with pytest.raises(UserError, match="checkpoint not found"):
        FrozenBackbone(tiny_config, tmp_path / "missing.ckpt")
    other = copy.deepcopy(tiny_config)
    other["model"]["init_args"]["dim"] = 8
    save_checkpoint(tmp_path / "dim8.ckpt", ref.build_model(other), other)
    with pytest.raises(UserError, match="does not fit this config"):
        FrozenBackbone(tiny_config, tmp_path / "dim8.ckpt")
    with pytest.raises(UserError, match="precision"):
        FrozenBackbone(tiny_config, checkpoint, precision="fp16")


def test_fingerprint_inputs_cover_the_backbone_only(tiny_config):
    base = backbone_fingerprint_inputs(tiny_config)
    cfg = copy.deepcopy(tiny_config)
    cfg["head"]["init_args"]["assignment_threshold"] = 0.3
    cfg["extract"]["batch_size"] = 3
    cfg["train"] = {"epochs": 1}
    assert backbone_fingerprint_inputs(cfg) == base
    for section, key, value in (
        ("model", "init_args", {"dim": 8}),
        ("data", "max_hits", 10),
        ("data", "hit_fields", ["x"]),
        ("data", "particle_fields", ["pt"]),
    ):
        cfg = copy.deepcopy(tiny_config)
        cfg[section][key] = value
        assert backbone_fingerprint_inputs(cfg) != base, (section, key)
