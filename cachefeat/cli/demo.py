"""`cachefeat demo`: the whole chain on the embedded default, small enough for a laptop.

simulate (train/val/test) → extract with the shipped stage-1 checkpoint → train the head on the
cache → evaluate (plots, helix-fit baseline) → a summary table, including cached vs live-frozen
training speed measured on a slice. Re-running reuses what is there after checking it: event
files by their generator settings, caches by their fingerprint, the head by its head and train
settings and the cache it was trained on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cachefeat.cli import example_epilog

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
SPLITS = {"train": (4000, 1001), "val": (800, 1002), "test": (800, 1003)}  # events, seed
EPOCHS = 10
SPEED_STEPS = 8


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole chain on a small simulated muon set (a few minutes on a laptop)",
        description="Simulate a small muon set, extract it with the shipped stage-1 checkpoint, train the "
        "regression head on the cache, evaluate it against a helix fit, and print a summary.",
        epilog=example_epilog("cachefeat demo", "cachefeat demo --workdir /tmp/cachefeat-demo"),
    )
    p.add_argument("--workdir", default="demo", help="where everything is written (default: ./demo)")
    p.add_argument("--config", default=str(ROOT / "configs" / "muon.yaml"), help="config (default: configs/muon.yaml)")
    p.add_argument("--checkpoint", default=str(ROOT / "data" / "muon_stage1.ckpt"),
                   help="stage-1 checkpoint (default: the shipped data/muon_stage1.ckpt)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.set_defaults(func=run, outputs=("workdir",))


def _events(path: Path, n: int, seed: int) -> tuple[Path, str]:
    from cachefeat.data.events import EventFile
    from cachefeat.data.presets import get_preset
    from cachefeat.data.simulate import write_event_file

    if path.exists():
        with EventFile(path, ["x"], ["pt"]) as events:
            gen = events.metadata.get("generator", {})
            if gen.get("seed") == seed and gen.get("n_events") == n and events.metadata.get("preset") == "muon":
                return path, "reused"
    write_event_file(path, get_preset("muon"), n, seed, progress=True)
    return path, "simulated"


def _cache(config, checkpoint, events: Path, out: Path, device) -> tuple[dict, str]:
    """Extract `events`, unless `out` is a complete cache with the fingerprint this would produce."""
    from cachefeat.cache.extract import extract
    from cachefeat.cache.fingerprint import cache_differences
    from cachefeat.cache.reader import CacheReader
    from cachefeat.data.events import EventFile
    from cachefeat.errors import UserError
    from cachefeat.model.checkpoint import load_checkpoint

    if out.exists():
        try:
            stored = CacheReader(out).fingerprint
        except UserError:
            stored = None
        if stored is not None:
            with EventFile(events, config["data"]["hit_fields"], config["data"]["particle_fields"]) as ev:
                stale = cache_differences(stored, config=config, input_hash=ev.content_hash(),
                                          checkpoint_sha256=load_checkpoint(checkpoint)["weights_sha256"])
            if not stale:
                return {"seconds": None}, "reused"
            log.info("re-extracting %s: %s", out, "; ".join(stale))
    summary = extract(config, checkpoint, events, out, mode="overwrite", device=device)
    return summary, "extracted"


def _head(config, work: Path, train_cache: Path, val_cache: Path, checkpoint, device) -> tuple[dict, str]:
    import shutil

    import torch

    from cachefeat.cache.reader import CacheReader
    from cachefeat.training.train import train

    run_dir = work / "head"
    ckpt = run_dir / "head.ckpt"
    if ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        if (saved.get("cache_fingerprint") == CacheReader(train_cache).fingerprint
                and saved.get("metrics", {}).get("epoch") == EPOCHS
                and {k: saved.get("config", {}).get(k) for k in ("head", "train")}
                == {k: config.get(k) for k in ("head", "train")}):
            return saved["metrics"], "reused"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = train(config, run_dir, cache=train_cache, val_cache=val_cache, checkpoint=checkpoint,
                   max_epochs=EPOCHS, device=device)
    return result, "trained"


def _speed(config, work: Path, train_cache: Path, val_cache: Path, checkpoint, events: Path, device) -> dict:
    """Cached (memory) vs live-frozen head training, events/s over the same SPEED_STEPS batches."""
    import shutil

    from cachefeat.training.train import train

    speeds = {}
    for source in ("cache", "live"):
        run_dir = work / f"speed-{source}"
        shutil.rmtree(run_dir, ignore_errors=True)
        result = train(config, run_dir, source=source, cache=train_cache, val_cache=val_cache,
                       checkpoint=checkpoint, input=events, val_input=events if source == "live" else None,
                       data_mode="memory", max_steps=SPEED_STEPS, device=device, skip_validation=True)
        speeds[source] = result["events_per_s"]
        shutil.rmtree(run_dir, ignore_errors=True)
    return speeds


def run(args) -> int:
    from cachefeat.cache import CacheReader, cache_summary
    from cachefeat.cli import load_checked_config
    from cachefeat.evaluation.predict import evaluate
    from cachefeat.model.checkpoint import load_checkpoint

    started = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config = load_checked_config(args.config, require=("data", "model", "head"))
    load_checkpoint(args.checkpoint)  # a missing or foreign checkpoint fails before any work
    steps = []

    files = {}
    for split, (n, seed) in SPLITS.items():
        files[split], how = _events(work / f"{split}.h5", n, seed)
        steps.append(f"{split} events: {n} ({how})")
    caches, extract_seconds = {}, {}
    for split in SPLITS:
        caches[split] = work / f"{split}.zarr"
        summary, how = _cache(config, args.checkpoint, files[split], caches[split], args.device)
        extract_seconds[split] = summary.get("seconds")
        steps.append(f"{split} cache: {how}")
    head_metrics, how = _head(config, work, caches["train"], caches["val"], args.checkpoint, args.device)
    steps.append(f"head: {how}")
    speeds = _speed(config, work, caches["train"], caches["val"], args.checkpoint, files["train"], args.device)
    metrics = evaluate(config, work / "head" / "head.ckpt", work / "eval", cache=caches["test"],
                       device=args.device or "cpu", progress=True)

    info = cache_summary(CacheReader(caches["train"]))
    head, fit = metrics["head_on_fit_tracks"], metrics["fit"]
    rows = [
        ("events (train / val / test)", " / ".join(str(n) for n, _ in SPLITS.values())),
        ("cache size (train)", f"{info['bytes']['per_event'] / 1e3:.2f} kB/event, "
                               f"{info['dense_float32']['cache_over_dense']:.1%} of the dense float32 layout"),
        ("extraction time (train)", f"{extract_seconds['train']:.1f} s" if extract_seconds["train"] else "reused"),
        ("head training speed", f"cached {speeds['cache']:.0f} events/s vs live frozen {speeds['live']:.0f} "
                                f"events/s ({speeds['cache'] / speeds['live']:.0f}x), {SPEED_STEPS} batches each"),
        ("head val loss after training", f"{head_metrics['val_loss']:.4f} ({head_metrics['epoch']} epochs)"),
        ("relative pT resolution (68% half-width)",
         f"head {head['pt_rel_res68']:.4f}, helix fit {fit['pt_rel_res68']:.4f}"),
        ("eta resolution (68% half-width)", f"head {head['eta_res68']:.2e}, helix fit {fit['eta_res68']:.2e}"),
        ("phi resolution (68% half-width) [rad]", f"head {head['phi_res68']:.2e}, helix fit {fit['phi_res68']:.2e}"),
        ("charge accuracy", f"head {head['q_accuracy']:.4f}, helix fit {fit['q_accuracy']:.4f}"),
        ("plots and predictions", str(work / "eval")),
        ("total time", f"{time.perf_counter() - started:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "cachefeat demo — " + "; ".join(steps), ""] + [f"{k:<{width}}  {v}" for k, v in rows]
    print("\n".join(lines))
    return 0
