"""``runtime.kernels.needs_compiling``, which decides whether a run says that it compiles
before it starts: true without a cache, false with numba's fresh cache, and true again
when the source changed since (a regenerated kernel, whose old index numba ignores)."""

from __future__ import annotations

import importlib.util
import itertools

from runtime.kernels import needs_compiling

SOURCE = """
from numba import njit


@njit(cache=True)
def f(x):
    return x + 1
"""
_names = itertools.count()


def load(path):
    spec = importlib.util.spec_from_file_location(f"notice_probe_{next(_names)}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.f


def test_needs_compiling_follows_numba_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    path = tmp_path / "probe.py"
    path.write_text(SOURCE)
    f = load(path)
    assert needs_compiling(f)  # no cache yet
    assert f(1) == 2  # compiles and writes the cache
    assert not needs_compiling(f)  # compiled in this process
    assert not needs_compiling(load(path))  # a new process would load the cache
    path.write_text(SOURCE + "\n\n# regenerated\n")
    assert needs_compiling(load(path))  # the index is of the old file
