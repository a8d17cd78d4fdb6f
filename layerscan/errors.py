"""The one exception type for mistakes a user can make.

The CLI prints a ``UserError`` as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix: unknown model, empty prompt file, a pattern matching nothing."""


class NonFiniteOutput(UserError):
    """A generation produced NaN or inf; inside a search this marks the trial as failed."""
