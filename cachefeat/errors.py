"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input or usage: a missing file, a wrong key, an incompatible checkpoint or cache.

    The message must be one line that says what is wrong and, where possible, what to do.
    """
