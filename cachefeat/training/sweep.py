"""Hyper-parameter sweeps: train a grid of regression-head variants in one pass over the cache.

A `sweep` block in the config lists the variants, as a grid (cartesian product, in key order)
and/or an explicit list, each a set of dotted overrides of the base config::

    sweep:
      metric: val_loss          # the per-epoch metric the results are ranked by (default val_loss)
      mode: min                 # min (default) or max, e.g. for val_q_accuracy
      grid: {head.init_args.hidden_dim: [64, 120], head.init_args.dropout: [0.0, 0.1], train.lr: [1.0e-3, 3.0e-3]}
      variants: [{name: deep, head.init_args.num_layers: 4}]

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
Variants are not stacked into batched kernels: on CPU a stacked [P, K*D] pool streams through
main memory where K separate [P, D] pools stay in cache, and measured no faster.

In one CPU process the variants' steps (and validations) run on `workers` threads, each with
an equal share of torch's intra-op threads (default: one worker per torch thread, at most one per
variant). Under `accelerate launch` every variant is data-parallel over the same processes (each
prepared with the one Accelerator) and the variants step one after another, so that every rank
issues its collectives in the same order.

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
from tqdm import tqdm

from cachefeat.config import did_you_mean, one_of, section
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch
from cachefeat.head.regression import FRAMES, PairWeights, pair_weights

log = logging.getLogger(__name__)

# key -> (type, check, what the check requires)
SWEEP_KEYS = {
    "head.init_args.hidden_dim": (int, lambda v: v >= 1, ">= 1"),
    "head.init_args.num_layers": (int, lambda v: v >= 1, ">= 1"),
    "head.init_args.dropout": (float, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "head.init_args.assignment_threshold": (float, lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    "head.init_args.frame": (str, lambda v: v in FRAMES, f"one of {', '.join(FRAMES)}"),
    "train.lr": (float, lambda v: v > 0.0, "> 0"),
    "train.weight_decay": (float, lambda v: v >= 0.0, ">= 0"),
    "train.seed": (int, lambda v: v >= 0, ">= 0"),
}
SWEEP_DEFAULTS = {"metric": "val_loss", "mode": "min", "grid": {}, "variants": []}
SWEEP_ALLOWED = {"mode": one_of("min", "max")}
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
    settings = section(config, "sweep", SWEEP_DEFAULTS, SWEEP_ALLOWED)
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
    kind, check, requirement = SWEEP_KEYS[key]
    if kind is str:
        if not isinstance(value, str) or not check(value):
            raise UserError(f"{where}: {key} must be {requirement}, not {value!r}")
        return value
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not isinstance(value, int):
        ok_type = False
    if not ok_type or not check(kind(value)):
        raise UserError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'} {requirement}, "
                        f"not {value!r}")
    return kind(value)


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
class _Run:
    """A variant being trained: its prepared model, optimizer and schedule, and history."""

    variant: Variant
    head: nn.Module
    model: nn.Module
    optimizer: object
    scheduler: object
    run_dir: Path
    seconds: float = 0.0
    step_losses: list = field(default_factory=list)
    history: list = field(default_factory=list)


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
    from cachefeat.training.accel import make_accelerator
    from cachefeat.training.sources import CacheMemorySource, CacheStreamSource, cache_fits_memory
    from cachefeat.training.train import (
        ALLOWED,
        DEFAULTS,
        SCALING_EVENTS,
        check_cache,
        evaluate_batches,
        validation_batches,
    )

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
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)

    reader, val_reader = CacheReader(cache), CacheReader(val_cache)
    check_cache(reader, config, checkpoint_sha256=None, input_hash=None, allow_stale=allow_stale, what="cache")
    check_cache(val_reader, config, checkpoint_sha256=reader.fingerprint.get("checkpoint_sha256"),
                input_hash=None, allow_stale=allow_stale, what="validation cache")
    if data_mode == "auto":
        data_mode = "memory" if cache_fits_memory(reader, settings["memory_budget_mb"]) else "stream"
    if data_mode == "memory":
        source = CacheMemorySource(reader, settings["batch_size"], settings["seed"], rank, world, accelerator.device)
    elif data_mode == "stream":
        source = CacheStreamSource(reader, settings["batch_size"], settings["seed"], rank, world)
    else:
        raise UserError(f"--data must be auto, memory or stream, not {data_mode!r}")
    steps_per_epoch = source.num_batches(0)
    if steps_per_epoch == 0:
        raise UserError(f"fewer training events than one global batch of {settings['batch_size'] * world}")
    total_steps = sum(source.num_batches(e) for e in range(settings["epochs"]))
    total_steps //= settings["gradient_accumulation_steps"]
    val_resident = val_reader.load(accelerator.device)
    val_batches = [val_resident.batch(idx).float() for idx in
                   validation_batches(val_reader.num_events, settings["batch_size"], rank, world)]
    del val_resident
    first = reader.read_events(0, min(reader.num_events, SCALING_EVENTS))
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
    thresholds = sorted({run.head.assignment_threshold for run in runs})
    workers = _worker_count(workers, len(runs), accelerator)
    accelerator.print(f"sweep: {len(runs)} variants over {reader.num_events:,} training events "
                      f"({data_mode}), {len(thresholds)} assignment threshold(s), {workers} worker thread(s)")
    with _variant_pool(workers) as pool:
        _sweep_epochs(runs, source, settings, steps_per_epoch, thresholds, val_batches, frozen, reader, accelerator,
                      pool, max_steps, world)
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


def _sweep_epochs(runs: list[_Run], source, settings: dict, steps_per_epoch: int, thresholds: list[float],
                  val_batches: list, frozen: dict, reader, accelerator, pool, max_steps: int | None,
                  world: int) -> None:
    """The training loop: every batch steps every variant; after each epoch each variant is validated
    and its head and metrics are written."""
    from cachefeat.training.accel import MetricsLog
    from cachefeat.training.train import evaluate_batches, save_head_files

    epoch, global_step, done = 0, 0, False
    while epoch < settings["epochs"] and not done:
        start = time.perf_counter()
        n_events = 0
        loss_sums = [0.0] * len(runs)
        n_steps = 0
        for run in runs:
            run.model.train()
        bar = tqdm(total=steps_per_epoch, unit="batch", leave=False, desc=f"epoch {epoch + 1}/{settings['epochs']}",
                   disable=not accelerator.is_local_main_process)
        for hb in source.batches(epoch):
            hb = hb.to(accelerator.device).float().with_valid_targets_only()  # all the loss reads
            step_losses = _train_step(runs, hb, thresholds, accelerator, settings["grad_clip"], pool)
            for i, (run, value) in enumerate(zip(runs, step_losses)):
                run.step_losses.append(value)
                loss_sums[i] += value
            if accelerator.sync_gradients:
                global_step += 1
            n_steps += 1
            n_events += hb.num_events * world
            bar.update(1)
            bar.set_postfix(best_loss=f"{min(loss_sums) / n_steps:.4f}",
                            ev_s=f"{n_events / (time.perf_counter() - start):.0f}")
            if max_steps is not None and global_step >= max_steps:
                done = True
                break
        bar.close()
        elapsed = time.perf_counter() - start
        if not done:
            epoch += 1
        vals = _each_variant(pool, runs, lambda run: evaluate_batches(run.model, val_batches, accelerator))
        for i, (run, val) in enumerate(zip(runs, vals)):
            last = {"epoch": epoch, "step": global_step, "train_loss": loss_sums[i] / max(n_steps, 1),
                    "events_per_s": n_events / max(elapsed, 1e-9), "lr": run.scheduler.get_last_lr()[0],
                    **val, **frozen}
            run.history.append(last)
            accelerator.print(f"epoch {epoch + int(done)} {run.variant.name}: train {last['train_loss']:.4f} "
                              f"val {last['val_loss']:.4f}")
            MetricsLog(run.run_dir, accelerator, run.variant.name, {}, track=False).write(run.history)
            if accelerator.is_main_process:
                save_head_files(run.run_dir, run.head, run.variant.config, reader.fingerprint, last, None)


def _build_run(variant: Variant, reader, first: HeadBatch, total_steps: int, accelerator, run_dir: Path) -> _Run:
    """A variant's head, optimizer and schedule, built and prepared exactly as `train(...)` does."""
    from cachefeat.training.accel import adamw
    from cachefeat.training.train import ALLOWED, DEFAULTS, build_head

    own = section(variant.config, "train", DEFAULTS, ALLOWED)
    head = build_head(variant.config, list(reader.raw_fields), list(reader.particle_fields), seed=own["seed"])
    if head.impl != "sparse":
        raise UserError("sweep trains the sparse head: set head.init_args.impl to sparse")
    floor = float(reader.settings.get("floor", 0.0))
    if head.assignment_threshold < floor:
        raise UserError(f"variant {variant.name}: head.assignment_threshold {head.assignment_threshold} is "
                        f"below the cache floor {floor}: pairs between them were not stored")
    head.fit_scaling(first.targets, first.target_valid, first)
    optimizer = adamw(head.parameters(), own["lr"], own["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=own["lr"], total_steps=max(total_steps, 1) + 1)
    model, optimizer = accelerator.prepare(VariantHead(head), optimizer)  # the scheduler stays out, as in train
    return _Run(variant, head, model, optimizer, scheduler, Path(run_dir) / variant.name)


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


def _each_variant(pool, runs: list[_Run], work) -> list:
    """work(run) for every run, on the pool's threads when there is a pool; results in run order.
    The host seconds of each call are added to its run's `seconds`."""
    def timed(run):
        start = time.perf_counter()
        try:
            return work(run)
        finally:
            run.seconds += time.perf_counter() - start

    if pool is None:
        return [timed(run) for run in runs]
    return list(pool.map(timed, runs))


def _train_step(runs: list[_Run], hb: HeadBatch, thresholds: list[float], accelerator, grad_clip: float,
                pool) -> list:
    """One optimizer step of every variant on the batch `hb`; returns their losses (mean over ranks)."""
    from cachefeat.training.accel import optimizer_step
    from cachefeat.training.train import global_mean_loss

    pairs = {tau: pair_weights(hb, tau) for tau in thresholds}

    def step(run: _Run) -> Tensor:
        pred = run.model(hb, pairs[run.head.assignment_threshold])
        loss = global_mean_loss(run.head.loss(pred, hb), hb, accelerator)
        optimizer_step(accelerator, run.model, loss, run.optimizer, run.scheduler, grad_clip)
        return loss.detach()

    with accelerator.accumulate(*[run.model for run in runs]):
        losses = _each_variant(pool, runs, step)
    return accelerator.gather(torch.stack(losses)[None]).mean(0).tolist()


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
        for target in run.head.target_fields:
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
