"""Exceptions that map to the CLI's exit codes (see DESIGN.md, CLI contract).

Messages are one line, for the user, and never carry patient identity.
"""


class OsteoplanError(Exception):
    """Base class. ``exit_code`` is what the CLI returns."""

    exit_code = 4


class InputError(OsteoplanError):
    """Bad usage, or input that cannot be read or is unsuitable (exit 2)."""

    exit_code = 2


class NoCTSeriesError(OsteoplanError):
    """No CT series that can be analysed was found in the input (exit 3)."""

    exit_code = 3


class ModelError(OsteoplanError):
    """A model bundle is missing, corrupt or does not match its metadata (exit 2)."""

    exit_code = 2
