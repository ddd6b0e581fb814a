"""Error types. A `UserError` is reported by the CLI as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user (a profile value, a missing file, an unknown state...)."""
