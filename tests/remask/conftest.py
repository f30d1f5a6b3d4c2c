"""Fixtures of the ReMask tests."""

from __future__ import annotations

import pytest

FORWARD_LAYOUTS = ("shared_prefix", "stacked")


@pytest.fixture(params=FORWARD_LAYOUTS, ids=FORWARD_LAYOUTS)
def forward_layout(request):
    """Each of ReMask's two-pass forward layouts, named explicitly (``auto`` picks ``shared_prefix`` on the tiny
    StableLM models): an exactness test that takes it runs once per layout."""
    return request.param
