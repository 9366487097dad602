"""The `cachefeat` command: one subcommand module per pipeline step.

Each module in this package defines `add_parser(subparsers)`, which registers its
subcommand and sets `func` to a callable taking the parsed arguments and returning an
exit code, and `outputs`, the names of the arguments that are paths it writes: an output
that did not exist before a command that fails (any exception but Ctrl-C, which leaves a
resumable state) is removed, so a failed command leaves nothing new behind; an existing
output is never touched by this. Only the outputs named in `url_outputs` (extract's cache)
may be a URL (a remote cache, `cachefeat.cache.store`); any other output given as a URL is a
usage error before any work starts (it would otherwise become a local directory `s3:/...`).
A URL output is not removed: what a failed extraction left there is resumable with --resume.
Under a multi-process launch, the torch.distributed process group is destroyed before `main`
returns (`end_process_group`), except after Ctrl-C.

Exit codes, each failure one line on stderr (`--debug` re-raises it with its traceback):
- 0: success;
- 2: bad input or usage: a `UserError`, an argparse usage error, or an exception a library
  raised (its class comes from a library, e.g. h5py or `torch.OutOfMemoryError`, or it was
  raised inside a library's code and is not a programming error), or an `OSError` /
  `MemoryError` (the file system or the machine); the line names the library and the
  exception and ends with the `--debug` hint;
- 1: an internal failure, i.e. a bug in cachefeat: any other exception, and always the
  programming errors (`AssertionError`, `TypeError`, `NameError`, `AttributeError`, `KeyError`,
  `IndexError`, `ZeroDivisionError`), wherever raised; the line says "internal error";
- 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
from pathlib import Path

from cachefeat.errors import UserError, library_of

log = logging.getLogger(__name__)

COMMANDS = ["simulate", "pretrain", "extract", "info", "train", "sweep", "evaluate", "verify", "demo"]


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit code 2; epilog examples kept verbatim."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _check_value(self, action, value):
        # argparse's check of `choices` (a command, --dtype, --preset ...) with a did-you-mean.
        if action.choices is not None and value not in action.choices:
            from cachefeat.config import did_you_mean

            options = [str(c) for c in action.choices]
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{did_you_mean(str(value), options)}; "
                f"choose from {', '.join(options)}"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cachefeat",
        description="Cache a frozen tracking backbone's outputs once; train the regression head over the cache.",
        epilog="Run `cachefeat demo` for the whole chain on a small simulated set.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"cachefeat.cli.{name}").add_parser(sub)
    return parser


def add_set_option(p, example: str) -> None:
    """The repeatable `--set KEY=VALUE` dotted config override, with an example for `--help`."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"dotted config override, e.g. --set {example} (repeatable)")


def add_split_option(p, flag: str = "--split", what: str = "events") -> None:
    """`--split train|val|test`: the split of the config's hepattn data module (data.module) to read."""
    p.add_argument(flag, choices=["train", "val", "test"],
                   help=f"the {what} as a split of the config's data module (data.module), in place of an HDF5 file")


def require_positive(args, *names: str) -> None:
    """UserError for the first of the integer options `names` given with a value below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def load_checked_config(path, overrides: list[str] | None = None, require: tuple[str, ...] = ()) -> dict:
    """`load_config`, then every setting checked before any work starts (`check_config`)."""
    from cachefeat.config import load_config

    config = load_config(path, overrides, require)
    check_config(config)
    return config


def check_config(config: dict) -> None:
    """Refuse any setting no command would accept, whichever command reads it.

    Sections: unknown names (did-you-mean), then each section's keys, types and ranges as its own
    module declares them (DEFAULTS / ALLOWED). Blocks: cachefeat's own model and head classes are
    checked against their signatures and `ALLOWED` without being built; a foreign model (a hepattn
    class_path tree) is checked by jsonargparse when a command builds it.
    """
    from cachefeat.cache.extract import EXTRACT_ALLOWED, EXTRACT_DEFAULTS
    from cachefeat.config import check_block, did_you_mean, section
    from cachefeat.data.loading import data_settings
    from cachefeat.evaluation.predict import EVALUATE_ALLOWED, EVALUATE_DEFAULTS
    from cachefeat.model import hepattn
    from cachefeat.training import pretrain, train
    from cachefeat.training.sweep import sweep_settings

    sections = {
        "data": data_settings,
        "model": lambda c: check_block(c["model"], "model") if _own_class(c["model"]) else None,
        "head": lambda c: check_block(c["head"], "head"),
        "hepattn": hepattn.settings,
        "extract": lambda c: section(c, "extract", EXTRACT_DEFAULTS, EXTRACT_ALLOWED),
        "train": lambda c: section(c, "train", train.DEFAULTS, train.ALLOWED),
        "pretrain": lambda c: section(c, "pretrain", pretrain.DEFAULTS, pretrain.ALLOWED),
        "evaluate": lambda c: section(c, "evaluate", EVALUATE_DEFAULTS, EVALUATE_ALLOWED),
        "sweep": sweep_settings,
    }
    for name in config:
        if name not in sections:
            raise UserError(f"unknown config section '{name}'{did_you_mean(str(name), sections)}; "
                            f"sections: {', '.join(sections)}")
    for name, check in sections.items():
        if name in config:
            check(config)


def _own_class(block) -> bool:
    return isinstance(block, dict) and str(block.get("class_path", "")).startswith("cachefeat.")


def example_epilog(*examples: str) -> str:
    """Format `--help` examples for a subcommand."""
    return "example:\n" + "\n".join(f"  {line}" for line in examples)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # Our INFO messages; other libraries' only from WARNING up (Accelerate logs every checkpoint save).
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("cachefeat").setLevel(logging.DEBUG if args.debug else logging.INFO)
    fresh = [Path(p) for p in (getattr(args, name) for name in getattr(args, "outputs", ()))
             if p is not None and not _is_url(p) and not os.path.lexists(p)]
    interrupted = False
    try:
        _check_local_outputs(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        interrupted = True
        print(f"cachefeat {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        for path in fresh:
            remove_path(path)
        if args.debug:
            raise
        if isinstance(exc, UserError):
            print(f"cachefeat {args.command}: error: {exc}", file=sys.stderr)
            return 2
        library = library_of(exc)
        what = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        if library is None:
            print(f"cachefeat {args.command}: internal error (a bug in cachefeat, please report it): {what}; "
                  "rerun with --debug for the traceback", file=sys.stderr)
            return 1
        print(f"cachefeat {args.command}: error: {what} (from {library}; rerun with --debug for the traceback)",
              file=sys.stderr)
        return 2
    finally:
        if not interrupted:  # after Ctrl-C, exit at once: the destroy would wait for a collective in flight
            end_process_group()


def end_process_group() -> None:
    """Destroy torch.distributed's process groups if the command created them (a multi-process launch).

    Joins the backend's worker threads while the interpreter is alive. Left to interpreter exit,
    a gloo worker thread may still be releasing the last collective's tensors, which takes the
    GIL during finalization: the process then aborts (SIGABRT, "terminate called without an
    active exception") after the command succeeded. No-op when torch.distributed was never
    imported or no group exists; a failure to destroy is logged (debug), never raised.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:  # the command's own result stands
        log.debug("destroying the process group at exit failed", exc_info=True)


def _is_url(location: str) -> bool:
    from cachefeat.cache.store import is_url

    return is_url(location)


# Arguments that name local files the commands read: configs, checkpoints (stage 1, head), event files.
LOCAL_INPUTS = ("config", "checkpoint", "head", "input", "val_input", "train", "val")


def _check_local_outputs(args) -> None:
    """UserError for an output given as a URL where the command writes local files only, and for a
    URL as a config, checkpoint or event file (read from local paths only)."""
    for name in LOCAL_INPUTS:
        value = getattr(args, name, None)
        if value is not None and _is_url(str(value)):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value} is a URL, but configs, checkpoints and event files are read from "
                            "local paths (only caches may be at root:// or s3://)")
    for name in getattr(args, "outputs", ()):
        value = getattr(args, name)
        if value is not None and name not in getattr(args, "url_outputs", ()) and _is_url(str(value)):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value} is a URL, but `cachefeat {args.command}` writes local files only "
                            "(a cache at root:// or s3:// is written by `cachefeat extract --output`)")


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree if it is there (errors ignored: best effort on failure)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)
