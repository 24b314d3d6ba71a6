"""(being written: issue 18)"""

from __future__ import annotations

from .base import Annotator

ANNOTATORS: tuple[Annotator, ...] = ()
