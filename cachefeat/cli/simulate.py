"""`cachefeat simulate`: write simulated events from a detector preset, as cachefeat's HDF5 event
file or (`--layout atlas-muon`) as the directory hepattn's `AtlasMuonDataModule` reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from cachefeat.cli import example_epilog
from cachefeat.data.presets import PRESETS

LAYOUTS = ("cachefeat", "atlas-muon")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _count(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate detector events into an HDF5 event file (or hepattn's ATLAS-muon layout)",
        description="Simulate charged particles in a solenoid detector (helices, multiple scattering, "
        "smearing, inefficiency, noise) and write the hits and truth particles as a ragged HDF5 file. "
        "The same preset and seed give the same file content. With --layout atlas-muon the same events "
        "are written as the directory that hepattn's AtlasMuonDataModule reads (dummy_data: false; "
        "set its train_dir / val_dir / test_dir to such directories).",
        epilog=example_epilog(
            "cachefeat simulate --preset muon --events 20000 --seed 1 --output train.h5",
            "cachefeat simulate --preset trackml --events 100 --seed 2 --output val.h5",
            "cachefeat simulate --preset muon --events 20000 --seed 1 --layout atlas-muon --output runs/hep/train",
        ),
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="detector and event preset")
    p.add_argument("--events", required=True, type=_count, help="number of events")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    p.add_argument("--output", required=True, help="HDF5 file to write (a directory with --layout atlas-muon)")
    p.add_argument("--layout", choices=LAYOUTS, default="cachefeat",
                   help="cachefeat: an HDF5 event file (default); atlas-muon: hepattn's ATLAS-muon data directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, outputs=("output",))


def run(args) -> int:
    from cachefeat.data.atlas_muon import write_atlas_muon_dir
    from cachefeat.data.simulate import write_event_file
    from cachefeat.errors import UserError

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise UserError(f"output directory {output.parent} does not exist")
    preset = PRESETS[args.preset]
    progress = not args.no_progress and args.events > preset.events_per_chunk
    if args.layout == "atlas-muon":
        if output.is_file():
            raise UserError(f"{output} is a file; --layout atlas-muon writes a directory")
        write_atlas_muon_dir(output, preset, args.events, args.seed, progress=progress)
        return 0
    write_event_file(output, preset, args.events, args.seed, progress=progress)
    return 0
