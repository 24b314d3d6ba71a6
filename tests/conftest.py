"""Shared test set-up."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_annotator_networks():
    """After each test module, the registry's annotators forget the networks they built: a network
    annotator keeps its weights for the next call (hundreds of MB for MiDaS or OpenPose), which a
    long suite would otherwise hold all at once."""
    yield
    from controlnet.annotators import ANNOTATORS

    for annotator in ANNOTATORS.values():
        annotator.release()
