"""The base class of every error a user can fix (bad input, missing file, wrong weights, bad config).

The CLI prints these as a single ``dagan: error: ...`` line with exit status 2 and the server turns them
into JSON errors; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message alone tells the user what to fix."""
