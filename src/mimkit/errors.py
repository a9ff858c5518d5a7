"""User errors: bad input that the CLI reports in one line (naming the input and the fix) with
exit code 2. Anything else is a bug and shows a traceback (with ``--debug`` or ``MIMKIT_DEBUG``)."""

from __future__ import annotations


class MimkitError(Exception):
    """Base of every user error; its message names the input and how to fix it."""


class DataError(MimkitError, ValueError):
    """A data set, folder, image or label set that cannot be used as asked."""


class RunError(MimkitError):
    """A run folder that cannot be used as asked: it holds another run, is locked by a live
    process, is not writable, or a resume would change what its checkpoints mean."""
