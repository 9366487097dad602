"""Stage-1 checkpoints: a torch file holding the weights (keys prefixed `model.`, as Lightning
writes them), the full config and the sha256 of the weights.

`load_checkpoint` also takes, as it is, the Lightning `.ckpt` that hepattn's training writes
(`state_dict` with `model.<MaskFormer key>`, `hyper_parameters`, `pytorch-lightning_version`):
its fingerprint is the sha256 of those weights, computed on load, and its `config` is the
hyper-parameters. A backbone whose weights live in a submodule names it `stage1_module`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from cachefeat.errors import UserError

REQUIRED_KEYS = ("state_dict", "config", "weights_sha256")


def weights_sha256(state_dict: dict) -> str:
    """sha256 over the sorted keys of `state_dict`: each key's name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, config: dict, head: nn.Module | None = None, **extra) -> None:
    """Write {"state_dict": {"model."+k: v}, "config", "weights_sha256", **extra} atomically.

    With `head` (a RegressionHead trained jointly), its weights join the state dict as
    "head."+k and its `head_config()` is stored, the layout of `cachefeat train`'s model.ckpt:
    the file then serves as a stage-1 checkpoint and as a head checkpoint.
    `extra` values must be plain Python data or tensors (the file is read with weights_only=True).
    The file is written under a temporary name in the same folder, then renamed over `path`.
    """
    clash = set(extra) & {*REQUIRED_KEYS, "head_config"}
    if clash:
        raise ValueError(f"save_checkpoint: extra keys {sorted(clash)} are reserved")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v.detach().cpu() for k, v in stage1_module(model).state_dict().items()}
    if head is not None:
        state.update({f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()})
        extra["head_config"] = head.head_config()
    atomic_save({"state_dict": state, "config": config, "weights_sha256": weights_sha256(state), **extra}, path)


def atomic_save(obj, path: str | Path) -> None:
    """`torch.save(obj)` under a temporary name in `path`'s folder, then renamed over `path`: a crash
    mid-write leaves the previous file (or none), never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def stage1_module(model: nn.Module) -> nn.Module:
    """The module whose weights a stage-1 checkpoint holds: `model.stage1_module` if it has one."""
    return getattr(model, "stage1_module", model)


def is_lightning_checkpoint(ckpt) -> bool:
    return isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt and isinstance(ckpt.get("state_dict"), dict)


def load_checkpoint(path: str | Path) -> dict:
    """Read and verify a checkpoint; the returned dict also holds "path" (str).

    A Lightning checkpoint gets "weights_sha256" (computed here) and "config" (its
    hyper-parameters); its other entries (loops, optimizer states) are dropped.
    Raises UserError when the file is missing, is not a cachefeat or Lightning checkpoint, or its
    weights do not match the recorded sha256 (a corrupt file).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable or foreign files
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable cachefeat checkpoint ({reason})") from exc
    if is_lightning_checkpoint(ckpt):
        state = ckpt["state_dict"]
        return {"state_dict": state, "config": ckpt.get("hyper_parameters") or {},
                "weights_sha256": weights_sha256(state), "path": str(path), "lightning": True}
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in REQUIRED_KEYS):
        raise UserError(f"{path} is not a cachefeat checkpoint (it needs the keys {', '.join(REQUIRED_KEYS)})")
    actual = weights_sha256(ckpt["state_dict"])
    if actual != ckpt["weights_sha256"]:
        raise UserError(
            f"checkpoint {path} is corrupt: its weights hash to {actual[:12]}…, "
            f"the file records {str(ckpt['weights_sha256'])[:12]}…"
        )
    ckpt["path"] = str(path)
    return ckpt


def load_model_state(model: nn.Module, ckpt: dict, prefix: str = "model.") -> None:
    """Load the `prefix`ed weights of `ckpt` into `model`, strictly (same keys, same shapes).

    Keys with other prefixes (e.g. a head's, in a combined checkpoint) are ignored.
    Raises UserError naming the first missing, unexpected or mis-shaped key.
    """
    where = ckpt.get("path", "<in memory>")
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model = stage1_module(model)
    check = getattr(model, "check_state", None)  # a model that names a checkpoint of another kind (the head's frame)
    if check is not None:
        try:
            check(state)
        except UserError as exc:
            raise UserError(f"checkpoint {where}: {exc}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {prefix}{missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {prefix}{unexpected[0]})")
        raise UserError(f"checkpoint {where} does not fit this config: weights {' and '.join(parts)}")
    for name, value in own.items():
        if value.shape != state[name].shape:
            raise UserError(
                f"checkpoint {where} does not fit this config: {prefix}{name} has shape "
                f"{tuple(state[name].shape)} in the checkpoint, {tuple(value.shape)} in the config"
            )
    model.load_state_dict(state, strict=True)
