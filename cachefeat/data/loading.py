"""Which events a command reads: a cachefeat HDF5 event file (`--input`) or a split of the
config's hepattn data module (`data.module`, `--split`)."""

from __future__ import annotations

from pathlib import Path

from cachefeat.data.datamodule import DataModuleEvents, DataSplit
from cachefeat.errors import UserError


def has_datamodule(config: dict) -> bool:
    return isinstance((config.get("data") or {}).get("module"), dict)


def resolve_input(config: dict, path: str | None, split: str | None, flag: str = "--input",
                  split_flag: str = "--split"):
    """The event source a command was given: a path, a `DataSplit`, or None when neither was given.

    A config with a data module takes `split_flag` and refuses `flag`; one without takes `flag` only.
    """
    if has_datamodule(config):
        if path is not None:
            raise UserError(f"{flag} is for HDF5 event files; this config reads events from its data module "
                            f"(data.module): give {split_flag} train, val or test instead")
        return DataSplit(split) if split is not None else None
    if split is not None:
        raise UserError(f"{split_flag} needs a config with a data module (data.module); give {flag} FILE.h5 instead")
    return path


def open_events(config: dict, source):
    """An `EventFile` (for a path) or a `DataModuleEvents` (for a `DataSplit`) with the config's fields."""
    from cachefeat.data.events import EventFile

    data = config.get("data") or {}
    for key in ("hit_fields", "particle_fields"):
        if key not in data:
            raise UserError(f"config needs data.{key}")
    fields = (list(data["hit_fields"]), list(data["particle_fields"]), data.get("max_hits"))
    if isinstance(source, DataSplit):
        if not has_datamodule(config):
            raise UserError(f"{source} needs a config with a data module (data.module)")
        return DataModuleEvents(data["module"], source.name, *fields, seed=int(data.get("seed", 0)),
                                particle_sources=data.get("particle_sources"))
    if source is None:
        raise UserError("no events given")
    return EventFile(Path(source), *fields)
