"""The real hepattn MaskFormer as cachefeat's backbone: built from the shipped config as
LightningCLI builds it, its Lightning checkpoint taken as it is, the four tensors the cache
needs, and the matching, each checked against hepattn's own code."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml

from cachefeat.cache.frozen import FrozenBackbone
from cachefeat.data.loading import open_events
from cachefeat.errors import UserError
from cachefeat.model.checkpoint import load_checkpoint, weights_sha256
from cachefeat.model.tasks import PAD_LOGIT

pytestmark = pytest.mark.hepattn

UPSTREAM_CONFIG = "experiments/atlas_muon/config/muon_tracking.yaml"


@pytest.fixture(scope="module")
def frozen(hepattn_config, hepattn_checkpoint) -> FrozenBackbone:
    return FrozenBackbone(hepattn_config, hepattn_checkpoint)


@pytest.fixture(scope="module")
def batch(hepattn_config, hepattn_train_split) -> dict:
    return open_events(hepattn_config, hepattn_train_split).read(np.array([7, 3, 30, 12, 5]))


def test_shipped_config_builds_the_upstream_model(hepattn_src, hepattn_config):
    """configs/hepattn_muon.yaml's model == upstream's ATLAS-muon `model.model` block built
    directly with jsonargparse: same parameter names, shapes, 69,465 parameters."""
    from jsonargparse import ArgumentParser

    from cachefeat.model.backbone import build_backbone

    block = yaml.safe_load((hepattn_src / "hepattn" / UPSTREAM_CONFIG).read_text())["model"]["model"]
    block["init_args"]["encoder"]["init_args"]["attn_type"] = "torch"
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=torch.nn.Module)
    upstream = parser.instantiate_classes(parser.parse_object({"model": block})).model
    ours = build_backbone(hepattn_config).stage1_module
    assert type(ours) is type(upstream)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in upstream.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 69_465
    assert ours.encoder.attn_type == "torch"  # the CPU override of the config's flash attention


def test_lightning_checkpoint_is_taken_as_it_is(hepattn_checkpoint, frozen):
    """The .ckpt hepattn's fit wrote: weights loaded unchanged, fingerprinted by them alone."""
    raw = torch.load(hepattn_checkpoint, map_location="cpu", weights_only=True)
    assert "pytorch-lightning_version" in raw
    ckpt = load_checkpoint(hepattn_checkpoint)
    assert ckpt["weights_sha256"] == frozen.checkpoint_sha256
    own = frozen.model.stage1_module.state_dict()
    for key, value in raw["state_dict"].items():
        assert torch.equal(own[key.removeprefix("model.")], value), key
    edited = copy.deepcopy(raw["state_dict"])
    first = next(iter(edited))
    edited[first] = edited[first] + 1e-6
    assert weights_sha256(edited) != ckpt["weights_sha256"]
    # the Lightning loops and optimizer states do not enter the fingerprint
    assert weights_sha256(raw["state_dict"]) == ckpt["weights_sha256"]


def test_checkpoint_of_another_architecture_names_the_first_key(hepattn_config, stage1_checkpoint):
    with pytest.raises(UserError, match=r"does not fit this config: weights .*model\.") as err:
        FrozenBackbone(hepattn_config, stage1_checkpoint)
    assert "\n" not in str(err.value)


def test_four_tensors_are_the_final_ones(frozen, batch):
    """hit_embed / query_embed are the decoder's final embeddings: hepattn's own task modules,
    applied to them, give the final track_valid and track_hit_logit of the model's forward."""
    out = frozen.forward(batch)
    net = frozen.model.stage1_module
    tasks = {task.name: task for task in net.tasks}
    x = {"query_embed": out["query_embed"], "hit_embed": out["hit_embed"], "hit_valid": batch["hit_valid"]}
    with torch.no_grad():
        logit = tasks["track_hit_valid"](x)["track_hit_logit"]
        valid = tasks["track_valid"](x)["track_logit"]
    hit_valid = batch["hit_valid"][:, None, :].expand_as(logit)
    torch.testing.assert_close(out["track_hit_logit"][hit_valid], logit[hit_valid], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["track_valid"], valid, rtol=1e-6, atol=1e-6)
    # hepattn pads with finfo(float32).min; the cache's contract is PAD_LOGIT, never an overflow
    assert (out["track_hit_logit"][~hit_valid] == PAD_LOGIT).all()
    raw = out["hepattn"]["final"]["track_hit_valid"]["track_hit_logit"]
    assert (raw[~hit_valid] == torch.finfo(raw.dtype).min).all()
    assert out["hit_embed"].shape[:2] == batch["hit_valid"].shape and out["hit_embed"].shape[2] == 32


def test_an_event_alone_equals_the_event_in_a_padded_batch(frozen, hepattn_config, hepattn_train_split):
    """Padding hits do not change the valid outputs (float32 summation order only)."""
    events = open_events(hepattn_config, hepattn_train_split)
    together = frozen.forward(events.read(np.array([4, 9, 2])))
    alone = frozen.forward(events.read(np.array([9])))
    n = int(events.read(np.array([9]))["hit_valid"].sum())
    for key in ("hit_embed", "query_embed", "track_valid", "track_hit_logit"):
        a, b = alone[key][0], together[key][1]
        if key == "hit_embed":
            a, b = a[:n], b[:n]
        elif key == "track_hit_logit":
            a, b = a[:, :n], b[:, :n]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(a.abs().max())), msg=key)


def test_matching_is_hepattns(frozen, batch):
    """cachefeat's target_index == the permutation hepattn's own `loss` applies before its losses:
    after it, output slot i is target i, so the permuted final track logit of slot i must be the
    logit of the query matched to particle i."""
    out = frozen.forward(batch)
    target_index = frozen.model.match(out, batch)
    net = frozen.model.stage1_module
    targets = frozen.model._targets(batch)
    raw = {k: {t: dict(v) for t, v in layer.items()} if isinstance(layer, dict) else layer
           for k, layer in out["hepattn"].items()}
    with torch.no_grad():
        _, _, decoder_outputs = net._prepare_targets_and_outputs(raw, targets)
        costs = net._compute_decoder_costs({"final": decoder_outputs["final"]}, targets)
        net._match_and_permute_outputs({"final": decoder_outputs["final"]}, costs, targets)
    permuted = decoder_outputs["final"]["track_valid"]["track_logit"]
    valid = targets["particle_valid"]
    assert (target_index >= 0).sum() == valid.sum()
    for b, n in (target_index >= 0).nonzero().tolist():
        i = int(target_index[b, n])
        assert valid[b, i]
        assert permuted[b, i] == out["track_valid"][b, n]


def test_missing_task_is_named(hepattn_config):
    from cachefeat.model.backbone import build_backbone

    config = copy.deepcopy(hepattn_config)
    config["hepattn"]["hit_task"] = "track_hits"
    with pytest.raises(UserError, match="no hit-assignment task 'track_hits'.*track_hit_valid"):
        build_backbone(config)
    config = copy.deepcopy(hepattn_config)
    modules = config["model"]["init_args"]["tasks"]["init_args"]["modules"]
    modules[:] = [m for m in modules if m["init_args"]["name"] != "track_valid"]
    with pytest.raises(UserError, match="no validity task 'track_valid'"):
        build_backbone(config)
