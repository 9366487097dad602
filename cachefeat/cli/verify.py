"""`cachefeat verify`: check a cache against live frozen inference (the equivalence contract)."""

from __future__ import annotations

import json
import sys

from cachefeat.cli import add_set_option, add_split_option, example_epilog, require_positive
from cachefeat.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check a cache against the live frozen backbone on a random sample of its events",
        description="Re-run the frozen backbone live on a seeded random sample of the cache's events, at "
        "two batch sizes (B and 1), and compare every cached field with the tolerance of its storage dtype; "
        "then the config's head loss and gradients on both. Also checks the fingerprint against the "
        "checkpoint, config and input, and the crc32c of every file. Exit 0: all within tolerance; "
        "1: a field is beyond tolerance (named); 2: bad input, e.g. a cache made from other inputs.",
        epilog=example_epilog(
            "cachefeat verify runs/muon/train.zarr --config configs/muon.yaml "
            "--checkpoint data/muon_stage1.ckpt --input runs/muon/train.h5",
            "cachefeat verify train.zarr --config configs/muon.yaml --checkpoint stage1.ckpt --input train.h5 "
            "--events 256 --seed 3",
        ),
    )
    p.add_argument("cache", help="cache written by `cachefeat extract`: a directory (.zarr), root://... or s3://...")
    p.add_argument("--config", required=True, help="the YAML config the cache was extracted with")
    p.add_argument("--checkpoint", required=True, help="the stage-1 checkpoint it was extracted with")
    events = p.add_mutually_exclusive_group(required=True)
    events.add_argument("--input", help="the event file (HDF5) it was extracted from")
    add_split_option(events)
    p.add_argument("--events", type=int, default=64, help="events to sample (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and of the head's weights (default 0)")
    p.add_argument("--batch-size", type=int, help="live batch size B (default: extract.batch_size)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_set_option(p, "extract.floor=0.2")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from cachefeat.cache.verify import failed_fields, format_report, verify_cache
    from cachefeat.cli import load_checked_config
    from cachefeat.data.loading import resolve_input

    require_positive(args, "events", "batch_size")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r} is not a torch device ({exc})") from exc
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    config = load_checked_config(args.config, args.set, require=("data", "model", "head"))
    source = resolve_input(config, args.input, args.split)
    report = verify_cache(config, args.cache, args.checkpoint, source, events=args.events, seed=args.seed,
                          batch_size=args.batch_size, device=device)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    failed = failed_fields(report)
    if failed:
        details = "; ".join(f"{name}: {report['fields'][name]['detail']}" for name in failed)
        print(f"cachefeat verify: failed: {', '.join(failed)} ({details})", file=sys.stderr)
        return 1
    return 0
