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


def pytest_sessionstart(session):
    """Before the workers of a whole-suite run over several processes come up (the
    README's test command, CI), the slowest kernels are compiled into numba's cache
    once, in parallel (tests/compile_ahead.py); otherwise two workers would compile the
    same kernel at the same time. Not in a worker, a run in one process, or a run of
    chosen tests (a path or an expression among the arguments)."""
    import importlib.util
    import subprocess
    import time

    config = session.config
    if hasattr(config, "workerinput") or not (getattr(config.option, "numprocesses", 0) or 0) >= 2:
        return
    if config.option.collectonly:
        return
    if any(not a.startswith("-") for a in config.invocation_params.args):
        return
    script = Path(__file__).resolve().parent / "compile_ahead.py"
    spec = importlib.util.spec_from_file_location("compile_ahead", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    start = time.perf_counter()
    procs = {g: subprocess.Popen([sys.executable, str(script), g]) for g in module.GROUPS}
    failed = [g for g, p in procs.items() if p.wait() != 0]
    if failed:  # the tests that need them compile them, and fail there if they must
        print(f"\ncompile ahead: group(s) {', '.join(failed)} failed", file=sys.stderr)
    print(f"\nkernels compiled or loaded ahead of the workers in {time.perf_counter() - start:.0f} s")
