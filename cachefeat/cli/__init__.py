"""The `cachefeat` command: one subcommand module per pipeline step.

Each module in this package defines `add_parser(subparsers)`, which registers its
subcommand and sets `func` to a callable taking the parsed arguments and returning an
exit code. Exit codes: 0 success, 2 bad input or usage (one line, no traceback unless
`--debug`), 1 internal failure.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cachefeat.errors import UserError

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
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"cachefeat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cachefeat {args.command}: interrupted", file=sys.stderr)
        return 130
