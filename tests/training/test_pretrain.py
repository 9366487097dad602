"""`cachefeat pretrain`: --init starts from a checkpoint, --joint writes a checkpoint that is both
a stage-1 checkpoint and a head checkpoint."""

from __future__ import annotations

import torch

from cachefeat.cache.frozen import FrozenBackbone
from cachefeat.cli import main
from cachefeat.head.checkpoint import load_head
from cachefeat.model.checkpoint import load_checkpoint


def _pretrain(config, events, val_events, out, *extra):
    args = ["pretrain", "--config", str(config), "--train", str(events), "--val", str(val_events),
            "--output", str(out), "--epochs", "1", "--batch-size", "80", "--device", "cpu", *extra]
    assert main(args) == 0


# 160 events in batches of 80, one epoch: 2 AdamW steps of at most TINY_LR each (the OneCycle
# peak), so no weight can move by more than NEAR; a trained stage 1 differs from a fresh
# initialisation by far more (checked below).
TINY_LR = 1e-6
NEAR = 100 * 2 * TINY_LR


def test_joint_from_init_checkpoint(muon_events, muon_val_events, stage1_checkpoint, tmp_path):
    """With a tiny lr the backbone stays within NEAR of the --init weights; the joint checkpoint
    loads as a frozen backbone (its saved weights) and as a head (the jointly trained head's)."""
    config = "configs/muon.yaml"
    out = tmp_path / "joint"
    _pretrain(config, muon_events, muon_val_events, out, "--joint", "--init", str(stage1_checkpoint),
              "--set", f"pretrain.lr={TINY_LR}")

    init = load_checkpoint(stage1_checkpoint)["state_dict"]
    saved = load_checkpoint(out / "stage1_last.ckpt")
    backbone = {k: v for k, v in saved["state_dict"].items() if k.startswith("model.")}
    assert backbone.keys() == init.keys()
    for key, value in init.items():
        torch.testing.assert_close(backbone[key], value, rtol=0, atol=NEAR, msg=key)

    frozen = FrozenBackbone(saved["config"], out / "stage1_last.ckpt")
    for key, value in frozen.model.state_dict().items():
        assert torch.equal(value, backbone[f"model.{key}"]), key
    head, _ = load_head(out / "stage1_last.ckpt")
    head_state = {k[len("head."):]: v for k, v in saved["state_dict"].items() if k.startswith("head.")}
    assert head_state and head_state.keys() == head.state_dict().keys()
    for key, value in head.state_dict().items():
        assert torch.equal(value, head_state[key]), key
    assert head.target_std.ne(1.0).all()  # the scaling fitted on the training particles was saved


def test_init_changes_the_start(muon_events, muon_val_events, stage1_checkpoint, tmp_path):
    """Without --init (same seed, same tiny lr) the backbone stays near its random initialisation,
    far from the --init weights."""
    out = tmp_path / "fresh"
    _pretrain("configs/muon.yaml", muon_events, muon_val_events, out, "--set", f"pretrain.lr={TINY_LR}")
    init = load_checkpoint(stage1_checkpoint)["state_dict"]
    saved = load_checkpoint(out / "stage1_last.ckpt")["state_dict"]
    assert "head_config" not in load_checkpoint(out / "stage1_last.ckpt")
    assert max(float((saved[k] - v).abs().max()) for k, v in init.items()) > 100 * NEAR
