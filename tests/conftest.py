"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Taleqani development images, or skip: they are never part of the repository."""
    base = Path(os.environ.get("ALLCORE_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
    root = base / "all-taleqani"
    if not (root / "Original").is_dir():
        pytest.skip(f"real data not found at {root} (set ALLCORE_SHARED_DATA)")
    return root
