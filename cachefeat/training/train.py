"""Phase 2: train only the regression head, over the cache or (the baseline) the live frozen backbone.

`train` is a recipe over `loop.py`: set up the head and the source, prepare, `fit`, save. The
head, optimizer, schedule, batches and logging are identical for every source (`sources.py`);
only where the `HeadBatch`es come from differs. In cache mode the backbone is never loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cachefeat.cache.fingerprint import check_cache
from cachefeat.config import POSITIVE_INT, at_least, section, stable_hash
from cachefeat.errors import UserError
from cachefeat.head.checkpoint import build_head, save_head_files
from cachefeat.head.inputs import concat
from cachefeat.model.layers import count_parameters
from cachefeat.model.metrics import summarize
from cachefeat.training.loop import (
    LOOP_ALLOWED,
    SCALING_EVENTS,
    EpochStats,
    MetricsLog,
    StepLosses,
    cache_source,
    cache_val_batches,
    check_floor,
    evaluate_batches,
    fit,
    head_step,
    make_accelerator,
    prepare_trainee,
    resumable,
    save_checkpoint_state,
    scaling_batch,
    schedule_steps,
    step_input,
    validation_batches,
)
from cachefeat.training.sources import LiveSource

log = logging.getLogger(__name__)

DEFAULTS = {
    "epochs": 20,
    "batch_size": 256,
    "lr": 1e-3,
    "weight_decay": 1e-5,
    "grad_clip": 1.0,
    "gradient_accumulation_steps": 1,
    "mixed_precision": "no",
    "seed": 1,
    "memory_budget_mb": 4096,
    "checkpoint_every_epochs": 1,
}
ALLOWED = {
    **LOOP_ALLOWED,
    "gradient_accumulation_steps": POSITIVE_INT,
    "memory_budget_mb": at_least(0.0),
    "checkpoint_every_epochs": POSITIVE_INT,
}


def train(config: dict, run_dir, *, source: str = "cache", cache=None, val_cache=None, checkpoint=None,
          input=None, val_input=None, resume: bool = False, allow_stale: bool = False,
          max_epochs: int | None = None, batch_size: int | None = None, seed: int | None = None,
          data_mode: str = "auto", head_impl: str | None = None, device: str | None = None,
          max_steps: int | None = None, skip_validation: bool = False) -> dict:
    """Train the regression head; returns the last epoch's metrics, "step_losses" (the loss of every
    step, averaged over ranks) and "source" (the source's kind).

    source: "cache" (needs `cache`, `val_cache`) or "live" (needs `checkpoint`, `input`, `val_input`).
    data_mode (cache source): "memory", "stream" or "auto" (memory when it fits train.memory_budget_mb).
    max_steps stops after that many optimizer steps (benchmarks and tests); skip_validation leaves
    out the per-epoch validation pass (speed measurements).
    Writes RUN_DIR/head.ckpt, model.ckpt (when the stage-1 checkpoint is known), metrics.json/csv,
    config.json and resumable Accelerate checkpoints under RUN_DIR/checkpoints/.
    """
    from cachefeat.model.checkpoint import load_checkpoint

    settings = section(config, "train", DEFAULTS, ALLOWED)
    for key, value in {"epochs": max_epochs, "batch_size": batch_size, "seed": seed}.items():
        if value is not None:
            settings[key] = value
    run_dir = Path(run_dir)
    accelerator = make_accelerator(run_dir, settings["mixed_precision"],
                                   settings["gradient_accumulation_steps"], device=device)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    stage1 = load_checkpoint(checkpoint) if checkpoint is not None else None
    if source == "cache":
        setup = _cache_setup(config, settings, accelerator, cache, val_cache, stage1, input, allow_stale,
                             data_mode, head_impl)
    elif source == "live":
        setup = _live_setup(config, settings, accelerator, checkpoint, input, val_input, head_impl)
    else:
        raise UserError(f"--source must be cache or live, not {source!r}")

    steps_per_epoch, total_steps = schedule_steps(setup.source, settings, accelerator.num_processes)
    trainee = prepare_trainee(accelerator, setup.head, settings["lr"], settings["weight_decay"], total_steps)
    if resume:
        _check_resume_config(run_dir, config)
    elif accelerator.is_main_process:
        (run_dir / "config.json").write_text(json.dumps(config, indent=1, default=str))
    state = resumable(accelerator, run_dir, trainee.scheduler, resume)
    metrics_log = MetricsLog(run_dir, accelerator, "train", settings)

    def step(hb) -> StepLosses:
        return head_step(accelerator, [trainee], step_input(hb, accelerator.device), settings["grad_clip"])

    def end_epoch(stats: EpochStats) -> None:
        state.step_losses.extend(stats.step_losses()[0])
        val = {"val_loss": float("nan")} if skip_validation else evaluate_batches(trainee.model, setup.val_batches(),
                                                                                   accelerator)
        last = {"epoch": state.epoch, "step": state.global_step, "train_loss": stats.train_loss(),
                "events_per_s": stats.events_per_s, "lr": trainee.scheduler.get_last_lr()[0], **val,
                **{f"frozen_{k}": v for k, v in setup.frozen_counts().items()}}
        state.history.append(last)
        accelerator.print(f"epoch {state.epoch + int(stats.stopped)}: train {last['train_loss']:.4f} "
                          f"val {last['val_loss']:.4f} pT res68 {last.get('val_pt_rel_res68', float('nan')):.3g} "
                          f"({last['events_per_s']:.0f} events/s)")
        metrics_log.write(state.history)
        state.best_val = min(state.best_val, last["val_loss"])
        if accelerator.is_main_process:
            save_head_files(run_dir, trainee.module, config, setup.fingerprint, last, stage1)
        if stats.stopped or state.epoch % settings["checkpoint_every_epochs"] == 0 or state.epoch == settings["epochs"]:
            save_checkpoint_state(accelerator, run_dir, state.global_step)

    fit(accelerator, state, [trainee], setup.source.batches, step, end_epoch, epochs=settings["epochs"],
        steps_per_epoch=steps_per_epoch, events_of=lambda hb: hb.num_events, max_steps=max_steps)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {**(state.history[-1] if state.history else {}), "step_losses": list(state.step_losses),
            "source": setup.source.kind}


@dataclass
class _Setup:
    """What `train` trains with: the head (scaling fitted), this rank's training source,
    `val_batches()` (this rank's validation HeadBatches), `frozen_counts()` (the frozen backbone's
    tracking metrics, `summarize` keys) and the cache fingerprint (None live)."""

    head: nn.Module
    source: object
    val_batches: Callable[[], Iterable]
    frozen_counts: Callable[[], dict]
    fingerprint: dict | None = None


def _cache_setup(config, settings, accelerator, cache, val_cache, stage1, input, allow_stale, data_mode,
                 head_impl) -> _Setup:
    """Cache mode: the backbone is never loaded."""
    from cachefeat.cache.reader import CacheReader
    from cachefeat.data.loading import open_events

    if cache is None or val_cache is None:
        raise UserError("--cache and --val-cache are required with --source cache")
    reader, val_reader = CacheReader(cache), CacheReader(val_cache)
    input_hash = None
    if input is not None:
        with open_events(config, input) as events:
            input_hash = events.content_hash()
    sha = stage1["weights_sha256"] if stage1 else None
    check_cache(reader, config, checkpoint_sha256=sha, input_hash=input_hash, allow_stale=allow_stale, what="cache")
    check_cache(val_reader, config, checkpoint_sha256=sha or reader.fingerprint.get("checkpoint_sha256"),
                input_hash=None, allow_stale=allow_stale, what="validation cache")
    head = build_head(config, list(reader.raw_fields), list(reader.particle_fields), head_impl, settings["seed"])
    check_floor(head, reader)
    source, data_mode = cache_source(reader, data_mode, settings, accelerator)
    val_batches = cache_val_batches(val_reader, settings["batch_size"], accelerator)
    first = scaling_batch(reader)
    head.fit_scaling(first.targets, first.target_valid, first)
    frozen_counts = summarize(reader.metrics())
    accelerator.print(f"head: {count_parameters(head):,} trainable parameters; backbone: not loaded "
                      f"(cache mode, {data_mode}); {reader.num_events:,} training events")
    return _Setup(head, source, lambda: val_batches, lambda: frozen_counts, reader.fingerprint)


def _live_setup(config, settings, accelerator, checkpoint, input, val_input, head_impl) -> _Setup:
    """Live mode: every batch runs through the frozen backbone."""
    from cachefeat.cache.frozen import FrozenBackbone
    from cachefeat.data.loading import open_events

    if checkpoint is None or input is None or val_input is None:
        raise UserError("--checkpoint, --input and --val-input are required with --source live")
    data, device = config["data"], accelerator.device
    rank, world, batch_size = accelerator.process_index, accelerator.num_processes, settings["batch_size"]
    frozen = FrozenBackbone(config, checkpoint, device=device)
    head = build_head(config, list(data["hit_fields"]), list(data["particle_fields"]), head_impl, settings["seed"])
    floor = head.assignment_threshold
    events, val_events = open_events(config, input), open_events(config, val_input)
    keep_hits = "all" if head.impl == "dense" else "assigned"
    source = LiveSource(frozen, events, batch_size, settings["seed"], rank, world, floor, device, keep_hits)

    def val_batches():
        for idx in validation_batches(len(val_events), batch_size, rank, world):
            yield frozen.head_batch({k: v.to(device) for k, v in val_events.read(idx).items()}, floor)[0]

    _fit_scaling_live(head, frozen, events, floor, batch_size, device)
    frozen_params = sum(p.numel() for p in frozen.model.parameters())
    accelerator.print(f"head: {count_parameters(head):,} trainable parameters; backbone: {frozen_params:,} "
                      f"frozen parameters (live, eval mode); {len(events):,} training events")
    return _Setup(head, source, val_batches, lambda: _gathered_summary(accelerator, source.metric_sums))


def _gathered_summary(accelerator, sums: dict) -> dict:
    keys = sorted(sums)
    local = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    return summarize({k: np.array([float(total[i])]) for i, k in enumerate(keys)})


def _fit_scaling_live(head, frozen, events, floor: float, batch_size: int, device) -> None:
    """Live mode: the same scaling as cache mode, from the matched targets of the first events."""
    parts = []
    for start in range(0, min(len(events), SCALING_EVENTS), batch_size):
        idx = np.arange(start, min(start + batch_size, len(events), SCALING_EVENTS))
        hb, _ = frozen.head_batch({k: v.to(device) for k, v in events.read(idx).items()}, floor)
        parts.append(hb)
    first = concat(parts)
    head.fit_scaling(first.targets, first.target_valid, first)


def _check_resume_config(run_dir: Path, config: dict) -> None:
    saved = run_dir / "config.json"
    if saved.exists():
        previous = json.loads(saved.read_text())
        if stable_hash(previous) != stable_hash(json.loads(json.dumps(config, default=str))):
            raise UserError(f"{run_dir} was trained with another config; resume it with that config "
                            "or choose another --output")
