"""Benchmark harness: settings, shared data, the training modes as timed step loops, peak memory
and the results files. Used by `benchmarks/test_bench_*.py` through `benchmarks/conftest.py`.

Every mode runs the production code: the sources of `cachefeat.training.sources`, the head of
`head.checkpoint.build_head`, and the setup and step of `cachefeat.training.loop` that `train.py`
(head modes: `prepare_trainee`, `head_step`) and `pretrain.py` (the joint baseline, `Stage1Step`
through `train_step`) run.

Run as a script it is the entry point whose peak resident memory is measured:
    python benchmarks/harness.py probe MODE SETTINGS_JSON DATA_DIR STEPS
starts `python benchmarks/harness.py worker ...` (the training mode, STEPS optimizer steps) and
prints one JSON line with the child's `ru_maxrss` (RUSAGE_CHILDREN; this process has no other child).

Environment: CACHEFEAT_BENCH_DEVICE (cpu | cuda, default cpu), CACHEFEAT_BENCH_SCALE (multiplies
the event counts, default 1), CACHEFEAT_BENCH_BATCH (training batch size; default 256, the batch of
every reference run, whatever the config's train.batch_size), CACHEFEAT_BENCH_THREADS (torch
intra-op threads; default 1 on cpu, 0 = torch's default on cuda), CACHEFEAT_BENCH_RESULTS (results folder, default
benchmarks/results), CACHEFEAT_BENCH_DATA (data folder, default benchmarks/.data),
CACHEFEAT_BENCH_ROUNDS (timed rounds of every timing, at least 3; default 3 for joint training,
5 for the others: a budget knob for the TrackML set on a CPU, where one live round is minutes).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
REFERENCE_BATCH = 256
MODES = ("joint", "live_frozen_dense", "live_frozen_sparse", "cached_stream", "cached_memory")
DTYPES = ("float32", "float16")
REQUIRED_KEYS = (
    "train_events_per_s", "speedup_cached_memory_vs_live_frozen", "speedup_cached_stream_vs_live_frozen",
    "speedup_live_frozen_vs_joint", "extract_events_per_s", "forward_events_per_s", "extract_vs_forward",
    "cache_bytes_per_event", "dense_bytes_per_event", "cache_read_gbps", "memcpy_gbps", "peak_rss_mb",
    "breakeven_epochs", "machine",
)
# Issue targets on the 2-core CPU (muon): (summary value, comparison, threshold).
TARGETS = {
    "cached memory / live frozen dense": ("speedup_cached_memory_vs_live_frozen", ">=", 50.0),
    "cached stream / live frozen dense": ("speedup_cached_stream_vs_live_frozen", ">=", 20.0),
    "extraction / pure forward": ("extract_vs_forward", ">=", 0.97),
    "extraction host time beyond the forward (ms/event)": ("extract_host_ms_per_event", "<=", 0.15),
    "cache / dense f32 (float32 embeddings)": ("cache_over_dense.float32", "<=", 0.30),
    "cache / dense f32 (float16 embeddings)": ("cache_over_dense.float16", "<=", 0.18),
    "cache read / memcpy, alternating rounds": ("cache_read_vs_memcpy_alternating", ">=", 0.5),
    "streamed read (pooled buffers) / memcpy, alternating rounds": ("stream_read_vs_memcpy_alternating", ">=", 0.5),
    "cached stream / cached memory, alternating rounds": ("cached_stream_vs_memory", ">=", 0.9),
    "cache read from xrootd / raw xrootd read": ("remote_read_vs_raw.xrootd", ">=", 0.5),
    "sweep K=8 vs 8 separate cached runs": ("sweep_k8_vs_separate", ">=", 2.6),
    "sweep K=8 vs 8 live frozen runs": ("sweep_k8_vs_live", ">=", 100.0),
    # issue 11, when hepattn is importable (None otherwise): its generated events, then simulated ones
    "hepattn extraction / hepattn's frozen forward": ("hepattn_extract_vs_forward", ">=", 0.85),
    "hepattn extraction / forward, model build excluded": (
        "hepattn.extract_vs_forward_without_model_build", ">=", 0.85),
    "hepattn cached memory / live stage 2": ("hepattn_speedup_cached_memory_vs_live", ">=", 50.0),
    "hepattn, simulated events: extraction / forward": ("hepattn_sim_extract_vs_forward", ">=", 0.85),
    "hepattn, simulated events: cached memory / live": ("hepattn_sim_speedup_cached_memory_vs_live", ">=", 50.0),
}
# TrackML scale (`test_bench_trackml.py`; no dense head there), its targets and its required keys.
TRACKML_MODES = ("live_frozen_sparse", "cached_stream", "cached_memory")
TRACKML_TARGETS = {
    "cache / dense f32 (float32 embeddings)": ("cache_over_dense.float32", "<=", 0.15),
    "cache / dense f32 (float16 embeddings)": ("cache_over_dense.float16", "<=", 0.10),
    "cache read / memcpy, alternating rounds": ("cache_read_vs_memcpy", ">=", 0.5),
    "streamed read (pooled buffers) / memcpy, alternating rounds": ("stream_read_vs_memcpy", ">=", 0.5),
}
TRACKML_REQUIRED_KEYS = (
    "train_events_per_s", "extract_events_per_s", "forward_events_per_s", "cache_bytes_per_event",
    "dense_bytes_per_event", "peak_rss_mb", "machine",
)
MODE_LABELS = {
    "joint": "joint (backbone + head)",
    "live_frozen_dense": "live frozen, dense head",
    "live_frozen_sparse": "live frozen, sparse head",
    "cached_stream": "cached, streamed",
    "cached_memory": "cached, in memory",
}

log = logging.getLogger("cachefeat.benchmarks")


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark set runs on (event counts in events).

    `joint_steps` / `live_steps`: optimizer steps per timed round of joint training and of the live
    frozen modes; cached modes time one epoch (`n_train // batch_size` steps, at least 8) per round.
    `*_rounds`: timed rounds (after one warm-up round); `timing_rounds` for extraction and forward.
    `threads`: torch intra-op threads of every measured process (0: torch's default). Extraction
    and caches use the config's `extract` options (block size included).
    """

    name: str
    config: str
    checkpoint: str
    preset: str
    n_train: int
    n_val: int
    n_extract: int
    batch_size: int
    seed: int
    device: str
    threads: int
    joint_steps: int
    joint_rounds: int
    live_steps: int
    live_rounds: int
    cached_rounds: int
    timing_rounds: int
    rss_steps: int
    target_val_loss: float
    max_epochs: int

    def data_key(self) -> str:
        """Hash of everything that determines the data folder's content, and of the cachefeat version,
        cache format and the arrays stored without Blosc (a data folder of another layout is rebuilt,
        not refused or measured as if it were this one)."""
        import cachefeat
        from cachefeat.cache.schema import FORMAT_VERSION, RAW_KEYS

        fields = {k: v for k, v in asdict(self).items()
                  if k in ("name", "config", "preset", "n_train", "n_val", "n_extract", "seed", "device")}
        fields["checkpoint_sha256"] = _file_sha256(ROOT / self.checkpoint)
        fields["config_sha256"] = _file_sha256(ROOT / self.config)
        fields["cachefeat"] = cachefeat.__version__
        fields["cache_format"] = FORMAT_VERSION
        fields["raw_arrays"] = sorted(RAW_KEYS)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def load_config(self) -> dict:
        from cachefeat.config import load_config

        return load_config(ROOT / self.config)

    @property
    def epoch_steps(self) -> int:
        return max(self.n_train // self.batch_size, 8)

    def plan(self, mode: str) -> tuple[int, int]:
        """(optimizer steps per timed round, rounds) of a training mode."""
        if mode == "joint":
            return self.joint_steps, self.joint_rounds
        if mode.startswith("live"):
            return self.live_steps, self.live_rounds
        return self.epoch_steps, self.cached_rounds


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def settings_from_env(name: str = "muon") -> BenchSettings:
    """The settings of the `muon` (default) or `trackml` set, scaled by the environment (see the module docs)."""
    from cachefeat.errors import UserError

    device = os.environ.get("CACHEFEAT_BENCH_DEVICE", "cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"CACHEFEAT_BENCH_DEVICE must be cpu or cuda, not {device!r}")
    try:
        scale = float(os.environ.get("CACHEFEAT_BENCH_SCALE", "1"))
    except ValueError:
        raise UserError("CACHEFEAT_BENCH_SCALE must be a number") from None
    gpu = device == "cuda"
    if name == "muon":
        base = dict(config="configs/muon.yaml", checkpoint="data/muon_stage1.ckpt", preset="muon",
                    n_train=2048, n_val=256, n_extract=2048, target_val_loss=0.26, max_epochs=10)
    elif name == "trackml":
        checkpoint = os.environ.get("CACHEFEAT_BENCH_TRACKML_CHECKPOINT", "")
        base = dict(config="configs/trackml.yaml", checkpoint=checkpoint, preset="trackml",
                    n_train=32, n_val=8, n_extract=8, target_val_loss=0.5, max_epochs=5)
    else:
        raise UserError(f"unknown benchmark set {name!r} (muon or trackml)")
    try:
        batch = int(os.environ.get("CACHEFEAT_BENCH_BATCH") or REFERENCE_BATCH)
        threads = int(os.environ.get("CACHEFEAT_BENCH_THREADS") or (0 if gpu else 1))
        rounds = int(os.environ.get("CACHEFEAT_BENCH_ROUNDS") or 0)
    except ValueError:
        raise UserError("CACHEFEAT_BENCH_BATCH, CACHEFEAT_BENCH_THREADS and CACHEFEAT_BENCH_ROUNDS must be "
                        "integers") from None
    if scale <= 0 or batch < 1 or threads < 0 or (rounds and rounds < 3):
        raise UserError("CACHEFEAT_BENCH_SCALE must be > 0, CACHEFEAT_BENCH_BATCH >= 1, CACHEFEAT_BENCH_THREADS >= 0, "
                        "CACHEFEAT_BENCH_ROUNDS >= 3")
    return BenchSettings(
        name=name, config=base["config"], checkpoint=base["checkpoint"], preset=base["preset"],
        n_train=max(round(base["n_train"] * scale), batch), n_val=max(round(base["n_val"] * scale), 1),
        n_extract=max(round(base["n_extract"] * scale), 1), batch_size=batch, seed=1, device=device,
        threads=threads, joint_steps=4 if gpu else 1, joint_rounds=rounds or 3, live_steps=8 if gpu else 1,
        live_rounds=rounds or 5, cached_rounds=rounds or 5, timing_rounds=rounds or 5, rss_steps=1,
        target_val_loss=base["target_val_loss"],
        max_epochs=base["max_epochs"],
    )


def apply_threads(settings: BenchSettings) -> None:
    """Set torch's intra-op threads for this process (no-op for 0).

    On a shared CPU, two intra-op threads wait for each other at every parallel region while the
    other tenants hold the cores; one thread per process measured 2-40x faster and far steadier here.
    """
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)


def results_dir() -> Path:
    return Path(os.environ.get("CACHEFEAT_BENCH_RESULTS") or HERE / "results")


def data_root() -> Path:
    return Path(os.environ.get("CACHEFEAT_BENCH_DATA") or HERE / ".data")


# --- shared data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchData:
    """The data folder of one settings key: simulated events and their caches.

    train/val/extract_input: HDF5 event files (n_train, n_val, n_extract events).
    caches: training-set cache by embedding dtype ("float32", "float16"); val_cache: float32.
    build_s: seconds spent building the folder in this process (0.0 when it was reused).
    """

    root: Path
    build_s: float

    @property
    def train(self) -> Path:
        return self.root / "train.h5"

    @property
    def val(self) -> Path:
        return self.root / "val.h5"

    @property
    def extract_input(self) -> Path:
        return self.root / "extract.h5"

    @property
    def caches(self) -> dict[str, Path]:
        return {dtype: self.root / f"train-{dtype}.zarr" for dtype in DTYPES}

    @property
    def val_cache(self) -> Path:
        return self.root / "val-float32.zarr"


def prepare_data(settings: BenchSettings, base: Path | None = None) -> BenchData:
    """Simulate the events and extract their caches into `base/<settings.data_key()>`, unless done before.

    Built in a temporary sibling folder and renamed at the end, so an interrupted build is redone.
    """
    from cachefeat.cache.extract import extract
    from cachefeat.data.presets import get_preset
    from cachefeat.data.simulate import write_event_file

    base = Path(base or data_root())
    final = base / settings.data_key()
    if (final / "settings.json").is_file():
        return BenchData(final, 0.0)
    started = time.perf_counter()
    tmp = base / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    draft = BenchData(tmp, 0.0)
    preset = get_preset(settings.preset)
    for path, n, seed in ((draft.train, settings.n_train, settings.seed),
                          (draft.val, settings.n_val, settings.seed + 1),
                          (draft.extract_input, settings.n_extract, settings.seed + 2)):
        write_event_file(path, preset, n, seed)
    config = settings.load_config()
    jobs = [(draft.train, draft.caches[d], d) for d in DTYPES] + [(draft.val, draft.val_cache, "float32")]
    timings = {}
    for events, cache, dtype in jobs:
        log.info("benchmark data: extracting %s (%s)", events.name, dtype)
        summary = extract(config, ROOT / settings.checkpoint, events, cache, dtype=dtype, device=settings.device,
                          progress=False)
        timings[cache.name] = summary["seconds"]
    build_s = time.perf_counter() - started
    (tmp / "settings.json").write_text(json.dumps({**asdict(settings), "extract_seconds": timings,
                                                   "build_s": build_s}, indent=1))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
    return BenchData(final, build_s)


# --- training modes --------------------------------------------------------------------------


def sync(device: str) -> None:
    """Wait for queued device work (timings on CUDA)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class TrainLoop:
    """One training mode as a loop of optimizer steps over endless epochs of its batches.

    `run(steps)` does `steps` optimizer steps and returns the number of training events used.
    """

    def __init__(self, step, batches, events_per_batch, device: str, closers=()):
        self._step, self._batches = step, batches
        self._events = events_per_batch
        self.device = device
        self._closers = list(closers)

    def run(self, steps: int) -> int:
        n = 0
        for _ in range(steps):
            item = next(self._batches)
            self._step(item)
            n += self._events(item)
        sync(self.device)
        return n

    def close(self) -> None:
        self._batches.close()
        for close in self._closers:
            close()


def _endless(batches_of_epoch):
    for epoch in itertools.count():
        yield from batches_of_epoch(epoch)


def timed_training(benchmark, mode: str, settings: BenchSettings,
                   data: BenchData) -> tuple[int, int, int, float | None]:
    """(steps, rounds, events per round, events/s) of `mode`'s loop timed by pytest-benchmark:
    `settings.plan(mode)` rounds of steps after a warm-up round; events/s from the median round
    (None when benchmarks are disabled)."""
    steps, rounds = settings.plan(mode)
    loop = build_loop(mode, settings, data)
    try:
        events = benchmark.pedantic(loop.run, args=(steps,), rounds=rounds, warmup_rounds=1, iterations=1)
    finally:
        loop.close()
    return steps, rounds, events, (events / benchmark.stats.stats.median if benchmark.stats else None)


def build_loop(mode: str, settings: BenchSettings, data: BenchData) -> TrainLoop:
    """The training loop of `mode` (one of MODES) on the benchmark's training events: `loop.head_step`,
    the step of `train.py`, over the mode's source."""
    if mode == "joint":
        return _joint_loop(settings, data)
    from cachefeat.training.loop import head_step, step_input

    h = _head_setup(mode, settings, data)

    def step(hb) -> None:
        head_step(h.accelerator, [h.trainee], step_input(hb, h.device), h.grad_clip)

    return TrainLoop(step, _endless(h.source.batches), lambda hb: hb.num_events, settings.device, h.closers)


@dataclass
class HeadSetup:
    """What a head mode's loop steps with: the accelerator, the prepared trainee, the batch source,
    the device, train.grad_clip, and what to close at the end."""

    accelerator: object
    trainee: object
    source: object
    device: object
    grad_clip: float
    closers: list


def _head_setup(mode: str, settings: BenchSettings, data: BenchData) -> HeadSetup:
    """train.py's setup for a head mode (not joint): the head built and its scaling fitted as train
    does, AdamW + OneCycle prepared (`loop.prepare_trainee`), in train mode, over the mode's source."""
    if mode not in MODES or mode == "joint":
        raise ValueError(f"mode must be one of {MODES[1:]}, not {mode!r}")
    from cachefeat.cache.reader import CacheReader
    from cachefeat.config import section
    from cachefeat.head.checkpoint import build_head
    from cachefeat.training.loop import make_accelerator, prepare_trainee, scaling_batch
    from cachefeat.training.sources import CacheMemorySource, CacheStreamSource, LiveSource
    from cachefeat.training.train import DEFAULTS

    config = settings.load_config()
    train_settings = section(config, "train", DEFAULTS)
    B, seed = settings.batch_size, settings.seed
    accelerator = make_accelerator(data.root / "run", device=settings.device)
    device = accelerator.device
    reader = CacheReader(data.caches["float32"])
    closers = []
    if mode.startswith("cached"):
        head = build_head(config, list(reader.raw_fields), list(reader.particle_fields), "sparse", seed)
        if mode == "cached_memory":
            source = CacheMemorySource(reader, B, seed, 0, 1, device)
        else:
            source = CacheStreamSource(reader, B, seed, 0, 1)
    else:
        from cachefeat.cache.frozen import FrozenBackbone
        from cachefeat.data.events import EventFile

        dense = mode == "live_frozen_dense"
        fields = config["data"]
        head = build_head(config, list(fields["hit_fields"]), list(fields["particle_fields"]),
                          "dense" if dense else "sparse", seed)
        frozen = FrozenBackbone(config, ROOT / settings.checkpoint, device=device)
        events = EventFile(data.train, fields["hit_fields"], fields["particle_fields"], fields.get("max_hits"))
        closers.append(events.close)
        source = LiveSource(frozen, events, B, seed, 0, 1, head.assignment_threshold, device,
                            keep_hits="all" if dense else "assigned")
    first = scaling_batch(reader)  # train.py's scaling (cache event i is input event i)
    head.fit_scaling(first.targets, first.target_valid, first)
    trainee = prepare_trainee(accelerator, head, train_settings["lr"], train_settings["weight_decay"], 10**7)
    trainee.model.train()
    return HeadSetup(accelerator, trainee, source, device, train_settings["grad_clip"], closers)


STEP_PHASES = ("batch", "to_device", "forward", "loss", "backward", "update")


def step_breakdown(settings: BenchSettings, data: BenchData, steps: int = 48, warmup: int = 8) -> dict:
    """Where a cached step's time goes: the step of `loop.head_step` on the resident float32 cache,
    split at its phase boundaries with the device synchronised after each (STEP_PHASES: the batch's
    gather from the resident cache, `step_input`, the head's forward, its loss, the backward, and
    `loop.optimizer_update`: clipping, AdamW, the schedule, zeroing), next to the production step
    itself (`head_step`, synchronised once at the end) over the same batches from a second, identical
    setup. Each side runs `warmup` steps, then `steps` timed ones.

    Returns {"ms": {phase: median ms per step}, "phases_sum_ms", "step_ms" (the production step's
    mean ms per step), "steps", "max_loss_difference" (largest |loss| difference between the split
    and the production steps, relative: 0 on the CPU, where both run the same ops on the same
    tensors; the caller asserts it, so the breakdown is known to time the production computation)}.
    """
    from cachefeat.training.loop import global_mean_loss, head_step, optimizer_update, step_input

    split, production = (_head_setup("cached_memory", settings, data) for _ in range(2))

    def phased(h: HeadSetup, batches, timed: dict) -> float:
        t = h.trainee
        marks = [time.perf_counter()]

        def mark() -> None:
            sync(settings.device)
            marks.append(time.perf_counter())

        with h.accelerator.accumulate(t.model):
            hb = next(batches)
            mark()
            hb = step_input(hb, h.device)
            mark()
            predicted = t.model(hb)
            mark()
            loss = global_mean_loss(t.module.loss(predicted, hb), hb, h.accelerator)
            mark()
            h.accelerator.backward(loss)
            mark()
            optimizer_update(h.accelerator, t.model, t.optimizer, t.scheduler, h.grad_clip)
            mark()
        for phase, a, b in zip(STEP_PHASES, marks, marks[1:]):
            timed[phase].append(b - a)
        return float(loss.detach())

    timed: dict = {p: [] for p in STEP_PHASES}
    batches = _endless(split.source.batches)
    split_losses = [phased(split, batches, timed) for _ in range(warmup + steps)]
    timed = {p: v[warmup:] for p, v in timed.items()}

    batches = _endless(production.source.batches)
    values = [head_step(production.accelerator, [production.trainee], step_input(next(batches), production.device),
                        production.grad_clip).values for _ in range(warmup)]
    sync(settings.device)
    start = time.perf_counter()
    for _ in range(steps):
        values.append(head_step(production.accelerator, [production.trainee],
                                step_input(next(batches), production.device), production.grad_clip).values)
    sync(settings.device)
    step_ms = 1e3 * (time.perf_counter() - start) / steps
    production_losses = [float(v[0]) for v in values]
    for h in (split, production):
        for close in h.closers:
            close()
    ms = {p: 1e3 * statistics.median(v) for p, v in timed.items()}
    worst = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(split_losses, production_losses))
    return {"ms": ms, "phases_sum_ms": sum(ms.values()), "step_ms": step_ms, "steps": steps,
            "max_loss_difference": worst}


def paired_training(benchmark, modes: tuple[str, str], settings: BenchSettings, data: BenchData) -> dict | None:
    """Two training modes timed in alternating rounds of one epoch each (`settings.plan`'s steps):
    pytest-benchmark times `modes[0]`, each of its rounds after one round of `modes[1]` (its setup),
    so load on a shared machine lands on both alike. Returns None without timings, else
    {"seconds": {mode: median round}, "rounds_s": {mode: [rounds]}, "steps", "ratio_median"}:
    ratio_median is the median over rounds of modes[1]'s round / the modes[0] round right after it
    (a level shift of the machine mid-run moves both rounds of a pair, not the ratio of medians)."""
    import statistics

    steps = settings.plan(modes[0])[0]
    timed, other = (build_loop(m, settings, data) for m in modes)
    other_s = []

    def run_other():
        start = time.perf_counter()
        other.run(steps)
        other_s.append(time.perf_counter() - start)

    try:
        benchmark.pedantic(timed.run, args=(steps,), setup=run_other, rounds=2 * settings.cached_rounds - 1,
                           warmup_rounds=1)
    finally:
        timed.close()
        other.close()
    if not benchmark.stats:
        return None
    rounds = {modes[0]: list(benchmark.stats.stats.data), modes[1]: other_s[1:]}
    return {"seconds": {m: statistics.median(r) for m, r in rounds.items()}, "rounds_s": rounds, "steps": steps,
            "ratio_median": paired_ratio(rounds[modes[1]], rounds[modes[0]])}


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the per-round ratios numerators[i] / denominators[i] (rounds taken back to back)."""
    import statistics

    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def _joint_loop(settings: BenchSettings, data: BenchData) -> TrainLoop:
    """Joint training, the step of `pretrain.py --joint` (`loop.train_step` of a `Stage1Step`): backbone
    (from the checkpoint) + head trainable.

    Its batches are the live source's (`epoch_event_batches`), not pretrain's hit-count buckets, so
    that joint and live frozen differ only in what is trained.
    """
    import torch

    from cachefeat.config import section
    from cachefeat.data.events import EventFile
    from cachefeat.model.checkpoint import load_checkpoint, load_model_state
    from cachefeat.training.loop import make_accelerator, prepare_trainee, train_step
    from cachefeat.training.pretrain import DEFAULTS, Stage1Step, build_stage1, fit_head_scaling
    from cachefeat.training.sources import epoch_event_batches

    config = settings.load_config()
    pre = section(config, "pretrain", DEFAULTS)
    fields = config["data"]
    accelerator = make_accelerator(data.root / "run", device=settings.device)
    device = accelerator.device
    torch.manual_seed(settings.seed)
    backbone, head = build_stage1(config, joint=True)
    load_model_state(backbone, load_checkpoint(ROOT / settings.checkpoint))
    events = EventFile(data.train, fields["hit_fields"], fields["particle_fields"], fields.get("max_hits"))
    fit_head_scaling(head, events)
    model = Stage1Step(backbone, head, fields["hit_fields"], fields["particle_fields"], pre["head_loss_weight"])
    trainee = prepare_trainee(accelerator, model, pre["lr"], pre["weight_decay"], 10**7)
    trainee.model.train()

    def batches(epoch: int):  # the live source's batches: same events, same order, same padding
        for idx in epoch_event_batches(len(events), settings.batch_size, settings.seed, epoch):
            yield {k: v.to(device, non_blocking=True) for k, v in events.read(idx).items()}

    def step(batch) -> None:
        train_step(accelerator, [trainee], lambda t: t.model(batch)[0], pre["grad_clip"]).tolist()

    return TrainLoop(step, _endless(batches), lambda b: int(b["event_id"].shape[0]), settings.device,
                     [events.close])


def frozen_forward(settings: BenchSettings, data: BenchData):
    """A callable running the bare frozen forward over `data.extract_input`, in extraction's batches.

    The batches are those of `cachefeat.cache.extract.extract_block`: per commit block, events
    bucketed by hit count into the config's extract.batch_size. Nothing is kept or written.
    """
    import numpy as np

    from cachefeat.cache.extract import resolve_options
    from cachefeat.cache.frozen import FrozenBackbone
    from cachefeat.cache.schema import block_range, num_blocks
    from cachefeat.data.events import EventFile, bucketed_batches

    config = settings.load_config()
    fields = config["data"]
    opts = resolve_options(config)
    frozen = FrozenBackbone(config, ROOT / settings.checkpoint, device=settings.device)
    events = EventFile(data.extract_input, fields["hit_fields"], fields["particle_fields"], fields.get("max_hits"))
    batches = []
    for block in range(num_blocks(len(events), opts["block_size"])):
        start, stop = block_range(block, len(events), opts["block_size"])
        batches += [start + b for b in bucketed_batches(events.hit_counts[start:stop], opts["batch_size"])]

    def run() -> int:
        for idx in batches:
            frozen.forward(events.read(np.asarray(idx)))
        sync(settings.device)
        return len(events)

    return run, events.close


def extraction(settings: BenchSettings, data: BenchData, output: Path):
    """A callable extracting `data.extract_input` (float32 cache, the config's options) into `output`,
    which must not exist when it is called."""
    from cachefeat.cache.extract import extract

    config = settings.load_config()

    def run() -> dict:
        return extract(config, ROOT / settings.checkpoint, data.extract_input, output, dtype="float32",
                       device=settings.device, progress=False)

    return run


def extraction_vs_forward(benchmark, settings: BenchSettings, data: BenchData, output: Path) -> dict | None:
    """Time extraction of `data.extract_input` into `output` against the bare frozen forward over the
    same events: pytest-benchmark's rounds of extraction, each after one forward round (its setup),
    one warm-up round of each. Returns None without timings (--benchmark-disable), else
    {"extract_s": median, "forward_s": median, "extract_round_s", "forward_round_s",
    "ratio_median", "host_s_median"}: the medians over rounds of forward round / the extraction
    round right after it, and of their difference (a level shift of the machine mid-run moves both
    rounds of a pair, not these)."""
    import statistics

    extract = extraction(settings, data, output)
    forward, close = frozen_forward(settings, data)
    forward_s = []

    def timed_forward():
        shutil.rmtree(output, ignore_errors=True)
        start = time.perf_counter()
        assert forward() == settings.n_extract
        forward_s.append(time.perf_counter() - start)

    try:
        summary = benchmark.pedantic(extract, setup=timed_forward, rounds=settings.timing_rounds, warmup_rounds=1)
    finally:
        close()
    assert summary["events"] == settings.n_extract
    if not benchmark.stats:
        return None
    extract_s = list(benchmark.stats.stats.data)
    return {"extract_s": benchmark.stats.stats.median, "forward_s": statistics.median(forward_s[1:]),
            "extract_round_s": extract_s, "forward_round_s": forward_s[1:],
            "ratio_median": paired_ratio(forward_s[1:], extract_s),
            "host_s_median": statistics.median(e - f for e, f in zip(extract_s, forward_s[1:], strict=True))}


def read_vs_memcpy(cache: Path, rounds: int = 21) -> dict:
    """A whole read of `cache` (`CacheReader.read_events`, every event) against `np.copyto` of as many
    bytes into a preallocated buffer and against a raw read of its chunk files, in alternating rounds
    after one warm-up each: medians in GB/s.

    The whole read fills new arrays (as `load` does once); the same read as a stream makes it, into
    the buffers of an `ArrayPool` that the previous read's batch (dropped) left free, is
    `stream_read_gbps`.

    The raw read (`raw_file_read`) is the floor under any reader of these files: `os.readv` of every
    chunk file into preallocated buffers, on as many threads as the reader uses, no checksum and no
    decoding; `raw_read_gbps` counts file bytes. `cache_read_vs_raw_read` is raw time / read time
    (1.0: the checked, decoded read costs what reading the files alone costs)."""
    from dataclasses import fields

    import numpy as np

    from cachefeat.cache.chunkio import READ_THREADS
    from cachefeat.cache.pool import ArrayPool
    from cachefeat.cache.reader import CacheReader

    reader = CacheReader(cache)
    batch = reader.read_events(0, reader.num_events)
    nbytes = sum(getattr(batch, f.name).nbytes for f in fields(batch))
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    raw_read, file_bytes = raw_file_read(cache, READ_THREADS)
    raw_read()
    pool = ArrayPool()
    reader.read_events(0, reader.num_events, pool)
    read_s, copy_s, raw_s, stream_s = [], [], [], []
    for _ in range(rounds):
        for fn, times in ((lambda: reader.read_events(0, reader.num_events), read_s),
                          (lambda: np.copyto(dst, src), copy_s), (raw_read, raw_s),
                          (lambda: reader.read_events(0, reader.num_events, pool), stream_s)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"bytes": nbytes, "rounds": rounds, "cache_read_gbps": nbytes / statistics.median(read_s) / 1e9,
            "memcpy_gbps": nbytes / statistics.median(copy_s) / 1e9, "file_bytes": file_bytes,
            "raw_read_threads": READ_THREADS, "raw_read_gbps": file_bytes / statistics.median(raw_s) / 1e9,
            "cache_read_vs_raw_read": statistics.median(raw_s) / statistics.median(read_s),
            "stream_read_gbps": nbytes / statistics.median(stream_s) / 1e9}


def raw_file_read(cache: Path, threads: int):
    """(read, file bytes): read() reads every chunk file of `cache` (`blocks/**/c/**`) with `os.readv`
    into preallocated buffers in 256 kB pieces, on `threads` threads (files balanced by size, largest
    first; the pool is started once)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    files = sorted((p for p in Path(cache, "blocks").glob("*/**/c/**/*") if p.is_file()),
                   key=lambda p: -p.stat().st_size)
    shares: list[list] = [[] for _ in range(max(1, min(threads, len(files))))]
    loads = [0] * len(shares)
    for path in files:
        k = loads.index(min(loads))
        size = path.stat().st_size
        shares[k].append((str(path), np.empty(size, np.uint8)))
        loads[k] += size
    pool = ThreadPoolExecutor(len(shares) - 1) if len(shares) > 1 else None
    piece = 256 << 10

    def read_share(share) -> None:
        for path, buf in share:
            fd = os.open(path, os.O_RDONLY)
            try:
                for start in range(0, len(buf), piece):
                    os.readv(fd, [buf[start : start + piece]])
            finally:
                os.close(fd)

    def read() -> None:
        handed = [pool.submit(read_share, share) for share in shares[1:]] if pool else []
        read_share(shares[0])
        for future in handed:
            future.result()

    return read, sum(loads)


def time_to_target(settings: BenchSettings, data: BenchData, run_dir: Path) -> dict:
    """Train the head over the resident float32 cache with `train()` for `max_epochs` epochs.

    Returns {"target_val_loss", "max_epochs", "val_loss" (per epoch), "epochs" (the first epoch
    whose validation loss is <= the target, None if none)}.
    """
    from cachefeat.training.train import train

    train(settings.load_config(), run_dir, source="cache", cache=data.caches["float32"],
          val_cache=data.val_cache, data_mode="memory", max_epochs=settings.max_epochs,
          batch_size=settings.batch_size, seed=settings.seed, device=settings.device)
    curve = [row["val_loss"] for row in json.loads((run_dir / "metrics.json").read_text())]
    reached = [i + 1 for i, v in enumerate(curve) if v <= settings.target_val_loss]
    return {"target_val_loss": settings.target_val_loss, "max_epochs": settings.max_epochs,
            "val_loss": curve, "epochs": reached[0] if reached else None}


# --- peak memory in a subprocess ------------------------------------------------------------


def peak_rss(mode: str, settings: BenchSettings, data: BenchData) -> dict:
    """Peak resident memory (MB) of a fresh process running `settings.rss_steps` steps of `mode`.

    Also "cuda_peak_mb" (torch.cuda.max_memory_allocated) on CUDA; mode "idle" only imports
    torch and cachefeat (the floor every mode shares).
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "probe", mode, json.dumps(asdict(settings)),
           str(data.root), str(settings.rss_steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory probe of {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _probe(argv: list[str]) -> None:
    import resource

    worker = subprocess.run([sys.executable, str(Path(__file__).resolve()), "worker", *argv],
                            capture_output=True, text=True, check=False)
    if worker.returncode != 0:
        sys.stderr.write(worker.stderr)
        raise SystemExit(worker.returncode)
    report = json.loads(worker.stdout.strip().splitlines()[-1])
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB on Linux
    sys.stdout.write(json.dumps(report) + "\n")


def _worker(argv: list[str]) -> None:
    mode, settings_json, root, steps = argv
    import torch

    import cachefeat.training.train  # noqa: F401  (the imports every mode pays)

    settings = BenchSettings(**json.loads(settings_json))
    apply_threads(settings)
    report = {"mode": mode, "steps": int(steps)}
    if mode != "idle":
        loop = build_loop(mode, settings, BenchData(Path(root), 0.0))
        report["events"] = loop.run(int(steps))
        loop.close()
    if settings.device == "cuda":
        report["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    sys.stdout.write(json.dumps(report) + "\n")


# --- results ---------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    import numpy
    import torch
    import zarr

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
            "numpy": numpy.__version__, "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu}
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = os.getloadavg()[0]
    return info


def _get(summary: dict, dotted: str):
    value = summary
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _ratio(a, b):
    return a / b if a is not None and b else None


def finalize(results: dict) -> dict:
    """The summary: the measured `results` plus the derived ratios, time to target and target checks."""
    s = dict(results)
    s["trackml_only"] = trackml_only(results)
    rates = s.get("train_events_per_s", {})
    live = rates.get("live_frozen_dense")
    s["speedup_cached_memory_vs_live_frozen"] = _ratio(rates.get("cached_memory"), live)
    s["speedup_cached_stream_vs_live_frozen"] = _ratio(rates.get("cached_stream"), live)
    s["speedup_live_frozen_vs_joint"] = _ratio(live, rates.get("joint"))
    s["speedup_cached_memory_vs_live_frozen_sparse"] = _ratio(rates.get("cached_memory"),
                                                              rates.get("live_frozen_sparse"))
    s["extract_vs_forward"] = _extract_vs_forward(s)
    s["cache_read_vs_memcpy"] = _ratio(s.get("cache_read_gbps"), s.get("memcpy_gbps"))
    alternating = s.get("read_vs_memcpy_alternating") or {}
    s["cache_read_vs_memcpy_alternating"] = _ratio(alternating.get("cache_read_gbps"), alternating.get("memcpy_gbps"))
    s["cache_read_vs_raw_read"] = alternating.get("cache_read_vs_raw_read")
    s["stream_read_vs_memcpy_alternating"] = _ratio(alternating.get("stream_read_gbps"), alternating.get("memcpy_gbps"))
    # per-round ratios of the alternating rounds (`paired_training`), their median
    rounds = (s.get("stream_vs_memory") or {}).get("rounds_s") or {}
    s["cached_stream_vs_memory"] = (paired_ratio(rounds["cached_memory"], rounds["cached_stream"])
                                    if rounds.get("cached_memory") and rounds.get("cached_stream") else None)
    settings = s.get("settings") or {}
    n_train = settings.get("n_train")
    extract_s = _ratio(n_train, s.get("extract_events_per_s"))
    epoch_live = _ratio(n_train, live)
    epoch_cached = _ratio(n_train, rates.get("cached_memory"))
    s["breakeven_epochs"] = None
    if extract_s is not None and epoch_live is not None and epoch_cached is not None and epoch_live > epoch_cached:
        s["breakeven_epochs"] = extract_s / (epoch_live - epoch_cached)
    target = s.get("time_to_target")
    if target and None not in (extract_s, epoch_live, epoch_cached):
        target.update(extraction_s=extract_s, epoch_s_cached_memory=epoch_cached, epoch_s_live_frozen=epoch_live)
        k = target.get("epochs")
        if k is not None:
            target.update(cached_wall_s=extract_s + k * epoch_cached, live_wall_s=k * epoch_live)
            target["speedup"] = target["live_wall_s"] / target["cached_wall_s"]
    s["targets"] = {}
    for name, (key, op, threshold) in TARGETS.items():
        value = _get(s, key)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        s["targets"][name] = {"key": key, "value": value, "target": f"{op} {threshold:g}", "met": met}
    s["missing"] = [] if s["trackml_only"] else _missing(s, REQUIRED_KEYS, MODES)
    if isinstance(s.get("trackml"), dict):
        s["trackml"] = _finalize_trackml(s["trackml"])
        s["missing"] += [f"trackml.{k}" for k in s["trackml"]["missing"]]
    return s


def _extract_vs_forward(s: dict) -> float | None:
    """Extraction rate / forward rate: the median of the per-round ratios where the results have
    them (`extraction_vs_forward`), else (results of earlier runs) the ratio of the median rates."""
    paired = s.get("extract_vs_forward_paired")
    return paired if paired is not None else _ratio(s.get("extract_events_per_s"), s.get("forward_events_per_s"))


def trackml_only(results: dict) -> bool:
    """Whether the run measured the TrackML set alone (`-k trackml`; `results` as measured, before
    `finalize`): then it is complete without the muon set's keys, and its report shows the TrackML
    section only."""
    return isinstance(results.get("trackml"), dict) and not set(results) - {"trackml", "session_wall_s"}


def _missing(s: dict, required, modes) -> list[str]:
    missing = [k for k in required if _get(s, k) is None]
    for k in ("train_events_per_s", "peak_rss_mb"):
        if isinstance(s.get(k), dict):
            missing += [f"{k}.{m}" for m in modes if m not in s[k]]
    if isinstance(s.get("cache_bytes_per_event"), dict):
        missing += [f"cache_bytes_per_event.{d}" for d in DTYPES if d not in s["cache_bytes_per_event"]]
    return missing


def _finalize_trackml(results: dict) -> dict:
    """The TrackML section with its derived ratios, target checks and missing keys."""
    t = {k: v for k, v in results.items() if k not in ("targets", "missing")}
    rates = t.get("train_events_per_s", {})
    live = rates.get("live_frozen_sparse")
    t["speedup_cached_memory_vs_live_frozen_sparse"] = _ratio(rates.get("cached_memory"), live)
    t["speedup_cached_stream_vs_live_frozen_sparse"] = _ratio(rates.get("cached_stream"), live)
    t["extract_vs_forward"] = _extract_vs_forward(t)
    t["cache_read_vs_memcpy"] = _ratio(t.get("cache_read_gbps"), t.get("memcpy_gbps"))
    t["stream_read_vs_memcpy"] = _ratio(t.get("stream_read_gbps"), t.get("memcpy_gbps"))
    t["targets"] = {}
    for name, (key, op, threshold) in TRACKML_TARGETS.items():
        value = _get(t, key)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        t["targets"][name] = {"key": key, "value": value, "target": f"{op} {threshold:g}", "met": met}
    t["missing"] = _missing(t, TRACKML_REQUIRED_KEYS, TRACKML_MODES)
    return t


def write_results(summary: dict, folder: Path) -> list[Path]:
    """summary.json, summary.md and throughput.png in `folder`; returns the paths written.

    A run that lacks some of the required keys (e.g. a `-k` selection) writes
    summary.partial.json / summary.partial.md instead, so a full reference is never overwritten
    by a partial one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stem = "summary" if not summary["missing"] else "summary.partial"
    paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
    paths[0].write_text(json.dumps(summary, indent=1, default=_jsonable) + "\n")
    paths[1].write_text(markdown(summary))
    rates = summary.get("train_events_per_s") or {}
    if rates:
        paths.append(folder / ("throughput.png" if stem == "summary" else "throughput.partial.png"))
        plot_throughput(summary, paths[-1])
    return paths


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, (int, float)):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def markdown(s: dict) -> str:
    """The summary as a markdown report (with its TrackML section, or only that for a TrackML-only run)."""
    if s.get("trackml_only"):
        return "\n".join(markdown_trackml(s["trackml"], top=True)).rstrip() + "\n"
    text = _markdown_muon(s)
    if isinstance(s.get("trackml"), dict):
        text += "\n" + "\n".join(markdown_trackml(s["trackml"], top=False)).rstrip() + "\n"
    return text


def markdown_trackml(t: dict, top: bool) -> list[str]:
    """The TrackML section of the report as lines (`top`: as the whole report, else a section)."""
    h = "#" if top else "##"
    m = t.get("machine") or {}
    st = t.get("settings") or {}
    rates = t.get("train_events_per_s") or {}
    live = rates.get("live_frozen_sparse")
    plan = t.get("train_plan") or {}
    lines = [
        f"{h} cachefeat benchmarks (trackml)",
        "",
        f"{m.get('device_name', '?')} ({m.get('device', '?')}); {m.get('cores', '?')} cores, "
        f"{m.get('torch_threads', '?')} torch thread(s), torch {m.get('torch', '?')}, zarr {m.get('zarr', '?')}; "
        f"load average {_fmt(m.get('load_average_1min'))} at the start. Checkpoint `{st.get('checkpoint', '?')}`; "
        f"{st.get('n_train', '?')} training events, {st.get('n_extract', '?')} extraction events, "
        f"batch size {st.get('batch_size', '?')}. Throughputs are medians of timed rounds after a warm-up round.",
        "",
        f"#{h} Training throughput",
        "",
        "| mode | events/s | vs live frozen sparse | rounds × steps |",
        "|---|---:|---:|---:|",
    ]
    for mode in TRACKML_MODES:
        r, p = rates.get(mode), plan.get(mode)
        lines.append(f"| {MODE_LABELS[mode]} | {_fmt(r)} | {_fmt(_ratio(r, live))}× | "
                     f"{'–' if not p else f'{p[1]} × {p[0]}'} |")
    lines += ["", f"#{h} Targets", "", "| measure | value | target | met |", "|---|---:|---:|:---:|"]
    for name, target in (t.get("targets") or {}).items():
        lines.append(f"| {name} | {_fmt(target['value'])} | {target['target']} | {_fmt(target['met'])} |")
    bpe = t.get("cache_bytes_per_event") or {}
    lines += [
        "", f"#{h} Extraction and cache size", "", "| measure | value |", "|---|---:|",
        f"| extraction (events/s) | {_fmt(t.get('extract_events_per_s'))} |",
        f"| pure frozen forward (events/s) | {_fmt(t.get('forward_events_per_s'))} |",
        f"| extraction / forward (median of the alternating rounds' ratios) | {_fmt(t.get('extract_vs_forward'))} |",
        f"| extraction rate / forward rate (their medians) | "
        f"{_fmt(_ratio(t.get('extract_events_per_s'), t.get('forward_events_per_s')))} |",
        f"| extraction host time beyond the forward (ms/event, median of the rounds' differences) | "
        f"{_fmt(t.get('extract_host_ms_per_event'))} |",
        *(f"| cache bytes per event ({d}) | {_fmt(v)} |" for d, v in bpe.items()),
        f"| dense float32 bytes per event | {_fmt(t.get('dense_bytes_per_event'))} |",
        *(f"| cache / dense ({d}) | {_fmt(v)} |" for d, v in (t.get("cache_over_dense") or {}).items()),
        *(f"| compression ratio ({d}) | {_fmt(v)} |" for d, v in (t.get("compression_ratio") or {}).items()),
        *(f"| {k} per event (kept) | {_fmt(v)} |" for k, v in (t.get("counts_per_event") or {}).items()),
        f"| cache read, decoded (GB/s, float32, alternating with the copy) | {_fmt(t.get('cache_read_gbps'))} |",
        f"| memcpy, same bytes (GB/s) | {_fmt(t.get('memcpy_gbps'))} |",
        f"| raw read of the chunk files, no checks (file GB/s) | {_fmt(t.get('raw_read_gbps'))} |",
        f"| cache read / raw read of its files (time ratio) | {_fmt(t.get('cache_read_vs_raw_read'))} |",
        f"| streamed read: the same into an `ArrayPool`'s reused buffers (GB/s) | {_fmt(t.get('stream_read_gbps'))} |",
    ]
    by_array = t.get("stored_bytes_per_event_by_array") or {}
    if by_array:
        dtypes = list(by_array)
        lines += ["", f"#{h} Stored bytes per event by array", "",
                  "| array | " + " | ".join(dtypes) + " |", "|---|" + "---:|" * len(dtypes)]
        for key in by_array[dtypes[0]]:
            lines.append(f"| {key} | " + " | ".join(_fmt(by_array[d].get(key)) for d in dtypes) + " |")
    lines += ["", f"#{h} Peak resident memory (fresh process, MB)", "", "| mode | MB |", "|---|---:|",
              *(f"| {MODE_LABELS.get(k, k)} | {_fmt(v)} |" for k, v in (t.get("peak_rss_mb") or {}).items())]
    if t.get("rss_idle_mb") is not None:
        lines.append(f"| (python + torch + cachefeat imported, nothing run) | {_fmt(t['rss_idle_mb'])} |")
    if t.get("missing"):
        lines += ["", f"Not measured in this run: {', '.join(t['missing'])}."]
    return lines


def _markdown_muon(s: dict) -> str:
    m = s.get("machine") or {}
    st = s.get("settings") or {}
    rates = s.get("train_events_per_s") or {}
    live = rates.get("live_frozen_dense")
    lines = [
        f"# cachefeat benchmarks ({st.get('name', '?')})",
        "",
        f"{m.get('device_name', '?')} ({m.get('device', '?')}); {m.get('cores', '?')} cores, "
        f"{m.get('torch_threads', '?')} torch thread(s), torch {m.get('torch', '?')}, zarr {m.get('zarr', '?')}; "
        "load average "
        f"{_fmt(m.get('load_average_1min'))} at the start. {st.get('n_train', '?')} training events, "
        f"batch size {st.get('batch_size', '?')}. Throughputs are medians of timed rounds after a warm-up "
        "round (see `rounds`).",
        "",
        "## Training throughput",
        "",
        "| mode | events/s | vs live frozen dense | rounds × steps |",
        "|---|---:|---:|---:|",
    ]
    plan = s.get("train_plan") or {}
    for mode in MODES:
        r = rates.get(mode)
        p = plan.get(mode)
        lines.append(f"| {MODE_LABELS[mode]} | {_fmt(r)} | {_fmt(_ratio(r, live))}× | "
                     f"{'–' if not p else f'{p[1]} × {p[0]}'} |")
    lines += ["", "## Targets", "", "| measure | value | target | met |", "|---|---:|---:|:---:|"]
    for name, t in (s.get("targets") or {}).items():
        lines.append(f"| {name} | {_fmt(t['value'])} | {t['target']} | {_fmt(t['met'])} |")
    bpe = s.get("cache_bytes_per_event") or {}
    read_bytes = s.get("cache_read_bytes") or {}
    lines += [
        "", "## Extraction, cache size and reads", "",
        "| measure | value |", "|---|---:|",
        f"| extraction (events/s) | {_fmt(s.get('extract_events_per_s'))} |",
        f"| pure frozen forward (events/s) | {_fmt(s.get('forward_events_per_s'))} |",
        f"| extraction / forward (median of the alternating rounds' ratios) | {_fmt(s.get('extract_vs_forward'))} |",
        f"| extraction rate / forward rate (their medians) | "
        f"{_fmt(_ratio(s.get('extract_events_per_s'), s.get('forward_events_per_s')))} |",
        f"| extraction host time beyond the forward (ms/event, median of the rounds' differences) | "
        f"{_fmt(s.get('extract_host_ms_per_event'))} |",
        *(f"| cache bytes per event ({d}) | {_fmt(v)} |" for d, v in bpe.items()),
        f"| dense float32 bytes per event | {_fmt(s.get('dense_bytes_per_event'))} |",
        *(f"| cache / dense ({d}) | {_fmt(v)} |" for d, v in (s.get("cache_over_dense") or {}).items()),
        *(f"| compression ratio ({d}) | {_fmt(v)} |" for d, v in (s.get("compression_ratio") or {}).items()),
        f"| MB decoded by one full read (float32) | {_fmt(_ratio(read_bytes.get('float32'), 1e6))} |",
        f"| cache read, decoded (GB/s) | {_fmt(s.get('cache_read_gbps'))} |",
        f"| memcpy, same bytes (GB/s) | {_fmt(s.get('memcpy_gbps'))} |",
        f"| cache read / memcpy, back-to-back rounds of each | {_fmt(s.get('cache_read_vs_memcpy'))} |",
        f"| cache read / memcpy, alternating rounds (read, copy, read, ...) | "
        f"{_fmt(s.get('cache_read_vs_memcpy_alternating'))} |",
        f"| raw read of the chunk files, no checks (file GB/s, alternating) | "
        f"{_fmt((s.get('read_vs_memcpy_alternating') or {}).get('raw_read_gbps'))} |",
        f"| cache read / raw read of its files (time ratio, alternating) | {_fmt(s.get('cache_read_vs_raw_read'))} |",
        f"| streamed read: the same into an `ArrayPool`'s reused buffers (GB/s, alternating) | "
        f"{_fmt((s.get('read_vs_memcpy_alternating') or {}).get('stream_read_gbps'))} |",
        f"| streamed read / memcpy, alternating rounds | {_fmt(s.get('stream_read_vs_memcpy_alternating'))} |",
        *_markdown_step_breakdown(s.get("cached_step_breakdown"), st.get("batch_size")),
        "", "## Peak resident memory (fresh process, MB)", "", "| mode | MB |", "|---|---:|",
        *(f"| {MODE_LABELS.get(k, k)} | {_fmt(v)} |" for k, v in (s.get("peak_rss_mb") or {}).items()),
    ]
    if s.get("rss_idle_mb") is not None:
        lines.append(f"| (python + torch + cachefeat imported, nothing run) | {_fmt(s['rss_idle_mb'])} |")
    if s.get("peak_cuda_mb"):
        lines += ["", "Peak CUDA memory allocated (MB): " + ", ".join(
            f"{MODE_LABELS.get(k, k)} {_fmt(v)}" for k, v in s["peak_cuda_mb"].items()) + "."]
    t = s.get("time_to_target") or {}
    lines += [
        "", "## Time to a fixed validation loss", "",
        f"Target validation loss {_fmt(t.get('target_val_loss'))}: reached after {_fmt(t.get('epochs'))} epochs "
        f"(of {_fmt(t.get('max_epochs'))}) of cached training; the live frozen trajectory is the same "
        "(equivalence), so live needs as many epochs.",
        "",
        "| | seconds |", "|---|---:|",
        f"| extraction of the training set | {_fmt(t.get('extraction_s'))} |",
        f"| one epoch, cached in memory | {_fmt(t.get('epoch_s_cached_memory'))} |",
        f"| one epoch, live frozen dense | {_fmt(t.get('epoch_s_live_frozen'))} |",
        f"| to target, cached (extraction + k epochs) | {_fmt(t.get('cached_wall_s'))} |",
        f"| to target, live frozen (k epochs) | {_fmt(t.get('live_wall_s'))} |",
        "", f"Break-even after {_fmt(s.get('breakeven_epochs'))} epochs "
        "(extraction time / (live epoch − cached epoch)).",
    ]
    known = set(REQUIRED_KEYS) | {"settings", "targets", "missing", "time_to_target", "train_plan", "rss_idle_mb",
                                  "cache_over_dense", "compression_ratio", "cache_read_vs_memcpy", "data",
                                  "cache_read_vs_memcpy_alternating", "read_vs_memcpy_alternating",
                                  "cache_read_vs_raw_read", "stream_read_vs_memcpy_alternating",
                                  "speedup_cached_memory_vs_live_frozen_sparse",
                                  "session_wall_s",
                                  "cache_read_gbps_by_dtype", "cache_read_bytes", "peak_cuda_mb", "trackml",
                                  "trackml_only", "cached_stream_vs_memory", "cached_step_breakdown"}
    extra = {k: v for k, v in s.items() if k not in known}
    if extra:
        lines += ["", "## Other results", ""]
        for key, value in extra.items():
            lines += [f"### {key}", "", "```json", json.dumps(value, indent=1, default=_jsonable), "```", ""]
    if s.get("missing"):
        lines += ["", f"Not measured in this run: {', '.join(s['missing'])}."]
    return "\n".join(lines).rstrip() + "\n"


def _markdown_step_breakdown(b: dict | None, batch_size) -> list[str]:
    """The cached step's phases (`step_breakdown`) as a table, or nothing when not measured."""
    if not b:
        return []
    labels = {"batch": "gather the batch from the resident cache", "to_device": "`step_input` (to the device, float32)",
              "forward": "head forward", "loss": "loss", "backward": "backward",
              "update": "clip, AdamW, schedule, zero grads"}
    total = b["phases_sum_ms"]
    return [
        "", f"## Cached step, phase by phase (batch {batch_size}, ms per step, device synchronised after each phase)",
        "", "| phase | ms | share |", "|---|---:|---:|",
        *(f"| {labels.get(k, k)} | {_fmt(v)} | {_fmt(100 * v / total, 2)}% |" for k, v in b["ms"].items()),
        f"| sum of the phases | {_fmt(total)} | |",
        f"| the production step (`head_step`), synchronised once per {b['steps']} steps | {_fmt(b['step_ms'])} | |",
    ]


def plot_throughput(s: dict, path: Path) -> None:
    """Bar chart of training events/s by mode (log scale), each bar labelled with its rate and speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = s["train_events_per_s"]
    modes = [m for m in MODES if m in rates]
    values = [rates[m] for m in modes]
    live = rates.get("live_frozen_dense")
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    colors = ["#9e9e9e", "#d98c3f", "#e0b050", "#4f8fc0", "#2c6e9e"]
    bars = ax.barh([MODE_LABELS[m] for m in modes], values, color=[colors[MODES.index(m)] for m in modes])
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlim(min(values) / 3, max(values) * 200)  # room for the longest label right of the longest bar
    for bar, value in zip(bars, values):
        label = f"{value:,.0f} ev/s" if value >= 10 else f"{value:.2g} ev/s"
        if live:
            label += f"  ({value / live:.3g}× live frozen dense)"
        ax.text(value * 1.1, bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=9)
    m, st = s.get("machine") or {}, s.get("settings") or {}
    ax.set_xlabel("training throughput, events/s (log scale)")
    ax.set_title(f"cachefeat phase-2 training, {st.get('name', '')}: {m.get('device_name', '')} "
                 f"({m.get('cores', '?')} cores), batch {st.get('batch_size', '?')}", fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"probe": _probe, "worker": _worker}[command](rest)
