"""CheckpointError, the one error of reading and loading model files, and how its messages name
what they are about: one line, for the user, naming the file and what was expected."""

from __future__ import annotations

from collections.abc import Iterable

# Most names (keys, files) given in a message; the counts are always given in full.
_SHOWN = 5


class CheckpointError(ValueError):
    """A model file that cannot be used as asked; the message is one line, for the user."""


def short_list(names: Iterable[str]) -> str:
    """The first few of ``names``, and how many there are in all when some are left out."""
    names = list(names)
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), or the error's type."""
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
