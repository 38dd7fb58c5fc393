"""The one error type of the training package, so every module can raise it without importing the loop."""

from __future__ import annotations

from dagan.errors import UserError


class TrainingError(UserError, RuntimeError):
    """A training run that cannot start or resume as asked (bad run folder, missing depth checkpoint).

    A :class:`~dagan.errors.UserError`: the CLI prints its one-line message instead of a traceback, so
    each message says what is wrong *and* what to do about it."""
