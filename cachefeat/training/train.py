"""Phase 2: train only the regression head, over the cache or (the baseline) the live frozen backbone.

One trainer for every source (`sources.py`): the head, optimizer, schedule, batches and
logging are identical; only where the `HeadBatch`es come from differs. In cache mode the
backbone is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cachefeat.cache.fingerprint import check_cache
from cachefeat.config import POSITIVE_INT, above, at_least, instantiate, one_of, section, stable_hash
from cachefeat.errors import UserError
from cachefeat.evaluation.metrics import regression_metrics
from cachefeat.head.inputs import concat
from cachefeat.model.layers import count_parameters
from cachefeat.model.metrics import summarize
from cachefeat.training.accel import (
    MIXED_PRECISION,
    MetricsLog,
    TrainState,
    adamw,
    load_last_checkpoint,
    make_accelerator,
    optimizer_step,
    save_checkpoint_state,
)
from cachefeat.training.sources import (
    CacheMemorySource,
    CacheStreamSource,
    LiveSource,
    cache_fits_memory,
)

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
    "epochs": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "lr": above(0.0),
    "weight_decay": at_least(0.0),
    "grad_clip": at_least(0.0),  # 0: no clipping
    "gradient_accumulation_steps": POSITIVE_INT,
    "mixed_precision": one_of(*MIXED_PRECISION),
    "seed": at_least(0, integer=True),
    "memory_budget_mb": at_least(0.0),
    "checkpoint_every_epochs": POSITIVE_INT,
}
# Target scaling (mean/std) is fitted on the matched targets of the first SCALING_EVENTS training
# events, in both cache and live mode: cache event i is input event i, so both get the same numbers.
SCALING_EVENTS = 2048


def build_head(config: dict, raw_fields: list[str], particle_fields: list[str], impl: str | None = None,
               seed: int = 1):
    """The regression head of `config`, reading the given raw hit fields and particle fields.

    Its initial weights depend on `seed` only (not on what was built before it).
    """
    torch.manual_seed(seed)
    block = dict(config["head"])
    if impl is not None:
        block["init_args"] = {**(block.get("init_args") or {}), "impl": impl}
    return instantiate(block, "head", raw_fields=raw_fields, particle_fields=particle_fields)


def gather_objects(accelerator, items: list) -> list:
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object
    return gather_object(items)


@torch.no_grad()
def evaluate_batches(head, batches, accelerator) -> dict:
    """Loss and resolutions of `head` over an iterable of HeadBatches (all ranks' shares gathered)."""
    module = accelerator.unwrap_model(head)
    was_training = module.training
    module.eval()
    loss_sum, n_valid = 0.0, 0
    preds: dict[str, list] = {}
    trues: dict[str, list] = {}
    for hb in batches:
        hb = hb.to(accelerator.device).float()
        pred = module(hb)
        valid = hb.target_valid
        n = int(valid.sum())
        if n:
            loss_sum += float(module.loss(pred, hb)) * n
            n_valid += n
        for key, value in module.decode(pred[valid]).items():
            preds.setdefault(key, []).append(value.cpu().numpy())
        truth = hb.targets[valid]
        for key in preds:
            trues.setdefault(key, []).append(truth[:, module.particle_fields.index(key)].cpu().numpy())
    module.train(was_training)
    local = {"loss_sum": loss_sum, "n": n_valid,
             "pred": {k: np.concatenate(v) for k, v in preds.items()},
             "true": {k: np.concatenate(v) for k, v in trues.items()}}
    parts = gather_objects(accelerator, [local])
    total_n = sum(p["n"] for p in parts)
    keys = [k for k in parts[0]["pred"]]
    pred_all = {k: np.concatenate([p["pred"][k] for p in parts if k in p["pred"]]) for k in keys}
    true_all = {k: np.concatenate([p["true"][k] for p in parts if k in p["true"]]) for k in keys}
    out = {"val_loss": sum(p["loss_sum"] for p in parts) / max(total_n, 1), "val_tracks": total_n}
    out.update({f"val_{k}": v for k, v in regression_metrics(pred_all, true_all).items()})
    return out


def validation_batches(num_events: int, batch_size: int, rank: int, world: int):
    """This rank's share of the validation events in fixed order (no shuffling, nothing dropped)."""
    mine = np.array_split(np.arange(num_events), world)[rank]
    for start in range(0, len(mine), batch_size):
        yield mine[start:start + batch_size]


def train(config: dict, run_dir, *, source: str = "cache", cache=None, val_cache=None, checkpoint=None,
          input=None, val_input=None, resume: bool = False, allow_stale: bool = False,
          max_epochs: int | None = None, batch_size: int | None = None, seed: int | None = None,
          data_mode: str = "auto", head_impl: str | None = None, device: str | None = None,
          max_steps: int | None = None, skip_validation: bool = False) -> dict:
    """Train the regression head; returns the last epoch's metrics.

    source: "cache" (needs `cache`, `val_cache`) or "live" (needs `checkpoint`, `input`, `val_input`).
    data_mode (cache source): "memory", "stream" or "auto" (memory when it fits train.memory_budget_mb).
    max_steps stops after that many optimizer steps (benchmarks and tests); skip_validation leaves
    out the per-epoch validation pass (speed measurements).
    Writes RUN_DIR/head.ckpt, model.ckpt (when the stage-1 checkpoint is known), metrics.json/csv.
    """
    from cachefeat.model.checkpoint import load_checkpoint

    settings = section(config, "train", DEFAULTS, ALLOWED)
    for key, value in {"epochs": max_epochs, "batch_size": batch_size, "seed": seed}.items():
        if value is not None:
            settings[key] = value
    run_dir = Path(run_dir)
    data = config["data"]
    accelerator = make_accelerator(run_dir, settings["mixed_precision"],
                                   settings["gradient_accumulation_steps"], device=device)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)

    stage1 = load_checkpoint(checkpoint) if checkpoint is not None else None
    fingerprint = None
    frozen_counts = None
    if source == "cache":
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
        check_cache(reader, config, checkpoint_sha256=sha, input_hash=input_hash,
                    allow_stale=allow_stale, what="cache")
        check_cache(val_reader, config, checkpoint_sha256=sha or reader.fingerprint.get("checkpoint_sha256"),
                    input_hash=None, allow_stale=allow_stale, what="validation cache")
        fingerprint = reader.fingerprint
        raw_fields, particle_fields = list(reader.raw_fields), list(reader.particle_fields)
        head = build_head(config, raw_fields, particle_fields, head_impl, settings["seed"])
        floor = float(reader.settings.get("floor", 0.0))
        if head.assignment_threshold < floor:
            raise UserError(f"head.assignment_threshold {head.assignment_threshold} is below the cache floor "
                            f"{floor}: pairs between them were not stored; re-extract with --floor "
                            f"{head.assignment_threshold} or raise the threshold")
        if data_mode == "auto":
            data_mode = "memory" if cache_fits_memory(reader, settings["memory_budget_mb"]) else "stream"
        if data_mode == "memory":
            train_source = CacheMemorySource(reader, settings["batch_size"], settings["seed"], rank, world,
                                             accelerator.device)
        elif data_mode == "stream":
            train_source = CacheStreamSource(reader, settings["batch_size"], settings["seed"], rank, world)
        else:
            raise UserError(f"--data must be auto, memory or stream, not {data_mode!r}")
        val_resident = val_reader.load(accelerator.device)
        val_iter = lambda: (val_resident.batch(idx) for idx in  # noqa: E731
                            validation_batches(val_reader.num_events, settings["batch_size"], rank, world))
        first = reader.read_events(0, min(reader.num_events, SCALING_EVENTS))
        head.fit_scaling(first.targets, first.target_valid, first)
        frozen_counts = summarize(reader.metrics())
        accelerator.print(f"head: {count_parameters(head):,} trainable parameters; backbone: not loaded "
                          f"(cache mode, {data_mode}); {reader.num_events:,} training events")
    elif source == "live":
        from cachefeat.cache.frozen import FrozenBackbone
        from cachefeat.data.loading import open_events

        if checkpoint is None or input is None or val_input is None:
            raise UserError("--checkpoint, --input and --val-input are required with --source live")
        frozen = FrozenBackbone(config, checkpoint, device=accelerator.device)
        raw_fields, particle_fields = list(data["hit_fields"]), list(data["particle_fields"])
        head = build_head(config, raw_fields, particle_fields, head_impl, settings["seed"])
        floor = head.assignment_threshold
        events, val_events = open_events(config, input), open_events(config, val_input)
        keep_hits = "all" if head.impl == "dense" else "assigned"
        train_source = LiveSource(frozen, events, settings["batch_size"], settings["seed"], rank, world, floor,
                                  accelerator.device, keep_hits)
        val_iter = lambda: (frozen.head_batch({k: v.to(accelerator.device)  # noqa: E731
                                               for k, v in val_events.read(idx).items()}, floor)[0]
                            for idx in validation_batches(len(val_events), settings["batch_size"], rank, world))
        _fit_scaling_live(head, frozen, events, floor, settings["batch_size"], accelerator.device)
        frozen_params = sum(p.numel() for p in frozen.model.parameters())
        accelerator.print(f"head: {count_parameters(head):,} trainable parameters; backbone: {frozen_params:,} "
                          f"frozen parameters (live, eval mode); {len(events):,} training events")
    else:
        raise UserError(f"--source must be cache or live, not {source!r}")

    steps_per_epoch = train_source.num_batches(0)
    if steps_per_epoch == 0:
        raise UserError(f"fewer training events than one global batch of {settings['batch_size'] * world}")
    optimizer = adamw(head.parameters(), settings["lr"], settings["weight_decay"])
    total_steps = sum(train_source.num_batches(e) for e in range(settings["epochs"]))
    total_steps //= settings["gradient_accumulation_steps"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings["lr"],
                                                    total_steps=max(total_steps, 1) + 1)
    # The scheduler stays outside prepare(): a prepared one advances once per process per step,
    # so 2 processes would follow another learning-rate curve than 1 process on the same batches.
    head, optimizer = accelerator.prepare(head, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    accelerator.register_for_checkpointing(scheduler)
    if resume:
        _check_resume_config(run_dir, config)
        if load_last_checkpoint(accelerator, run_dir) is not None:
            accelerator.print(f"resumed at epoch {state.epoch}, batch {state.step_in_epoch}")
    elif accelerator.is_main_process:
        (run_dir / "config.json").write_text(json.dumps(config, indent=1, default=str))
    metrics_log = MetricsLog(run_dir, accelerator, "train", settings)
    module = accelerator.unwrap_model(head)

    last: dict = state.history[-1] if state.history else {}
    done = False
    while state.epoch < settings["epochs"] and not done:
        start = time.perf_counter()
        n_events, loss_sum, loss_n = 0, 0.0, 0
        head.train()
        bar = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, unit="batch", leave=False,
                   desc=f"epoch {state.epoch + 1}/{settings['epochs']}",
                   disable=not accelerator.is_local_main_process)
        for hb in train_source.batches(state.epoch, start=state.step_in_epoch):
            hb = hb.to(accelerator.device).float().with_valid_targets_only()  # all the loss reads
            with accelerator.accumulate(head):
                loss = global_mean_loss(module.loss(head(hb), hb), hb, accelerator)
                optimizer_step(accelerator, head, loss, optimizer, scheduler, settings["grad_clip"])
            state.step_in_epoch += 1
            step_loss = accelerator.gather(loss.detach()[None]).mean().item()
            state.step_losses.append(step_loss)
            if accelerator.sync_gradients:
                state.global_step += 1
            n_events += hb.num_events * world
            loss_sum += step_loss
            loss_n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}",
                            ev_s=f"{n_events / (time.perf_counter() - start):.0f}")
            if max_steps is not None and state.global_step >= max_steps:
                done = True
                break
        bar.close()
        elapsed = time.perf_counter() - start
        if not done:
            state.epoch += 1
            state.step_in_epoch = 0
        val = {"val_loss": float("nan")} if skip_validation else evaluate_batches(head, val_iter(), accelerator)
        if source == "live":
            frozen_counts = _gathered_summary(accelerator, train_source.metric_sums)
        last = {"epoch": state.epoch, "step": state.global_step, "train_loss": loss_sum / max(loss_n, 1),
                "events_per_s": n_events / max(elapsed, 1e-9), "lr": scheduler.get_last_lr()[0], **val,
                **{f"frozen_{k}": v for k, v in (frozen_counts or {}).items()}}
        state.history.append(last)
        accelerator.print(f"epoch {state.epoch + int(done)}: train {last['train_loss']:.4f} val {last['val_loss']:.4f} "
                          f"pT res68 {last.get('val_pt_rel_res68', float('nan')):.3g} "
                          f"({last['events_per_s']:.0f} events/s)")
        metrics_log.write(state.history)
        if last["val_loss"] < state.best_val:
            state.best_val = last["val_loss"]
        if accelerator.is_main_process:
            save_head_files(run_dir, module, config, fingerprint, last, stage1)
        if done or state.epoch % settings["checkpoint_every_epochs"] == 0 or state.epoch == settings["epochs"]:
            save_checkpoint_state(accelerator, run_dir, state.global_step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {**last, "step_losses": list(state.step_losses), "source": train_source.kind}


def global_mean_loss(loss, hb, accelerator):
    """Rescale a rank's mean loss so that DDP's gradient average is the mean over all ranks' tracks.

    Ranks hold different numbers of matched queries; averaging per-rank means would weight
    tracks unequally and differ from one process on the same global batch.
    """
    if accelerator.num_processes == 1:
        return loss
    n_local = hb.target_valid.sum().to(torch.float64)
    n_global = accelerator.reduce(n_local.clone(), reduction="sum")
    return loss * (n_local * accelerator.num_processes / n_global.clamp(min=1)).to(loss.dtype)


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


def save_head(path: Path, head, config: dict, fingerprint: dict | None, metrics: dict) -> dict:
    """Write a head checkpoint (head weights, head config, target scaling, cache fingerprint) to `path`.

    Returns the head's prefixed state dict (keys "head.<name>").
    """
    from cachefeat.model.checkpoint import weights_sha256

    head_state = {f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()}
    _atomic_save({"state_dict": head_state, "head_config": head.head_config(), "config": config,
                  "cache_fingerprint": fingerprint, "metrics": metrics,
                  "weights_sha256": weights_sha256(head_state)}, Path(path))
    return head_state


def save_head_files(run_dir: Path, head, config: dict, fingerprint: dict | None, metrics: dict, stage1: dict | None):
    """head.ckpt (head only) and, when the stage-1 checkpoint is known, model.ckpt (backbone + head)."""
    from cachefeat.model.checkpoint import weights_sha256

    head_state = save_head(run_dir / "head.ckpt", head, config, fingerprint, metrics)
    if stage1 is not None:
        combined = {**stage1["state_dict"], **head_state}
        _atomic_save({"state_dict": combined, "config": config, "head_config": head.head_config(),
                      "weights_sha256": weights_sha256(combined), "metrics": metrics}, run_dir / "model.ckpt")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
