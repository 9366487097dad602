"""Which events a command reads: a cachefeat HDF5 event file (`--input`) or a split of the
config's hepattn data module (`data.module`, `--split`)."""

from __future__ import annotations

from pathlib import Path

from cachefeat.config import at_least, section
from cachefeat.data.datamodule import DataModuleEvents, DataSplit
from cachefeat.errors import UserError

# The `data` section. hit_fields / particle_fields (required): the names the backbone and the head
# read; max_hits: events with more hits are cut to the first max_hits (null: none cut); module: a
# hepattn data module block (class_path/init_args); seed and particle_sources: see DataModuleEvents.
DATA_DEFAULTS = {"hit_fields": None, "particle_fields": None, "max_hits": None, "seed": 0, "module": None,
                 "particle_sources": None}
DATA_ALLOWED = {"max_hits": at_least(1, integer=True, none=True), "seed": at_least(0, integer=True)}


def data_settings(config: dict) -> dict:
    """The `data` section merged over DATA_DEFAULTS; the field lists must be non-empty lists of names."""
    data = section(config, "data", DATA_DEFAULTS, DATA_ALLOWED)
    for key in ("hit_fields", "particle_fields"):
        names = data[key]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise UserError(f"config needs data.{key}, a non-empty list of field names, not {names!r}")
    for key in ("module", "particle_sources"):
        if data[key] is not None and not isinstance(data[key], dict):
            raise UserError(f"data.{key} must be a mapping, not {data[key]!r}")
    return data


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

    data = data_settings(config)
    fields = (list(data["hit_fields"]), list(data["particle_fields"]), data["max_hits"])
    if isinstance(source, DataSplit):
        if not has_datamodule(config):
            raise UserError(f"{source} needs a config with a data module (data.module)")
        return DataModuleEvents(data["module"], source.name, *fields, seed=data["seed"],
                                particle_sources=data["particle_sources"])
    if source is None:
        raise UserError("no events given")
    return EventFile(Path(source), *fields)
