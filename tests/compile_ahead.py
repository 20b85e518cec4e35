"""Compile the slowest kernels into numba's cache before the test workers start.

With the suite spread over worker processes (pytest-xdist, ``-n auto``), two workers
whose first tests both need ``anil``'s kernels would each compile them, at the same
time, on an empty cache (a clean clone, CI): about 100 s each for the right-hand side
alone. ``tests/conftest.py`` runs this script once per group, the groups in parallel,
before the workers come up, so that each kernel is compiled once and the workers load
it from the cache. On a filled cache each group only loads (a few seconds).

    python tests/compile_ahead.py GROUP     (GROUP: one of GROUPS)

Each entry is a short flow with the arguments the tests use, so that the compiled
signatures are the ones they call. The cold figures (one process, 2-core machine):
rhs and Euler loop 104 s, RK4 loop 19 s, the adaptive loop 20 s, the outlined order-2
block 92 s; the linear activation's rhs 100 s and outlined block 93 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (model, activation, parameters, method): the two groups take about as long. Not the
# threaded loops: numba does not cache them, each process compiles its own.
GROUPS = {
    "erf": [
        ("anil", "erf", {}, "euler"),
        ("anil", "erf", {}, "rk4"),
        ("anil", "erf", {}, "adaptive"),
        ("anil", "erf", {"order": 2, "n_s": 10}, "euler"),
    ],
    "linear": [
        ("anil", "linear", {}, "euler"),
        ("anil", "linear", {"order": 2, "n_s": 10}, "euler"),
    ],
}


def run(group: str) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import runtime

    init = runtime.sampled_init("anil", 3, 2, 500, seed=1)
    for model, activation, params, method in GROUPS[group]:
        kw = {"t_max": 0.02} if method == "adaptive" else {"t_max": 0.02, "dt": 0.01}
        runtime.flow(model, init, params, method=method, activation=activation, parallel=False, **kw)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in GROUPS:
        sys.exit(f"usage: python tests/compile_ahead.py GROUP, GROUP one of {', '.join(GROUPS)}")
    run(sys.argv[1])
