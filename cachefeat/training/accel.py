"""Accelerate plumbing shared by `pretrain` and `train`: the accelerator, CSV/JSON logging,
the resumable train state and crash-safe checkpoints.

Checkpoints live in RUN_DIR/checkpoints/checkpoint-<global_step:08d>. Accelerate's
`save_state` writes into a temporary directory that is renamed only once every rank has
finished, so a crash during a save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from cachefeat.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
MIXED_PRECISION = ("no", "bf16", "fp16")


def make_accelerator(run_dir: Path, mixed_precision: str = "no", gradient_accumulation_steps: int = 1,
                     device: str | None = None) -> Accelerator:
    """An Accelerator that runs data-parallel on CPUs (gloo) as well as GPUs.

    `device="cpu"` forces the CPU even where CUDA exists. `mixed_precision`: one of MIXED_PRECISION.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise UserError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, not {mixed_precision!r}")
    cpu = device == "cpu" or not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "logs"),
                                            automatic_checkpoint_naming=False),
        log_with="tensorboard" if tensorboard_available() else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=600))],
    )


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint so a resumed run continues exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_val: float = float("inf")
    step_losses: list = field(default_factory=list)
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def adamw(parameters, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The AdamW of every trainer: the fused kernel (one pass over all parameters instead of a Python
    loop over them; about 1 ms less per step of the 53k-parameter head on one CPU thread)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)


def optimizer_step(accelerator: Accelerator, model, loss, optimizer, scheduler, grad_clip: float) -> None:
    """The update every trainer makes: backward, clip and schedule on synchronising steps, step, zero grads.

    Under gradient accumulation the prepared optimizer skips its step on non-synchronising
    micro-steps; the (unprepared) scheduler advances once per real optimizer step.
    """
    accelerator.backward(loss)
    if accelerator.sync_gradients and grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def save_checkpoint_state(accelerator: Accelerator, run_dir: Path, global_step: int, keep: int = 2) -> Path:
    """`save_state` into a temporary directory, then rename it (all ranks must call this)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{global_step:08d}"
    tmp = root / f".tmp-{global_step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_last_checkpoint(accelerator: Accelerator, run_dir: Path) -> Path | None:
    """Load the newest complete checkpoint of `run_dir` into the prepared objects; None if there is none."""
    found = checkpoints(run_dir)
    if not found:
        return None
    accelerator.load_state(str(found[-1]))
    return found[-1]


class MetricsLog:
    """Per-epoch metrics as `metrics.json` (a list of dicts) and `metrics.csv`, written on the main
    process, and to TensorBoard (RUN_DIR/logs) through the accelerator's trackers when installed."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, run_name: str, hparams: dict,
                 track: bool = True):
        self.json_path = Path(run_dir) / "metrics.json"
        self.csv_path = Path(run_dir) / "metrics.csv"
        self.enabled = accelerator.is_main_process
        self.accelerator = accelerator
        self.track = track and bool(accelerator.log_with)
        if self.track:
            scalars = {k: v for k, v in hparams.items() if isinstance(v, bool | int | float | str)}
            accelerator.init_trackers(run_name, config=scalars)

    def write(self, history: list[dict]) -> None:
        if history and self.track:
            numbers = {k: float(v) for k, v in history[-1].items() if isinstance(v, int | float)}
            self.accelerator.log(numbers, step=len(history))
        if not self.enabled or not history:
            return
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(history, indent=1))
        os.replace(tmp, self.json_path)
        keys = list(dict.fromkeys(k for row in history for k in row))
        with open(self.csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
