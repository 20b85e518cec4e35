"""Shared fixtures of the test suite.

The repository root goes first on ``sys.path`` so that ``derive`` and
``generated`` import from this checkout whether pytest is started as
``python -m pytest`` or as ``pytest``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


def _random_covariance(rng: np.random.Generator, n: int, eps: float = 1e-2) -> np.ndarray:
    """A random positive-definite n x n covariance with entries of order 0.1..3.

    ``A A^T / n + eps I`` with rows of A rescaled independently, so that the
    diagonal entries differ from each other by up to a factor ~30.
    """
    A = rng.normal(size=(n, n)) * rng.uniform(0.3, 1.8, size=(n, 1))
    return A @ A.T / n + eps * np.eye(n)


@pytest.fixture(scope="session")
def random_covariance():
    """The function ``random_covariance(rng, n, eps=1e-2)`` above."""
    return _random_covariance
