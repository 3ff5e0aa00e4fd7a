"""The user-facing error base class.

An input the user can fix (a config value, a file, a flag, a sweep name) raises a subclass of
:class:`UserError` whose message is one line naming the input and the fix; ``mode-cl`` prints it
and exits 2. Every other exception is a bug or an outage and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad user input, reported as one line (``mode-cl`` exits 2)."""
