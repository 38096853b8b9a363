"""Paths the tests need, independent of how deep a test file lies."""

from pathlib import Path

#: The repository root (``pyproject.toml``, ``docs/``, ``deploy/``, ``tests/``).
REPO = Path(__file__).resolve().parents[2]
