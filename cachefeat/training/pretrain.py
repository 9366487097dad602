"""Stage-1 training of the MaskFormer (and, with `joint`, of the regression head with it).

The joint option is the "joint training" baseline of the benchmarks: backbone and head
trainable together, the head fed through the same `from_model_outputs` as the frozen paths.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cachefeat.config import at_least, instantiate, section
from cachefeat.data.events import EventFile, bucketed_batches
from cachefeat.errors import UserError
from cachefeat.head.checkpoint import build_head
from cachefeat.head.inputs import HeadBatch, from_model_outputs
from cachefeat.head.metrics import regression_metrics
from cachefeat.model.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from cachefeat.model.hepattn import is_hepattn_block
from cachefeat.model.layers import count_parameters
from cachefeat.model.metrics import event_metrics, summarize
from cachefeat.training.loop import (
    LOOP_ALLOWED,
    EpochStats,
    MetricsLog,
    fit,
    make_accelerator,
    prepare_trainee,
    resumable,
    save_checkpoint_state,
    train_step,
)

log = logging.getLogger(__name__)

DEFAULTS = {
    "epochs": 12,
    "batch_size": 32,
    "lr": 2e-3,
    "weight_decay": 1e-5,
    "grad_clip": 1.0,
    "mixed_precision": "no",
    "seed": 1,
    "joint": False,
    "head_loss_weight": 1.0,
    "init": None,
}
ALLOWED = {**LOOP_ALLOWED, "head_loss_weight": at_least(0.0)}


class Stage1Step(nn.Module):
    """Backbone (+ optional head): `forward(batch)` returns the training loss and its parts.

    One module so that DistributedDataParallel sees a single forward per step.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None, raw_fields, particle_fields,
                 head_loss_weight: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.raw_fields = list(raw_fields)
        self.particle_fields = list(particle_fields)
        self.head_loss_weight = head_loss_weight

    def forward(self, batch: dict):
        outputs = self.backbone(batch)
        loss, parts = self.backbone.loss(outputs, batch)
        if self.head is not None:
            target_index = self.backbone.match(outputs, batch)
            hb = from_model_outputs(outputs, batch, target_index, self.head.assignment_threshold,
                                    self.raw_fields, self.particle_fields).with_valid_targets_only()
            head_loss = self.head.loss(self.head(hb), hb)
            parts["head"] = float(head_loss.detach())
            loss = loss + self.head_loss_weight * head_loss
        return loss, outputs, parts


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def rank_batches(batches: list[np.ndarray], rank: int, world: int) -> list[np.ndarray]:
    """This rank's share of a global batch list; every rank gets the same count."""
    per_rank = len(batches) // world
    return [batches[i * world + rank] for i in range(per_rank)]


def build_stage1(config: dict, joint: bool = False):
    """Instantiate the backbone (and the head when `joint`) from a config."""
    data = config["data"]
    backbone = instantiate(config["model"], "model", hit_fields=data["hit_fields"])
    head = build_head(config, data["hit_fields"], data["particle_fields"], seed=None) if joint else None
    return backbone, head


def fit_head_scaling(head, events: EventFile) -> None:
    """Standardise the head's targets on every valid particle of a training file.

    A head with a frame (frame="track") fits its scaling on a HeadBatch: here the truth's, each
    particle a query whose pairs are its own hits with p = 1 (the backbone is still training),
    particles without hits left out.
    """
    if getattr(head, "frame", "none") != "none":
        _fit_frame_head_scaling(head, events)
        return
    parts = []
    for start in range(0, len(events), 1024):
        batch = events.read(np.arange(start, min(start + 1024, len(events))))
        fields = head.particle_fields
        parts.append(torch.stack([batch[f"particle_{f}"] for f in fields], dim=-1)[batch["particle_valid"]])
    values = torch.cat(parts)
    head.fit_scaling(values, torch.ones(len(values), dtype=torch.bool))


def truth_head_batch(batch: dict, raw_fields: list[str], particle_fields: list[str], dim: int) -> HeadBatch:
    """A HeadBatch of the truth of a padded event batch: a query per valid particle with hits, its
    hits as its pairs (logit 20, p = 1), zero embeddings, every query matched to its particle."""
    owner = batch["hit_particle_index"]  # [B, M], -1 for noise and padding
    particle_valid = batch["particle_valid"]
    B, P = particle_valid.shape
    hit_keep = batch["hit_valid"] & (owner >= 0) & particle_valid.gather(1, owner.clamp(min=0))
    hit_event, hit_pos = hit_keep.nonzero(as_tuple=True)
    hit_owner = owner[hit_event, hit_pos]
    has_hits = torch.zeros(B, P, dtype=torch.bool)
    has_hits[hit_event, hit_owner] = True
    query_keep = particle_valid & has_hits
    query_event, query_particle = query_keep.nonzero(as_tuple=True)
    query_row = (query_keep.flatten().cumsum(0) - 1).view(B, P)

    def offsets(keep):
        return torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])

    Q, H = query_event.shape[0], hit_event.shape[0]
    return HeadBatch(
        event_id=batch["event_id"].to(torch.int64), hit_offsets=offsets(hit_keep), query_offsets=offsets(query_keep),
        hit_raw=torch.stack([batch[f"hit_{f}"][hit_event, hit_pos].float() for f in raw_fields], dim=-1),
        hit_embed=torch.zeros(H, dim), query_embed=torch.zeros(Q, dim), query_valid_logit=torch.zeros(Q),
        query_slot=query_particle, target_index=query_particle,
        targets=torch.stack([batch[f"particle_{f}"][query_event, query_particle].float() for f in particle_fields],
                            dim=-1),
        target_valid=torch.ones(Q, dtype=torch.bool), pair_query=query_row[hit_event, hit_owner],
        pair_hit=torch.arange(H), pair_logit=torch.full((H,), 20.0))


def _fit_frame_head_scaling(head, events: EventFile) -> None:
    from cachefeat.head.inputs import concat

    parts = []
    for start in range(0, len(events), 1024):
        batch = events.read(np.arange(start, min(start + 1024, len(events))))
        parts.append(truth_head_batch(batch, head.raw_fields, head.particle_fields, head.dim))
    first = concat(parts)
    head.fit_scaling(first.targets, first.target_valid, first)


@torch.no_grad()
def validate(step: Stage1Step, events: EventFile, batch_size: int, accelerator) -> dict:
    """Validation loss and tracking metrics over this rank's share of `events` (gathered)."""
    step.eval()
    batches = rank_batches(bucketed_batches(events.hit_counts, batch_size, seed=None),
                           accelerator.process_index, accelerator.num_processes)
    totals: dict[str, float] = {}
    loss_sum, n_batches = 0.0, 0
    module = accelerator.unwrap_model(step)
    preds: dict[str, list] = {}
    trues: dict[str, list] = {}
    for idx in batches:
        batch = _to(events.read(idx), accelerator.device)
        loss, outputs, _ = module(batch)
        target_index = module.backbone.match(outputs, batch)
        counts = event_metrics(outputs, batch, target_index)
        for key, value in counts.items():
            totals[key] = totals.get(key, 0.0) + float(np.sum(value))
        loss_sum += float(loss)
        n_batches += 1
        if module.head is not None:  # joint: the head's resolutions, as phase 2 reports them
            hb = from_model_outputs(outputs, batch, target_index, module.head.assignment_threshold,
                                    module.raw_fields, module.particle_fields)
            valid = hb.target_valid
            for key, value in module.head.decode(module.head(hb)[valid]).items():
                preds.setdefault(key, []).append(value.cpu().numpy())
                column = module.particle_fields.index(key)
                trues.setdefault(key, []).append(hb.targets[valid][:, column].cpu().numpy())
    keys = sorted(totals) or ["n_particles"]
    local = torch.tensor([totals.get(k, 0.0) for k in keys] + [loss_sum, n_batches],
                         dtype=torch.float64, device=accelerator.device)
    summed = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    summed = summed.cpu().numpy()
    metrics = summarize({k: np.array([summed[i]]) for i, k in enumerate(keys)})
    metrics["val_loss"] = float(summed[-2] / max(summed[-1], 1))
    if preds:
        head_metrics = regression_metrics({k: np.concatenate(v) for k, v in preds.items()},
                                          {k: np.concatenate(v) for k, v in trues.items()})
        metrics.update({f"val_{k}": v for k, v in head_metrics.items()})
    step.train()
    return metrics


def pretrain(config: dict, train_path, val_path, run_dir, *, epochs: int | None = None,
             batch_size: int | None = None, joint: bool | None = None, resume: bool = False,
             seed: int | None = None, device: str | None = None, init=None) -> dict:
    """Train stage 1 (or backbone + head jointly); returns the final validation metrics.

    `init` (or pretrain.init): a stage-1 checkpoint whose weights the backbone starts from, e.g.
    to fine-tune a trained stage 1 jointly with a fresh head; the head always starts fresh.
    Writes RUN_DIR/stage1_best.ckpt, stage1_last.ckpt, metrics.json/csv and resumable
    Accelerate checkpoints under RUN_DIR/checkpoints/. Joint checkpoints also hold the head
    (see `save_checkpoint`): `cachefeat evaluate --head` and `--checkpoint` both take them.
    """
    if is_hepattn_block(config.get("model")):
        raise UserError("cachefeat pretrain trains cachefeat's own MaskFormer; train a hepattn stage 1 with "
                        "hepattn's run_tracking.py and give its checkpoint to `cachefeat extract`")
    settings = section(config, "pretrain", DEFAULTS, ALLOWED)
    for key, value in {"epochs": epochs, "batch_size": batch_size, "joint": joint, "seed": seed,
                       "init": init}.items():
        if value is not None:
            settings[key] = value
    run_dir = Path(run_dir)
    data = config["data"]
    accelerator = make_accelerator(run_dir, settings["mixed_precision"], device=device)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings["seed"])

    train = EventFile(train_path, data["hit_fields"], data["particle_fields"], data.get("max_hits"))
    val = EventFile(val_path, data["hit_fields"], data["particle_fields"], data.get("max_hits"))
    backbone, head = build_stage1(config, settings["joint"])
    if settings["init"] is not None:
        load_model_state(backbone, load_checkpoint(settings["init"]))  # UserError: missing file, other model
    if head is not None:
        fit_head_scaling(head, train)
    accelerator.print(f"backbone: {count_parameters(backbone):,} trainable parameters"
                      + (f"; head: {count_parameters(head):,} trainable parameters (joint)" if head else ""))
    step = Stage1Step(backbone, head, data["hit_fields"], data["particle_fields"], settings["head_loss_weight"])

    world = accelerator.num_processes
    steps_per_epoch = len(bucketed_batches(train.hit_counts, settings["batch_size"], seed=0)) // world
    if steps_per_epoch == 0:
        raise ValueError("training file has fewer events than one global batch")
    trainee = prepare_trainee(accelerator, step, settings["lr"], settings["weight_decay"],
                              settings["epochs"] * steps_per_epoch)
    state = resumable(accelerator, run_dir, trainee.scheduler, resume)
    metrics_log = MetricsLog(run_dir, accelerator, "pretrain", settings)
    module = trainee.module

    def batches(epoch: int, start: int):
        order = rank_batches(bucketed_batches(train.hit_counts, settings["batch_size"], seed=settings["seed"],
                                              epoch=epoch), accelerator.process_index, world)
        for idx in order[start:]:
            yield _to(train.read(idx), accelerator.device)

    def one_step(batch: dict) -> list[float]:
        return train_step(accelerator, [trainee], lambda t: t.model(batch)[0], settings["grad_clip"]).tolist()

    def end_epoch(stats: EpochStats) -> None:
        val_metrics = validate(trainee.model, val, settings["batch_size"], accelerator)
        last = {"epoch": state.epoch, "train_loss": stats.train_loss(), "events_per_s": stats.events_per_s,
                "lr": trainee.scheduler.get_last_lr()[0], **val_metrics}
        state.history.append(last)
        accelerator.print(
            f"epoch {state.epoch}: train {last['train_loss']:.4f} val {last['val_loss']:.4f} "
            f"eff@0.75 {last['eff_075']:.3f} fake {last['fake_rate']:.3f} "
            f"({last['events_per_s']:.0f} events/s)")
        if accelerator.is_main_process:
            if last["val_loss"] < state.best_val:
                state.best_val = last["val_loss"]
                save_checkpoint(run_dir / "stage1_best.ckpt", module.backbone, config, module.head, metrics=last)
            save_checkpoint(run_dir / "stage1_last.ckpt", module.backbone, config, module.head, metrics=last)
        metrics_log.write(state.history)
        save_checkpoint_state(accelerator, run_dir, state.global_step)

    fit(accelerator, state, [trainee], batches, one_step, end_epoch, epochs=settings["epochs"],
        steps_per_epoch=steps_per_epoch, events_of=lambda batch: int(batch["event_id"].shape[0]))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    train.close()
    val.close()
    return state.history[-1] if state.history else {}
