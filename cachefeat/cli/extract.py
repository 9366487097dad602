"""`cachefeat extract`: run the frozen backbone once and write the feature cache (phase 1)."""

from __future__ import annotations

import logging

from cachefeat.cli import add_set_option, add_split_option, example_epilog

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="run the frozen stage-1 backbone once and cache what the head needs",
        description="Run the frozen stage-1 backbone over an event file once and write a Zarr cache of "
        "the regression head's inputs. Options left out come from the config's `extract` section.",
        epilog=example_epilog(
            "cachefeat extract --config configs/muon.yaml --checkpoint stage1.ckpt "
            "--input train.h5 --output train.zarr",
            "accelerate launch -m cachefeat extract ... --resume   # several processes, or finish a killed run",
            "cachefeat extract ... --output s3://bucket/train.zarr  # S3: endpoint, credentials from AWS_* variables",
        ),
    )
    p.add_argument("--config", required=True, help="YAML config (data, model, head, extract sections)")
    p.add_argument("--checkpoint", required=True,
                   help="stage-1 checkpoint (from `cachefeat pretrain`, or the Lightning .ckpt of hepattn's training)")
    events = p.add_mutually_exclusive_group(required=True)
    events.add_argument("--input", help="event file (HDF5, from `cachefeat simulate`)")
    add_split_option(events)
    p.add_argument("--output", required=True,
                   help="cache to write (Zarr v3): a directory, root://host//path (xrootd) or s3://bucket/prefix")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="finish an interrupted extraction (same settings); starts it when the cache does not "
                      "exist yet, so a retried job can always pass --resume")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    p.add_argument("--batch-size", type=int, help="events per forward batch (default: extract.batch_size, 64)")
    p.add_argument("--block-size", type=int, help="events per commit block (default: extract.block_size, 4096)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="storage dtype of the embeddings; logits and targets stay float32 (default float32)",
    )
    p.add_argument(
        "--floor",
        type=float,
        help="keep pairs with probability >= FLOOR (default: head.init_args.assignment_threshold)",
    )
    p.add_argument("--keep-hits", choices=["assigned", "all"], help="store hits in some pair, or all valid hits")
    p.add_argument("--keep-queries", choices=["all", "matched"], help="store every query, or matched ones only")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="forward precision (default fp32)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--read-workers", type=int, metavar="N",
                   help="processes that read a data module's events (--split) beside the forward; 0 reads them "
                   "on a thread (default: extract.read_workers, 1)")
    add_set_option(p, "extract.batch_size=16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, outputs=("output",), url_outputs=("output",))


def run(args) -> int:
    from cachefeat.cache.extract import extract
    from cachefeat.cli import load_checked_config
    from cachefeat.data.loading import resolve_input

    config = load_checked_config(args.config, args.set)
    source = resolve_input(config, args.input, args.split)
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "create"
    summary = extract(
        config,
        args.checkpoint,
        source,
        args.output,
        mode=mode,
        batch_size=args.batch_size,
        block_size=args.block_size,
        dtype=args.dtype,
        floor=args.floor,
        keep_hits=args.keep_hits,
        keep_queries=args.keep_queries,
        precision=args.precision,
        read_workers=args.read_workers,
        device=args.device,
        progress=not args.no_progress,
    )
    if summary["rank"] != 0:
        return 0
    log.info(
        "extracted %d events (%d blocks written, %d already committed) in %.1f s, %.0f events/s: "
        "%d hits, %d queries, %d pairs, %.1f MB -> %s",
        summary["events"],
        summary["blocks_written"],
        summary["blocks_skipped"],
        summary["seconds"],
        summary["events_per_s"],
        summary["hits"],
        summary["queries"],
        summary["pairs"],
        summary["bytes_written"] / 1e6,
        summary["output"],
    )
    return 0
