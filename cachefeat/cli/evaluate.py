"""`cachefeat evaluate`: a trained head's predictions and resolutions against a helix-fit baseline."""

from __future__ import annotations

from cachefeat.cli import add_set_option, add_split_option, example_epilog, require_positive
from cachefeat.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="predict a test set with a trained head; resolutions and plots against a helix fit",
        description="Run a trained regression head over a test set (a cache, or live through the frozen "
        "backbone), fit a helix through the hits assigned to each query as a classical baseline, and write "
        "predictions.h5, metrics.json and resolution plots (PNG) to the output directory.",
        epilog=example_epilog(
            "cachefeat evaluate --config configs/muon.yaml --head runs/head/head.ckpt --cache test.zarr \\",
            "    --output runs/eval",
            "cachefeat evaluate --config configs/muon.yaml --head runs/head/head.ckpt --source live \\",
            "    --checkpoint data/muon_stage1.ckpt --input test.h5 --output runs/eval-live --bz 0.6",
        ),
    )
    p.add_argument("--config", required=True, help="YAML config (evaluate.bz; data and model for --source live)")
    p.add_argument("--head", required=True, help="head checkpoint written by `cachefeat train` (head.ckpt)")
    p.add_argument("--output", required=True, help="evaluation directory (predictions.h5, metrics.json, *.png)")
    p.add_argument("--source", choices=["cache", "live"], default="cache",
                   help="cache (default) or live: run the frozen backbone on --input")
    p.add_argument("--cache", help="test cache (from `cachefeat extract`): a directory, root://... or s3://..., "
                   "for --source cache")
    p.add_argument("--checkpoint", help="stage-1 checkpoint, for --source live")
    p.add_argument("--input", help="test events (HDF5), for --source live")
    add_split_option(p, what="test events, for --source live,")
    p.add_argument("--bz", type=float, metavar="TESLA", help="solenoid field for the helix fit (default: evaluate.bz)")
    p.add_argument("--batch-size", type=int, default=256, help="events per batch (default 256)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_set_option(p, "evaluate.bz=2.0")
    p.set_defaults(func=run, outputs=("output",))


def run(args) -> int:
    import torch

    from cachefeat.cli import load_checked_config
    from cachefeat.data.loading import resolve_input
    from cachefeat.evaluation.predict import evaluate

    require_positive(args, "batch_size")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    config = load_checked_config(args.config, args.set)
    evaluate(config, args.head, args.output, source=args.source, cache=args.cache, checkpoint=args.checkpoint,
             input=resolve_input(config, args.input, args.split), bz=args.bz, batch_size=args.batch_size, device=device,
             progress=not args.no_progress)
    return 0
