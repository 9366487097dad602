"""The training loop every trainer shares: `train` (one head), `sweep` (K heads in one pass),
`pretrain` (stage 1, or backbone + head with --joint) and the benchmarks.

A trainer is a short recipe over these pieces:

- setup: `make_accelerator`; the cache's batch source (`cache_source`, `check_floor`,
  `scaling_batch`, `cache_val_batches`, `schedule_steps`); `prepare_trainee` (AdamW, the
  OneCycle schedule, `accelerator.prepare`); `resumable` (the `TrainState`, registered for
  checkpointing and restored with --resume);
- the step: `train_step` (forward, backward, clipping, optimizer and schedule under
  `accelerator.accumulate`, for one or K trainees on the same batch), `head_step` (a head
  trainer's step: `global_mean_loss` over ranks, losses averaged over ranks, left on the device
  as `StepLosses`: on a GPU, a cached step never waits for the GPU);
- the loop: `fit` (epochs of steps from the state's position, a progress bar, max_steps; calls
  the trainer's `end_epoch` after every epoch, which validates, logs and saves);
- validation `evaluate_batches`; logging `MetricsLog`; checkpoints `save_checkpoint_state` and
  `load_last_checkpoint`.

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
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
from torch import Tensor, nn
from tqdm import tqdm

from cachefeat.config import POSITIVE_INT, above, at_least, one_of
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch
from cachefeat.head.metrics import regression_metrics
from cachefeat.training.sources import CacheMemorySource, CacheStreamSource, cache_fits_memory

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
MIXED_PRECISION = ("no", "bf16", "fp16")
# The ranges of the settings the loop itself reads, shared by the trainers' sections (train, pretrain).
LOOP_ALLOWED = {
    "epochs": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "lr": above(0.0),
    "weight_decay": at_least(0.0),
    "grad_clip": at_least(0.0),  # 0: no clipping
    "mixed_precision": one_of(*MIXED_PRECISION),
    "seed": at_least(0, integer=True),
}
# Target scaling (mean/std) is fitted on the matched targets of the first SCALING_EVENTS training
# events, in both cache and live mode: cache event i is input event i, so both get the same numbers.
SCALING_EVENTS = 2048
# The progress bar shows the epoch's mean loss at most every PROGRESS_S seconds (reading it waits for the device).
PROGRESS_S = 1.0


# --- the accelerator, the train state, the optimizer and its update ----------------------------


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
    loop over them): for the 53k-parameter head, 1.17 -> 0.17 ms per optimizer step on this project's
    2-core CPU with one thread (measured 2026-11-26, alternating, same process)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)


def optimizer_step(accelerator: Accelerator, model, loss, optimizer, scheduler, grad_clip: float) -> None:
    """The update every trainer makes: backward, clip and schedule on synchronising steps, step, zero grads.

    Under gradient accumulation the prepared optimizer skips its step on non-synchronising
    micro-steps; the (unprepared) scheduler advances once per real optimizer step.
    """
    accelerator.backward(loss)
    optimizer_update(accelerator, model, optimizer, scheduler, grad_clip)


def optimizer_update(accelerator: Accelerator, model, optimizer, scheduler, grad_clip: float) -> None:
    """`optimizer_step` after its backward, on the gradients already in `model`'s parameters (a stacked
    sweep step backpropagates K variants' losses at once, then updates each variant with this)."""
    if accelerator.sync_gradients and grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# --- setup -----------------------------------------------------------------------------------


@dataclass
class Trainee:
    """A model being trained: `model` as prepared by the accelerator (what steps call), `module` the
    module whose `loss`, `decode` and weights the trainer reads (the unwrapped head), its AdamW
    `optimizer` (prepared) and its OneCycle `scheduler` (unprepared: a prepared one advances once
    per process per step, so 2 processes would follow another learning-rate curve than 1 process
    on the same batches)."""

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def prepare_trainee(accelerator: Accelerator, model: nn.Module, lr: float, weight_decay: float, total_steps: int,
                    module: nn.Module | None = None) -> Trainee:
    """AdamW (`adamw`) over `model`'s parameters and a OneCycle schedule of `total_steps` steps peaking
    at `lr`; model and optimizer go through `accelerator.prepare`. `module` defaults to the
    unwrapped prepared model."""
    optimizer = adamw(model.parameters(), lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Trainee(model, accelerator.unwrap_model(model) if module is None else module, optimizer, scheduler)


def resumable(accelerator: Accelerator, run_dir: Path, scheduler, resume: bool) -> TrainState:
    """A fresh `TrainState`, registered for checkpointing with `scheduler` (after the prepared model and
    optimizer); with `resume`, restored from RUN_DIR's newest checkpoint when there is one."""
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    accelerator.register_for_checkpointing(scheduler)
    if resume and load_last_checkpoint(accelerator, run_dir) is not None:
        accelerator.print(f"resumed at epoch {state.epoch}, batch {state.step_in_epoch} (step {state.global_step})")
    return state


def cache_source(reader, data_mode: str, settings: dict, accelerator: Accelerator):
    """(this rank's training source over the cache `reader`, the data mode used).

    data_mode: "memory" (`CacheMemorySource`, resident on the accelerator's device), "stream"
    (`CacheStreamSource`) or "auto" (memory when the decoded cache fits settings["memory_budget_mb"]).
    Batches of settings["batch_size"] events per rank, in the order of settings["seed"].
    """
    if data_mode == "auto":
        data_mode = "memory" if cache_fits_memory(reader, settings["memory_budget_mb"]) else "stream"
    rank, world = accelerator.process_index, accelerator.num_processes
    if data_mode == "memory":
        return CacheMemorySource(reader, settings["batch_size"], settings["seed"], rank, world,
                                 accelerator.device), data_mode
    if data_mode == "stream":
        return CacheStreamSource(reader, settings["batch_size"], settings["seed"], rank, world), data_mode
    raise UserError(f"--data must be auto, memory or stream, not {data_mode!r}")


def schedule_steps(source, settings: dict, world: int) -> tuple[int, int]:
    """(batches of epoch 0, the OneCycle schedule's length) for settings["epochs"] epochs of `source`
    with settings["gradient_accumulation_steps"]: optimizer steps over all epochs, plus one.

    Raises UserError when an epoch holds no batch.
    """
    steps_per_epoch = source.num_batches(0)
    if steps_per_epoch == 0:
        raise UserError(f"fewer training events than one global batch of {settings['batch_size'] * world}")
    total = sum(source.num_batches(e) for e in range(settings["epochs"])) // settings["gradient_accumulation_steps"]
    return steps_per_epoch, max(total, 1) + 1


def check_floor(head, reader, what: str = "") -> None:
    """UserError when the head's assignment threshold is below the cache's floor (the pairs between
    them were not stored); `what` prefixes the message (e.g. "variant deep: ")."""
    floor = float(reader.settings.get("floor", 0.0))
    if head.assignment_threshold < floor:
        raise UserError(f"{what}head.assignment_threshold {head.assignment_threshold} is below the cache floor "
                        f"{floor}: pairs between them were not stored; re-extract with --floor "
                        f"{head.assignment_threshold} or raise the threshold")


def scaling_batch(reader) -> HeadBatch:
    """The cache's first SCALING_EVENTS events, whose matched targets (and, for frame="track", pairs)
    every trainer fits a head's scaling on: `head.fit_scaling(b.targets, b.target_valid, b)`."""
    return reader.read_events(0, min(reader.num_events, SCALING_EVENTS))


def validation_batches(num_events: int, batch_size: int, rank: int, world: int):
    """This rank's share of the validation events in fixed order (no shuffling, nothing dropped):
    int64 index arrays of at most `batch_size` events."""
    mine = np.array_split(np.arange(num_events), world)[rank]
    for start in range(0, len(mine), batch_size):
        yield mine[start:start + batch_size]


def cache_val_batches(val_reader, batch_size: int, accelerator: Accelerator) -> list[HeadBatch]:
    """This rank's validation batches of a cache (`validation_batches`), gathered once, on the
    accelerator's device, embeddings float32."""
    resident = val_reader.load(accelerator.device)
    return [resident.batch(idx).float() for idx in validation_batches(
        val_reader.num_events, batch_size, accelerator.process_index, accelerator.num_processes)]


# --- the step --------------------------------------------------------------------------------


def train_step(accelerator: Accelerator, trainees: list, loss_of: Callable[[object], Tensor], grad_clip: float,
               each: Callable | None = None) -> Tensor:
    """One step of every trainee (anything with `model`, `optimizer`, `scheduler`, as `Trainee`) on
    the same batch: `loss_of(trainee)` (a scalar tensor), then `optimizer_step`, all under one
    `accelerator.accumulate` over the trainees' models.

    `each(work)` runs work(trainee) for every trainee and returns the results in trainee order
    (default: one after another; the sweep passes its thread pool). Returns this rank's detached
    losses, float [K].
    """
    def one(trainee) -> Tensor:
        loss = loss_of(trainee)
        optimizer_step(accelerator, trainee.model, loss, trainee.optimizer, trainee.scheduler, grad_clip)
        return loss.detach()

    with accelerator.accumulate(*[t.model for t in trainees]):
        losses = each(one) if each is not None else [one(t) for t in trainees]
    return torch.stack(losses)


def step_input(hb: HeadBatch, device) -> HeadBatch:
    """A batch of a source (`training.sources`, whose batches hold only the queries with a valid
    target: all the loss reads) as a head step reads it: on `device`, embeddings float32."""
    return hb.to(device).float()


class StepLosses(Sequence):
    """The losses of one step, one per trainee, averaged over the ranks: `values` (float32 [K]) on
    the device. Reading an element (indexing, iterating) copies them to the host, once: that waits
    for the device; a trainer that keeps `values` and reads them later steps without waiting."""

    def __init__(self, values: Tensor):
        self.values = values
        self._host: list[float] | None = None

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, i):
        if self._host is None:
            self._host = self.values.tolist()
        return self._host[i]


def head_step(accelerator: Accelerator, trainees: list, hb: HeadBatch, grad_clip: float,
              predict: Callable | None = None, each: Callable | None = None) -> StepLosses:
    """The step of a head trainer on `hb` (from `step_input`): every trainee's loss
    `module.loss(predict(trainee, hb), hb)` (default predict: `trainee.model(hb)`) as a
    `global_mean_loss`, one `train_step`. Returns each trainee's loss averaged over the ranks,
    unread: on a GPU the step (batch gather, forward, backward, update) never waits for the GPU."""
    predict = predict or (lambda trainee, batch: trainee.model(batch))

    def loss_of(trainee) -> Tensor:
        return global_mean_loss(trainee.module.loss(predict(trainee, hb), hb), hb, accelerator)

    losses = train_step(accelerator, trainees, loss_of, grad_clip, each)
    return StepLosses(accelerator.gather(losses[None]).mean(0))


def global_mean_loss(loss: Tensor, hb: HeadBatch, accelerator: Accelerator) -> Tensor:
    """Rescale a rank's mean loss so that DDP's gradient average is the mean over all ranks' tracks.

    Ranks hold different numbers of matched queries; averaging per-rank means would weight
    tracks unequally and differ from one process on the same global batch.
    """
    if accelerator.num_processes == 1:
        return loss
    n_local = hb.target_valid.sum().to(torch.float64)
    n_global = accelerator.reduce(n_local.clone(), reduction="sum")
    return loss * (n_local * accelerator.num_processes / n_global.clamp(min=1)).to(loss.dtype)


# --- the loop --------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """What one (possibly partial) epoch did on this rank: per-trainee loss sums over `steps` steps
    (float64 [K], on the device of the steps' losses) and each step's losses (`step_values`, float64
    [K] each, unread), training events of all ranks, host seconds, and whether max_steps stopped it."""

    loss_sums: Tensor
    steps: int = 0
    events: int = 0
    seconds: float = 0.0
    stopped: bool = False
    step_values: list[Tensor] = field(default_factory=list)

    def train_loss(self, i: int = 0) -> float:
        """Trainee i's mean step loss over the epoch (read on the host)."""
        return float(self.loss_sums[i]) / max(self.steps, 1)

    def step_losses(self) -> list[list[float]]:
        """Per trainee, its loss at every step of the epoch, read on the host in one copy."""
        if not self.step_values:
            return [[] for _ in range(len(self.loss_sums))]
        return torch.stack(self.step_values).T.tolist()

    @property
    def events_per_s(self) -> float:
        return self.events / max(self.seconds, 1e-9)


def fit(accelerator: Accelerator, state: TrainState, trainees: list, batches: Callable[[int, int], Iterable],
        step: Callable[[object], StepLosses | list[float]], end_epoch: Callable[[EpochStats], None], *,
        epochs: int, steps_per_epoch: int, events_of: Callable[[object], int], max_steps: int | None = None) -> None:
    """Train from `state` up to `epochs` epochs: for each batch of `batches(epoch, start)` (this rank's,
    from batch `start` of the epoch) `step(batch)` returns the trainees' losses; then `end_epoch(stats)`.

    The losses of a `StepLosses` are summed where they are: the loop reads them only for the
    progress bar (at most every PROGRESS_S seconds) and `end_epoch` when it reads the stats.

    `state.step_in_epoch` counts batches, `state.global_step` optimizer steps (synchronising steps
    under gradient accumulation). An epoch that ends advances `state.epoch` before `end_epoch`; at
    `max_steps` optimizer steps the loop stops within the epoch (`stats.stopped`, `state.epoch`
    unchanged) after its `end_epoch`. `events_of(batch)`: events in a batch of one rank.
    """
    while state.epoch < epochs:
        stats = _run_epoch(accelerator, state, trainees, batches, step, epochs, steps_per_epoch, events_of, max_steps)
        if not stats.stopped:
            state.epoch += 1
            state.step_in_epoch = 0
        end_epoch(stats)
        if stats.stopped:
            return


def _run_epoch(accelerator, state, trainees, batches, step, epochs, steps_per_epoch, events_of,
               max_steps) -> EpochStats:
    start = shown = time.perf_counter()
    stats = EpochStats(torch.zeros(len(trainees), dtype=torch.float64))
    for trainee in trainees:
        trainee.model.train()
    bar = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, unit="batch", leave=False,
               desc=f"epoch {state.epoch + 1}/{epochs}", disable=not accelerator.is_local_main_process)
    for batch in batches(state.epoch, state.step_in_epoch):
        losses = _loss_values(step(batch))
        state.step_in_epoch += 1
        if accelerator.sync_gradients:
            state.global_step += 1
        stats.loss_sums = losses if stats.steps == 0 else stats.loss_sums + losses
        stats.step_values.append(losses)
        stats.steps += 1
        stats.events += events_of(batch) * accelerator.num_processes
        bar.update(1)
        now = time.perf_counter()
        if not bar.disable and now - shown >= PROGRESS_S:  # reading the losses waits for the device
            shown = now
            bar.set_postfix({"loss" if len(losses) == 1 else "best_loss":
                             f"{float(stats.loss_sums.min()) / stats.steps:.4f}",
                             "ev_s": f"{stats.events / (now - start):.0f}"})
        if max_steps is not None and state.global_step >= max_steps:
            stats.stopped = True
            break
    bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _loss_values(losses: StepLosses | list[float]) -> Tensor:
    """A step's losses as float64 [K]: a `StepLosses`' values where they are, unread; a list on the host."""
    if isinstance(losses, StepLosses):
        return losses.values.double()
    return torch.tensor(losses, dtype=torch.float64)


# --- validation ------------------------------------------------------------------------------


def gather_objects(accelerator: Accelerator, items: list) -> list:
    """`items` of every rank, concatenated in rank order (the list itself in one process)."""
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object
    return gather_object(items)


@torch.no_grad()
def evaluate_batches(head: nn.Module, batches: Iterable[HeadBatch], accelerator: Accelerator) -> dict:
    """Loss and resolutions of `head` (prepared or not) over this rank's HeadBatches, all ranks' gathered.

    Returns {"val_loss": mean loss per matched track, "val_tracks": matched tracks, and "val_" +
    every `regression_metrics` key}. The head is in eval mode meanwhile, then as before.
    """
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


# --- checkpoints and logging -----------------------------------------------------------------


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
        """Log the newest row of `history` (one dict per epoch) and rewrite both files with all rows."""
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
