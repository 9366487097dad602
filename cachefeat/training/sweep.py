"""Hyper-parameter sweeps: train a grid of regression-head variants in one pass over the cache.

A `sweep` block in the config lists the variants, as a grid (cartesian product, in key order)
and/or an explicit list, each a set of dotted overrides of the base config::

    sweep:
      metric: val_loss          # the per-epoch metric the results are ranked by (default val_loss)
      mode: min                 # min (default) or max, e.g. for val_q_accuracy
      grid: {head.init_args.hidden_dim: [64, 120], head.init_args.dropout: [0.0, 0.1], train.lr: [1.0e-3, 3.0e-3]}
      variants: [{name: deep, head.init_args.num_layers: 4}]
      stack: auto               # auto (default), true or false: see "Stacking" below

    cachefeat sweep --config CONFIG --cache TRAIN.zarr --val-cache VAL.zarr --output RUN_DIR

Sweepable keys (`SWEEP_KEYS`): head.init_args.{hidden_dim, num_layers, dropout,
assignment_threshold, frame} and train.{lr, weight_decay, seed}. Everything else is shared by all
variants: batch size, epochs, the event order (from the base config's train.seed), gradient
clipping and accumulation, mixed precision. A variant's train.seed sets its initial weights and
its dropout stream only. A grid variant is named after its values (`hidden_dim64-dropout0.1-lr0.003`);
a listed one by its `name`.

Each batch is read, gathered, moved to the device and widened once, and its pair weights
(sigmoid of the pair logits, the threshold mask, the per-query normalisation, the pairs' hit
features and the sparse weight matrices, and for frame="track" heads the frame of each query)
are computed once per distinct threshold; then every
variant takes its own step on it, with its own parameters, AdamW optimizer, OneCycle schedule and
dropout streams (`StreamDropout`, not torch's global RNG). So a variant ends with the same weights
and per-step losses as `train(...)` run alone on its config (with the sweep's event order).

Stacking (`sweep.stack`): variants whose heads differ in dropout at most (`stack_key`: same
hidden_dim, num_layers, hit net, frame, threshold, fields and targets; lr, weight_decay, seed and
dropout may differ) form a group that steps as one: `StackedHeads` stacks each layer's weights
per step and runs the hit nets and the MLP as batched matmuls and the pools once over [P, K*D]
(under the accelerator's autocast), each variant takes its own loss, one backward of their sum
leaves each variant its own gradient, and each variant clips, steps AdamW and its schedule as
alone (`_stacked_step`; gradient accumulation as alone). A variant alone in its group steps as
without stacking. Stacked variants equal their separate runs to float32 rounding, not bit for
bit (tests/training/test_sweep.py states the measured tolerance). `auto` stacks on CUDA (fewer,
larger kernels) and not on the CPU, where it measured no faster: K = 8 grid of the benchmark,
2-core CPU, see README's Sweeps. Stacking needs one process (the stacked forward bypasses DDP's
wrapper): `true` under several processes is refused, `auto` then steps the variants separately.
Validation is never stacked.

In one CPU process the variants' steps (and validations) run on `workers` threads, each with
an equal share of torch's intra-op threads (default: one worker per torch thread, at most one per
variant, or per group when stacking). Under `accelerate launch` every variant is data-parallel
over the same processes (each prepared with the one Accelerator) and the variants step one after
another, so that every rank issues its collectives in the same order.

Writes RUN_DIR/<variant>/{head.ckpt, metrics.json, metrics.csv, config.json} as `cachefeat train`
does (no accelerate checkpoints: a sweep cannot be resumed), and RUN_DIR/sweep.csv, sweep.json and
sweep_val_loss.png (matplotlib) with one row per variant, best first.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from cachefeat.config import did_you_mean, one_of, section
from cachefeat.errors import UserError
from cachefeat.head.checkpoint import build_head, save_head_files
from cachefeat.head.inputs import HeadBatch
from cachefeat.head.regression import PairWeights, RegressionHead, pair_weights
from cachefeat.head.stacked import StackedHeads, stack_groups
from cachefeat.training.loop import (
    EpochStats,
    MetricsLog,
    StepLosses,
    Trainee,
    TrainState,
    cache_source,
    cache_val_batches,
    check_floor,
    evaluate_batches,
    fit,
    global_mean_loss,
    head_step,
    make_accelerator,
    optimizer_step,
    optimizer_update,
    prepare_trainee,
    scaling_batch,
    schedule_steps,
    step_input,
)

log = logging.getLogger(__name__)

# What may differ between variants; each value is checked by the rule its owner declares
# (`RegressionHead.ALLOWED`, train's `ALLOWED`).
SWEEP_KEYS = (
    "head.init_args.hidden_dim",
    "head.init_args.num_layers",
    "head.init_args.dropout",
    "head.init_args.assignment_threshold",
    "head.init_args.frame",
    "train.lr",
    "train.weight_decay",
    "train.seed",
)
SWEEP_DEFAULTS = {"metric": "val_loss", "mode": "min", "grid": {}, "variants": [], "stack": "auto"}
SWEEP_ALLOWED = {"mode": one_of("min", "max")}
# sweep.stack: stack same-shape variants' forward and backward (`StackedHeads`), or not, or "auto".
STACK_CHOICES = ("auto", True, False)
_NAME = re.compile(r"^[A-Za-z0-9_.=+-]+$")


@dataclass
class Variant:
    """One point of a sweep: `config` is the base config (without its sweep block) with `overrides` applied."""

    name: str
    overrides: dict
    config: dict

    def value(self, key: str):
        """The effective value of a dotted key (overridden or from the base config)."""
        node = self.config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node


def sweep_settings(config: dict) -> dict:
    """The config's `sweep` block merged over SWEEP_DEFAULTS (unknown keys refused)."""
    block = config.get("sweep")
    if isinstance(block, dict) and "stack" in block:  # "auto" or a boolean: checked here, not by its default's type
        stack = block["stack"]
        if not (isinstance(stack, bool) or stack == "auto"):
            raise UserError(f"sweep.stack must be one of auto, true, false, not {stack!r}")
        config = {**config, "sweep": {k: v for k, v in block.items() if k != "stack"}}
    settings = section(config, "sweep", SWEEP_DEFAULTS, SWEEP_ALLOWED)
    if isinstance(block, dict) and "stack" in block:
        settings["stack"] = block["stack"]
    if not isinstance(settings["metric"], str) or not settings["metric"].startswith("val_"):
        raise UserError(f"sweep.metric must name a validation metric such as val_loss, not {settings['metric']!r}")
    return settings


def sweep_variants(config: dict) -> list[Variant]:
    """The variants of the config's `sweep` block: the grid's points in key order, then the listed ones."""
    settings = sweep_settings(config)
    grid, listed = settings["grid"], settings["variants"]
    if not isinstance(grid, dict) or not isinstance(listed, list):
        raise UserError("sweep.grid must be a mapping of key: [values] and sweep.variants a list of mappings")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep.grid.{key} must be a non-empty list of values")
    base = {k: v for k, v in config.items() if k != "sweep"}
    points = []
    for combo in itertools.product(*grid.values()) if grid else ():
        overrides = {key: _checked(key, value, "sweep.grid") for key, value in zip(grid, combo)}
        points.append(("-".join(f"{k.rsplit('.', 1)[-1]}{_text(v)}" for k, v in overrides.items()), overrides))
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise UserError(f"sweep.variants[{i}] must be a mapping with a name")
        overrides = {k: _checked(k, v, f"sweep.variants[{i}]") for k, v in entry.items() if k != "name"}
        points.append((entry["name"], overrides))
    if not points:
        raise UserError("the config's sweep block defines no variant (give sweep.grid and/or sweep.variants)")
    variants, seen = [], set()
    for name, overrides in points:
        if not _NAME.match(name or "-") or name in (".", ".."):
            raise UserError(f"sweep variant name {name!r} must use only letters, digits and . _ = + -")
        if name in seen:
            raise UserError(f"two sweep variants are named {name!r}")
        seen.add(name)
        variant_config = copy.deepcopy(base)
        for key, value in overrides.items():
            *parents, last = key.split(".")
            node = variant_config
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        variants.append(Variant(name, overrides, variant_config))
    return variants


def _checked(key: str, value, where: str):
    if key not in SWEEP_KEYS:
        raise UserError(f"{where}: '{key}' cannot be swept{did_you_mean(key, SWEEP_KEYS)}; sweepable keys: "
                        f"{', '.join(SWEEP_KEYS)} (batch size, epochs and event order are shared)")
    from cachefeat.training.train import ALLOWED

    owner, name = key.split(".")[0], key.rsplit(".", 1)[-1]
    rule = RegressionHead.ALLOWED[name] if owner == "head" else ALLOWED[name]
    rule.check(f"{where}: {key}", value)
    return value if value is None or rule.integer or rule.choices else float(value)


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- the shared part of the sparse head, and one variant's part ------------------------------


class VariantHead(nn.Module):
    """A variant's `RegressionHead` as the module Accelerate prepares (and DDP wraps).

    forward(hb, pairs) predicts from the batch's shared pair weights; forward(hb) is the head's
    own forward (evaluation). loss, decode and particle_fields are the head's.
    """

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hb: HeadBatch, pairs: PairWeights | None = None) -> Tensor:
        if pairs is None:
            return self.head(hb)
        return self.head.predict_from_pairs(hb, pairs)

    def loss(self, pred: Tensor, hb: HeadBatch) -> Tensor:
        return self.head.loss(pred, hb)

    def decode(self, pred: Tensor) -> dict[str, Tensor]:
        return self.head.decode(pred)

    @property
    def particle_fields(self) -> list[str]:
        return self.head.particle_fields


@dataclass
class _Run(Trainee):
    """A variant being trained (a `Trainee`: its prepared `VariantHead`, the head as `module`, its
    optimizer and schedule), its output folder, host seconds in its own steps and validations,
    and its history."""

    variant: Variant
    run_dir: Path
    seconds: float = 0.0
    step_losses: list = field(default_factory=list)
    history: list = field(default_factory=list)


@dataclass
class _Group:
    """Variants that step together: one run stepped on its own (`stacked` None), or K >= 2 runs of one
    shape (`stack_key`) whose forward and backward run as one `StackedHeads` computation."""

    runs: list[_Run]
    stacked: StackedHeads | None = None


def stack_setting(setting, accelerator) -> bool:
    """Whether the sweep stacks (sweep.stack): True, False, or "auto": on CUDA, not on the CPU (measured
    no faster there, see the module docstring). Stacking needs one process: the stacked forward reads
    each variant's parameters directly, past the hooks of DDP's wrapper, so under several processes
    `true` is refused and "auto" steps the variants separately."""
    if setting is True and accelerator.num_processes > 1:
        raise UserError(f"sweep.stack: true needs one process, not {accelerator.num_processes} (DDP's gradient "
                        "hooks would be bypassed); use stack: auto or false")
    if setting == "auto":
        return accelerator.num_processes == 1 and accelerator.device.type == "cuda"
    return bool(setting)


def variant_groups(runs: list[_Run], stack: bool) -> list[_Group]:
    """The runs as step groups: with `stack`, one group per `stack_key` (a group of one steps on its
    own), in order of first variant; without, one group per run."""
    if not stack:
        return [_Group([run]) for run in runs]
    groups = []
    for indices in stack_groups([run.module for run in runs]):
        members = [runs[i] for i in indices]
        groups.append(_Group(members, StackedHeads([r.module for r in members]) if len(members) > 1 else None))
    return groups


# --- the sweep -------------------------------------------------------------------------------


def sweep(config: dict, run_dir, *, cache, val_cache, max_epochs: int | None = None, batch_size: int | None = None,
          data_mode: str = "auto", device: str | None = None, max_steps: int | None = None,
          allow_stale: bool = False, workers: int | None = None) -> list[dict]:
    """Train every variant of the config's sweep block over the cache in one pass; returns the result rows.

    Rows (best first by sweep.metric) hold the variant's name, its swept values, the best value
    of the metric and its epoch, the best val loss, the resolution of each target at the best
    epoch (the 68% half-width: relative for pt; charge accuracy for q), epochs and steps done
    and train_s (host seconds in the variant's own steps and evaluation).
    max_steps stops after that many optimizer steps (tests). workers: threads that step the
    variants in one CPU process (default: torch's intra-op thread count, at most one per variant;
    always 1 on CUDA and under several processes). Other arguments as `train(...)`.
    """
    from cachefeat.cache.reader import CacheReader
    from cachefeat.model.metrics import summarize
    from cachefeat.training.train import ALLOWED, DEFAULTS, check_cache

    started = time.perf_counter()
    sweep_conf = sweep_settings(config)
    variants = sweep_variants(config)
    settings = section(config, "train", DEFAULTS, ALLOWED)
    for key, value in {"epochs": max_epochs, "batch_size": batch_size}.items():
        if value is not None:
            settings[key] = value
    if settings["mixed_precision"] == "fp16":
        raise UserError("sweep does not support train.mixed_precision fp16 (one loss scaler would serve every "
                        "variant); use bf16 or no")
    run_dir = Path(run_dir)
    accelerator = make_accelerator(run_dir, settings["mixed_precision"], settings["gradient_accumulation_steps"],
                                   device=device)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)

    reader, val_reader = CacheReader(cache), CacheReader(val_cache)
    check_cache(reader, config, checkpoint_sha256=None, input_hash=None, allow_stale=allow_stale, what="cache")
    check_cache(val_reader, config, checkpoint_sha256=reader.fingerprint.get("checkpoint_sha256"),
                input_hash=None, allow_stale=allow_stale, what="validation cache")
    source, data_mode = cache_source(reader, data_mode, settings, accelerator)
    steps_per_epoch, total_steps = schedule_steps(source, settings, accelerator.num_processes)
    val_batches = cache_val_batches(val_reader, settings["batch_size"], accelerator)
    first = scaling_batch(reader)
    frozen = {f"frozen_{k}": v for k, v in summarize(reader.metrics()).items()}

    runs = [_build_run(variant, reader, first, total_steps, accelerator, run_dir) for variant in variants]
    del first
    metrics = evaluate_batches(runs[0].model, val_batches[:1], accelerator)  # which val_ metrics exist
    if sweep_conf["metric"] not in metrics:
        raise UserError(f"sweep.metric {sweep_conf['metric']!r} is not a validation metric; choose one of "
                        f"{', '.join(k for k in metrics if k.startswith('val_'))}")
    if accelerator.is_main_process:
        for run in runs:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / "config.json").write_text(json.dumps(run.variant.config, indent=1, default=str))
    thresholds = sorted({run.module.assignment_threshold for run in runs})
    groups = variant_groups(runs, stack_setting(sweep_conf["stack"], accelerator))
    stacked = sum(len(g.runs) for g in groups if g.stacked is not None)
    workers = _worker_count(workers, len(groups), accelerator)
    accelerator.print(f"sweep: {len(runs)} variants over {reader.num_events:,} training events "
                      f"({data_mode}), {len(thresholds)} assignment threshold(s), {workers} worker thread(s)"
                      + (f", {stacked} stacked in {sum(g.stacked is not None for g in groups)} group(s)"
                         if stacked else ""))
    with _variant_pool(workers) as pool:
        _sweep_epochs(runs, groups, source, settings, steps_per_epoch, thresholds, val_batches, frozen, reader,
                      accelerator, pool, max_steps)
    accelerator.wait_for_everyone()

    rows = results_table(runs, sweep_conf)
    if accelerator.is_main_process:
        write_results(run_dir, rows, runs, sweep_conf, {**settings, "data_mode": data_mode, "workers": workers},
                      time.perf_counter() - started)
    accelerator.print(format_table(rows))
    accelerator.print(f"sweep of {len(runs)} variants in {time.perf_counter() - started:.1f} s: "
                      f"{run_dir / 'sweep.csv'}, sweep.json, sweep_val_loss.png")
    accelerator.end_training()
    return rows


def _sweep_epochs(runs: list[_Run], groups: list[_Group], source, settings: dict, steps_per_epoch: int,
                  thresholds: list[float], val_batches: list, frozen: dict, reader, accelerator, pool,
                  max_steps: int | None) -> None:
    """The training loop (`fit`): every batch steps every variant on the batch's pair weights, computed
    once per threshold (each group of `groups` as one, see `_stacked_step`); after each epoch each
    variant is validated and its head and metrics are written."""
    state = TrainState()  # not checkpointed: a sweep cannot be resumed

    def each(work) -> list:
        return _each_variant(pool, runs, work)

    def step(hb: HeadBatch) -> StepLosses:
        hb = step_input(hb, accelerator.device)
        pairs = {tau: pair_weights(hb, tau) for tau in thresholds}
        if any(group.stacked is not None for group in groups):
            return _stacked_step(accelerator, runs, groups, hb, pairs, settings["grad_clip"], pool)
        return head_step(accelerator, runs, hb, settings["grad_clip"], each=each,
                         predict=lambda run, batch: run.model(batch, pairs[run.module.assignment_threshold]))

    def end_epoch(stats: EpochStats) -> None:
        for run, values in zip(runs, stats.step_losses()):
            run.step_losses.extend(values)
        vals = each(lambda run: evaluate_batches(run.model, val_batches, accelerator))
        for i, (run, val) in enumerate(zip(runs, vals)):
            last = {"epoch": state.epoch, "step": state.global_step, "train_loss": stats.train_loss(i),
                    "events_per_s": stats.events_per_s, "lr": run.scheduler.get_last_lr()[0], **val, **frozen}
            run.history.append(last)
            accelerator.print(f"epoch {state.epoch + int(stats.stopped)} {run.variant.name}: "
                              f"train {last['train_loss']:.4f} val {last['val_loss']:.4f}")
            MetricsLog(run.run_dir, accelerator, run.variant.name, {}, track=False).write(run.history)
            if accelerator.is_main_process:
                save_head_files(run.run_dir, run.module, run.variant.config, reader.fingerprint, last, None)

    fit(accelerator, state, runs, source.batches, step, end_epoch, epochs=settings["epochs"],
        steps_per_epoch=steps_per_epoch, events_of=lambda hb: hb.num_events, max_steps=max_steps)


def _stacked_step(accelerator, runs: list[_Run], groups: list[_Group], hb: HeadBatch, pairs: dict,
                  grad_clip: float, pool) -> StepLosses:
    """`head_step` of every run with the groups' forward and backward stacked: a group of K >= 2 predicts
    [K, Q, T] with its `StackedHeads` (under the accelerator's autocast, as a prepared model's forward),
    takes each variant's own loss, backpropagates their sum (the variants share no parameter, so each
    gets its own gradient) and updates each variant as `optimizer_step` does (`optimizer_update`:
    clipping, AdamW, schedule); a group of one steps as in `head_step`. All under one
    `accelerator.accumulate`, groups on the pool's threads. Returns the losses in run order."""
    def one(group: _Group) -> list[Tensor]:
        shared = pairs[group.runs[0].module.assignment_threshold]
        if group.stacked is None:
            run = group.runs[0]
            loss = global_mean_loss(run.module.loss(run.model(hb, shared), hb), hb, accelerator)
            optimizer_step(accelerator, run.model, loss, run.optimizer, run.scheduler, grad_clip)
            return [loss.detach()]
        with accelerator.autocast():
            pred = group.stacked.predict_from_pairs(hb, shared)
        losses = [global_mean_loss(run.module.loss(pred[k], hb), hb, accelerator) for k, run in enumerate(group.runs)]
        accelerator.backward(torch.stack(losses).sum())
        for run in group.runs:
            optimizer_update(accelerator, run.model, run.optimizer, run.scheduler, grad_clip)
        return [loss.detach() for loss in losses]

    with accelerator.accumulate(*[run.model for run in runs]):
        per_group = _each_variant(pool, groups, one)
    by_run = {id(run): loss for group, losses in zip(groups, per_group) for run, loss in zip(group.runs, losses)}
    losses = torch.stack([by_run[id(run)] for run in runs])
    return StepLosses(accelerator.gather(losses[None]).mean(0))


def _build_run(variant: Variant, reader, first: HeadBatch, total_steps: int, accelerator, run_dir: Path) -> _Run:
    """A variant's head, optimizer and schedule, built and prepared exactly as `train(...)` does."""
    from cachefeat.training.train import ALLOWED, DEFAULTS

    own = section(variant.config, "train", DEFAULTS, ALLOWED)
    head = build_head(variant.config, list(reader.raw_fields), list(reader.particle_fields), seed=own["seed"])
    if head.impl != "sparse":
        raise UserError("sweep trains the sparse head: set head.init_args.impl to sparse")
    check_floor(head, reader, f"variant {variant.name}: ")
    head.fit_scaling(first.targets, first.target_valid, first)
    trainee = prepare_trainee(accelerator, VariantHead(head), own["lr"], own["weight_decay"], total_steps, head)
    return _Run(trainee.model, trainee.module, trainee.optimizer, trainee.scheduler, variant,
                Path(run_dir) / variant.name)


def _worker_count(requested: int | None, num_variants: int, accelerator) -> int:
    """Threads that step the variants: 1 on CUDA and under several processes, else `requested`
    (default torch's intra-op thread count), at most one per variant."""
    if requested is not None and requested < 1:
        raise UserError(f"--workers must be at least 1, got {requested}")
    if accelerator.num_processes > 1 or accelerator.device.type != "cpu":
        return 1
    return max(1, min(requested or torch.get_num_threads(), num_variants))


@contextmanager
def _variant_pool(workers: int):
    """A thread pool of `workers` threads sharing torch's intra-op threads equally (None for 1 worker);
    torch's thread count is restored afterwards."""
    if workers == 1:
        yield None
        return
    threads = torch.get_num_threads()
    share = max(1, threads // workers)
    torch.set_num_threads(share)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="sweep",
                                initializer=torch.set_num_threads, initargs=(share,)) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def _each_variant(pool, items: list, work) -> list:
    """work(item) for every item (runs, or `_Group`s), on the pool's threads when there is a pool; results
    in item order. The host seconds of each call are added to its run's `seconds` (a group's split
    equally among its runs)."""
    def timed(item):
        start = time.perf_counter()
        try:
            return work(item)
        finally:
            members = item.runs if isinstance(item, _Group) else [item]
            for run in members:
                run.seconds += (time.perf_counter() - start) / len(members)

    if pool is None:
        return [timed(item) for item in items]
    return list(pool.map(timed, items))


def results_table(runs: list[_Run], settings: dict) -> list[dict]:
    """One row per variant, best first by settings["metric"] (each variant's best epoch; NaN ranks last)."""
    metric, sign = settings["metric"], 1.0 if settings["mode"] == "min" else -1.0
    swept = list(dict.fromkeys(k for run in runs for k in run.variant.overrides))
    rows = []
    for run in runs:
        history = run.history
        scores = [sign * h[metric] if math.isfinite(h[metric]) else math.inf for h in history]
        best = min(range(len(history)), key=scores.__getitem__)
        row = {"variant": run.variant.name}
        row.update({key.rsplit(".", 1)[-1]: run.variant.value(key) for key in swept})
        row[f"best_{metric}"] = history[best][metric]
        row["best_epoch"] = history[best]["epoch"]
        row["best_val_loss"] = min(h["val_loss"] for h in history)
        for target in run.module.target_fields:
            for suffix in ("rel_res68", "accuracy", "res68", "rmse"):
                key = f"val_{target}_{suffix}"
                if key in history[best]:
                    row[key] = history[best][key]
                    break
        row.update(epochs=history[-1]["epoch"], steps=history[-1]["step"], train_s=run.seconds)
        rows.append((scores[best], row))
    rows.sort(key=lambda item: item[0])
    return [row for _, row in rows]


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (numbers to 4 significant digits)."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [keys] + [[_cell(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in cells)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_results(run_dir: Path, rows: list[dict], runs: list[_Run], settings: dict, shared: dict,
                  wall_s: float) -> None:
    """RUN_DIR/sweep.csv (the rows), sweep.json (rows, settings, per-variant histories) and sweep_val_loss.png."""
    with open(run_dir / "sweep.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    payload = {
        "metric": settings["metric"], "mode": settings["mode"], "wall_s": wall_s, "shared": shared,
        "rows": rows,
        "variants": {run.variant.name: {"overrides": run.variant.overrides, "step_losses": run.step_losses,
                                        "history": run.history} for run in runs},
    }
    (run_dir / "sweep.json").write_text(json.dumps(payload, indent=1, default=str))
    plot_val_loss(runs, run_dir / "sweep_val_loss.png")


def plot_val_loss(runs: list[_Run], path: Path) -> None:
    """Validation loss per epoch, one line per variant (skipped with a warning without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install 'cachefeat[plot]')", path.name)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for run in runs:
        epochs = range(1, len(run.history) + 1)
        ax.plot(epochs, [h["val_loss"] for h in run.history], marker="o", markersize=3, label=run.variant.name)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel("validation loss")
    ax.set_title(f"sweep: {len(runs)} variants")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(runs) > 8 else 1)
    fig.savefig(path, dpi=120)
    plt.close(fig)
