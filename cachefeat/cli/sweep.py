"""`cachefeat sweep`: train a grid of head variants in one pass over the cache (see cachefeat.training.sweep)."""

from __future__ import annotations

from pathlib import Path

from cachefeat.cli import add_set_option, example_epilog, require_positive
from cachefeat.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="train a grid of regression-head variants in one pass over a cache",
        description="Train every variant of the config's `sweep` block (a grid and/or a list of overrides of "
        "head.init_args.{hidden_dim, num_layers, dropout, assignment_threshold} and train.{lr, weight_decay, "
        "seed}) over the cache in one pass: each batch is read once and feeds every variant. Batch size, "
        "epochs and event order are shared. Each variant gets RUN_DIR/<variant>/ (head.ckpt, metrics); "
        "RUN_DIR/sweep.csv, sweep.json and sweep_val_loss.png rank them. Multi-GPU: "
        "accelerate launch -m cachefeat sweep ...",
        epilog=example_epilog(
            "# in the config:",
            "#   sweep:",
            "#     metric: val_loss",
            "#     grid: {head.init_args.hidden_dim: [64, 120], head.init_args.dropout: [0.0, 0.1], "
            "train.lr: [1.0e-3, 3.0e-3]}",
            "#     variants: [{name: deep, head.init_args.num_layers: 4}]",
            "cachefeat sweep --config sweep.yaml --cache train.zarr --val-cache val.zarr --output runs/sweep",
        ),
    )
    p.add_argument("--config", required=True, help="YAML config with a sweep block (and data, model, head, train)")
    p.add_argument("--cache", required=True,
                   help="training cache (from `cachefeat extract`): a directory, root://... or s3://...")
    p.add_argument("--val-cache", required=True, help="validation cache (a directory or a URL)")
    p.add_argument("--output", required=True, help="run directory: one folder per variant, sweep.csv/json/png")
    p.add_argument("--data", choices=["auto", "memory", "stream"], default="auto",
                   help="cache access: resident in memory, streamed from disk, or auto (default)")
    p.add_argument("--max-epochs", type=int, help="override train.epochs (shared by all variants)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, help="override train.batch_size (events per process, shared)")
    p.add_argument("--allow-stale", action="store_true",
                   help="train on a cache whose fingerprint does not match (with a warning)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--workers", type=int,
                   help="threads stepping the variants side by side (one CPU process only; default: torch's "
                   "thread count, e.g. the cores, at most one per variant)")
    add_set_option(p, "train.epochs=5")
    p.set_defaults(func=run, outputs=("output",))


def run(args) -> int:
    from cachefeat.cli import check_config, load_checked_config
    from cachefeat.training.sweep import sweep, sweep_variants

    require_positive(args, "max_epochs", "batch_size", "max_steps", "workers")
    config = load_checked_config(args.config, args.set)
    if "sweep" not in config:
        raise UserError(f"config {args.config} has no sweep block (see `cachefeat sweep --help`)")
    for variant in sweep_variants(config):
        check_config(variant.config)
    out = Path(args.output)
    if (out / "sweep.json").exists():
        raise UserError(f"{out} already holds a sweep; choose another --output")
    sweep(config, out, cache=args.cache, val_cache=args.val_cache, max_epochs=args.max_epochs,
          batch_size=args.batch_size, data_mode=args.data, device=args.device, max_steps=args.max_steps,
          allow_stale=args.allow_stale, workers=args.workers)
    return 0
