"""Errors a user can fix, and which library an exception comes from.

The CLI prints a `UserError` as one line and exits with code 2; any other exception is a
library's (exit 2, `library_of` names it) or a cachefeat bug (exit 1).
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Bad input or usage: a missing file, a wrong key, an incompatible checkpoint or cache.

    The message must be one line that says what is wrong and, where possible, what to do.
    """


PROGRAMMING_ERRORS = (AssertionError, TypeError, NameError, AttributeError, KeyError, IndexError, ZeroDivisionError)
# Set on an exception raised in another process (a read worker, `data.prefetch`): what `library_of`
# said there, where its traceback was; this process sees only where it was raised again.
ORIGIN_ATTR = "cachefeat_origin"
_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep


def library_of(exc: BaseException) -> str | None:
    """The library an exception comes from ("the system" for OSError/MemoryError), or None for a
    cachefeat bug: always for the programming errors (`PROGRAMMING_ERRORS`); otherwise the module
    of its class when that is not a builtin or cachefeat's, else the module of the innermost frame
    of its traceback when that is not cachefeat's code."""
    if isinstance(exc, PROGRAMMING_ERRORS):
        return None
    if hasattr(exc, ORIGIN_ATTR):
        return getattr(exc, ORIGIN_ATTR)
    module = type(exc).__module__.split(".")[0]
    if module not in ("builtins", "cachefeat"):
        return module
    if isinstance(exc, (OSError, MemoryError)):
        return "the system"
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        return None
    return str(tb.tb_frame.f_globals.get("__name__", "a library")).split(".")[0]
