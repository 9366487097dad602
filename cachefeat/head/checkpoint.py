"""Building a regression head from a config, and head checkpoints.

A head checkpoint (`head.ckpt`) is a torch file {"state_dict": {"head." + name: tensor},
"head_config": RegressionHead keyword arguments, "config": the full config, "cache_fingerprint":
the training cache's fingerprint or None, "metrics": the last epoch's metrics,
"weights_sha256": `weights_sha256(state_dict)`}. The combined `model.ckpt` holds a stage-1
checkpoint's "model." weights and the head's "head." weights in one state dict, so it serves as
both (see `cachefeat.model.checkpoint.save_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from cachefeat.config import instantiate
from cachefeat.errors import UserError
from cachefeat.model.checkpoint import atomic_save, load_checkpoint, load_model_state, weights_sha256


def build_head(config: dict, raw_fields: list[str], particle_fields: list[str], impl: str | None = None,
               seed: int | None = 1) -> nn.Module:
    """The regression head of `config["head"]` (a class_path / init_args block), reading the given raw
    hit fields and particle fields; `impl` ("sparse" or "dense") overrides init_args.impl.

    Its initial weights depend on `seed` only (not on what was built before it): torch's global
    RNG is seeded with it first. seed None draws them from torch's global RNG as it stands
    (pretrain's joint head, built after the backbone from one seed).
    """
    if seed is not None:
        torch.manual_seed(seed)
    block = dict(config["head"])
    if impl is not None:
        block["init_args"] = {**(block.get("init_args") or {}), "impl": impl}
    return instantiate(block, "head", raw_fields=raw_fields, particle_fields=particle_fields)


def save_head(path: Path, head: nn.Module, config: dict, fingerprint: dict | None, metrics: dict) -> dict[str, Tensor]:
    """Write a head checkpoint (the layout in the module docstring) to `path`, atomically.

    Returns the head's prefixed state dict (keys "head.<name>", tensors on the CPU).
    """
    head_state = {f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()}
    atomic_save({"state_dict": head_state, "head_config": head.head_config(), "config": config,
                 "cache_fingerprint": fingerprint, "metrics": metrics,
                 "weights_sha256": weights_sha256(head_state)}, Path(path))
    return head_state


def save_head_files(run_dir: Path, head: nn.Module, config: dict, fingerprint: dict | None, metrics: dict,
                    stage1: dict | None) -> None:
    """RUN_DIR/head.ckpt (head only) and, when the stage-1 checkpoint `stage1` (as `load_checkpoint`
    returns it) is known, RUN_DIR/model.ckpt (its weights and the head's in one state dict)."""
    head_state = save_head(run_dir / "head.ckpt", head, config, fingerprint, metrics)
    if stage1 is not None:
        combined = {**stage1["state_dict"], **head_state}
        atomic_save({"state_dict": combined, "config": config, "head_config": head.head_config(),
                     "weights_sha256": weights_sha256(combined), "metrics": metrics}, run_dir / "model.ckpt")


def load_head(path, device="cpu") -> tuple[nn.Module, dict]:
    """(RegressionHead in eval mode on `device`, checkpoint dict) from a head checkpoint: the head.ckpt
    or model.ckpt of `cachefeat train`, or a joint `cachefeat pretrain` checkpoint.

    Raises UserError when the file is missing, corrupt, holds no head_config, or its head_config
    or weights do not fit this cachefeat's RegressionHead.
    """
    from cachefeat.head.regression import RegressionHead

    if not Path(path).is_file():
        raise UserError(f"head checkpoint not found: {path}")
    ckpt = load_checkpoint(path)
    if "head_config" not in ckpt:
        raise UserError(f"{path} is not a head checkpoint (no head_config); pass the head.ckpt that "
                        "`cachefeat train` wrote")
    try:
        head = RegressionHead(**ckpt["head_config"])
    except TypeError as exc:
        raise UserError(f"{path}: its head_config does not fit this cachefeat's RegressionHead ({exc})") from exc
    load_model_state(head, ckpt, prefix="head.")
    return head.to(device).eval(), ckpt
