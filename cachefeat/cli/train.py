"""`cachefeat train`: phase 2, the regression head alone, over the cache (or live, the baseline)."""

from __future__ import annotations

from pathlib import Path

from cachefeat.cli import add_set_option, add_split_option, example_epilog, require_positive
from cachefeat.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the regression head over a cache (or over the live frozen backbone)",
        description="Phase 2: only the regression head trains, with Accelerate. The cache is held in memory "
        "when it fits train.memory_budget_mb, streamed block-wise otherwise. Multi-GPU: "
        "accelerate launch -m cachefeat train ...",
        epilog=example_epilog(
            "cachefeat train --config configs/muon.yaml --cache train.zarr --val-cache val.zarr --output runs/head",
            "cachefeat train --config configs/muon.yaml --source live --checkpoint data/muon_stage1.ckpt \\",
            "    --input train.h5 --val-input val.h5 --output runs/head-live",
        ),
    )
    p.add_argument("--config", required=True, help="YAML config (data, model, head, train sections)")
    p.add_argument("--output", required=True, help="run directory (head.ckpt, model.ckpt, metrics)")
    p.add_argument("--source", choices=["cache", "live"], default="cache",
                   help="cache (default) or live: the frozen backbone runs on every batch (the baseline)")
    p.add_argument("--cache", help="training cache (from `cachefeat extract`): a directory, root://... or s3://...")
    p.add_argument("--val-cache", help="validation cache (a directory or a URL)")
    p.add_argument("--checkpoint", help="stage-1 checkpoint: required for --source live; with a cache it is "
                   "checked against the cache fingerprint and used for model.ckpt (backbone + head)")
    p.add_argument("--input", help="training events (HDF5): required for --source live; with a cache, checked "
                   "against its fingerprint")
    p.add_argument("--val-input", help="validation events (HDF5), for --source live")
    add_split_option(p, what="training events, for --source live or to check the cache's fingerprint,")
    add_split_option(p, "--val-split", what="validation events, for --source live,")
    p.add_argument("--data", choices=["auto", "memory", "stream"], default="auto",
                   help="cache access: resident in memory, streamed from disk, or auto (default)")
    p.add_argument("--head-impl", choices=["sparse", "dense"], help="override head.init_args.impl")
    p.add_argument("--max-epochs", type=int, help="override train.epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, help="override train.batch_size (events per process)")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--allow-stale", action="store_true",
                   help="train on a cache whose fingerprint does not match (with a warning)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add_set_option(p, "train.lr=3e-4")
    p.set_defaults(func=run, outputs=("output",))


def run(args) -> int:
    from cachefeat.cli import load_checked_config
    from cachefeat.data.loading import resolve_input
    from cachefeat.training.train import train

    config = load_checked_config(args.config, args.set, require=("data", "head"))
    require_positive(args, "max_epochs", "batch_size", "max_steps")
    out = Path(args.output)
    if not args.resume and (out / "head.ckpt").exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --output")
    if args.resume and not out.is_dir():
        raise UserError(f"nothing to resume: {out} does not exist")
    events = resolve_input(config, args.input, args.split)
    val_events = resolve_input(config, args.val_input, args.val_split, "--val-input", "--val-split")
    train(config, out, source=args.source, cache=args.cache, val_cache=args.val_cache, checkpoint=args.checkpoint,
          input=events, val_input=val_events, resume=args.resume, allow_stale=args.allow_stale,
          max_epochs=args.max_epochs, batch_size=args.batch_size, seed=args.seed, data_mode=args.data,
          head_impl=args.head_impl, device=args.device, max_steps=args.max_steps)
    return 0
