"""`cachefeat info`: what a cache holds, its size against a dense layout, its fingerprint."""

from __future__ import annotations

import argparse
import json

from cachefeat.cli import example_epilog


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a cache: events, sizes, compression, fingerprint",
        description="Describe a cache: event/hit/query/pair counts, bytes on disk per array and per event, "
        "compression, the equivalent dense float32 size, dtypes, fingerprint and settings.",
        epilog=example_epilog(
            "cachefeat info runs/muon/cache.zarr", "cachefeat info runs/muon/cache.zarr --json",
            "cachefeat info root://eos.example.org//eos/user/me/train.zarr --verify"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("cache", help="cache directory (.zarr), root://host//path or s3://bucket/prefix")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--verify", action="store_true", help="also check the crc32c of every file (reads the whole cache)"
    )
    parser.set_defaults(func=run)


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def format_summary(s: dict) -> str:
    """The human-readable table of a `cache_summary`."""
    E = s["num_events"]
    lines = [
        f"cache        {s['path']}  (complete, format {s['format_version']}, "
        + ("metadata checksummed)" if s["metadata_checksummed"]
           else "no checksums.json: completed before metadata checksums, its zarr.json files are unchecked)"),
        f"events       {E} in {s['num_blocks']} blocks of {s['block_size']}",
    ]
    for name in ("hits", "queries", "pairs"):
        c = s["counts"][name]
        lines.append(f"{name:<12} {c['total']} total, {c['per_event']:.2f} per event (max {c['max']})")
    lines += [
        f"raw fields   {' '.join(s['raw_fields'])}",
        f"targets      {' '.join(s['particle_fields'])}",
        f"embedding    dim {s['dim']}, stored as {s['embed_dtype']}",
        "",
        f"{'array':<26} {'dtype':>9} {'on disk':>11} {'decoded':>11} {'ratio':>6}",
    ]
    b = s["bytes"]
    rows: dict[str, list] = {}
    for key, stored in b["stored"].items():
        group = key.split("/")[0]
        name = (
            key
            if group in ("hits", "queries", "pairs")
            else f"{group} (all arrays)"
            if group != "metadata"
            else key
        )
        dtype = s["dtypes"].get(key, "int64" if group == "events" else "json")
        row = rows.setdefault(name, [dtype, 0, 0])
        row[1] += stored
        row[2] += b["decoded"].get(key, 0)
    for name in sorted(rows, key=lambda n: (n == "metadata", n)):
        dtype, stored, decoded = rows[name]
        ratio = f"{decoded / stored:6.2f}" if decoded and stored else ""
        lines.append(
            f"{name:<26} {dtype:>9} {_bytes(stored):>11} {_bytes(decoded) if decoded else '':>11} {ratio:>6}"
        )
    ratio = f"{b['compression_ratio']:.2f}" if b["compression_ratio"] else ""
    lines += [
        f"{'total':<26} {'':>9} {_bytes(b['stored_total']):>11} {_bytes(b['decoded_total']):>11} {'':>6}",
        f"per event    {_bytes(b['per_event'])} on disk (compression ratio of the arrays {ratio or 'n/a'})",
    ]
    dense = s["dense_float32"]
    if dense is None:
        lines.append("dense f32    n/a (the cache has no n_valid_hits metric)")
    else:
        lines.append(
            f"dense f32    {_bytes(dense['per_event'])} per event; the cache is "
            f"{dense['cache_over_dense']:.3f}x of it"
            if dense["cache_over_dense"] is not None
            else "dense f32    0 B"
        )
    if s["metric_totals"]:
        lines.append("metrics      " + ", ".join(f"{k}={v}" for k, v in s["metric_totals"].items()))
    lines.append("")
    fp = s["fingerprint"]
    lines += [f"fingerprint  {k}: {v}" for k, v in fp.items() if not isinstance(v, dict)]
    for group in ("settings", "versions"):
        if isinstance(fp.get(group), dict):
            lines.append(f"fingerprint  {group}: " + ", ".join(f"{k}={v}" for k, v in fp[group].items()))
    lines.append("settings     " + ", ".join(f"{k}={v}" for k, v in s["settings"].items()))
    return "\n".join(lines)


def run(args) -> int:
    from cachefeat.cache import CacheReader, cache_summary

    reader = CacheReader(args.cache)
    if args.verify:
        reader.verify()
    summary = cache_summary(reader)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
