"""User-facing errors.

A :class:`UserError` is a problem with what the user asked for (a bad dataset spec, a missing file, an
impossible setting).  The CLI prints its message on one line and exits with status 2, without a traceback.
Messages name the problem and the fix.
"""


class UserError(Exception):
    """Bad input from the user; the CLI turns it into ``trainfluence: error: <message>`` and exit code 2."""
