"""Errors that reach the user as one clear line and a non-zero exit code (never a traceback)."""


class SpecplanError(Exception):
    """Something the user can fix: a bad file, an impossible request, a missing model.

    The message is one line saying what is wrong and what to do. ``exit_code`` 2 means bad input.
    """

    exit_code = 2


class ContractError(SpecplanError):
    """A JSON contract file (profile, plan, timeline, model config) is malformed."""


class InfeasibleError(SpecplanError):
    """The request cannot fit: the message says what does not fit and by how much."""
