"""The adaptive integrator against RK4 through the plateau: prints figures, asserts nothing.

    python benchmarks/adaptive.py [--d 1e-3 1e-4 1e-5 1e-6] [--rtol 1e-6 1e-8 1e-10]
                                  [--t-max 300] [--record-every 0.5]

For the reference scenario (runtime/scenarios.py REFERENCE: anil, K = M = 2) from
the start of initial asymmetry d (``reference_init(d)``, as the ``symmetry``
study builds it), RK4 at dt = 0.01 and method="adaptive" at each rtol (atol =
rtol / 100; dt = 0.01 the first step): the largest difference over the whole
trajectory in eps_meta and Q, the right-hand-side evaluations of each (RK4: 4 per
step) and their ratio, accepted and rejected steps, the escape alpha from the
plateau (``escape_alpha``: eps_meta 0.01 below that of the exactly symmetric
start d = 0, which stays on the plateau) and the wall time (numba's cache warm:
a first run compiles before timing).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import runtime
from runtime.scenarios import REFERENCE, escape_alpha, reference_init

DT = 0.01


def run(d: float, method: str, t_max: float, every: float, **kw):
    t0 = time.perf_counter()
    tr = runtime.flow(
        "anil",
        reference_init(d),
        REFERENCE["params"],
        t_max=t_max,
        dt=DT,
        method=method,
        record_every=every,
        **kw,
    )
    return tr, time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5, 1e-6])
    ap.add_argument("--rtol", type=float, nargs="+", default=[1e-6, 1e-8, 1e-10])
    ap.add_argument("--t-max", type=float, default=300.0)
    ap.add_argument("--record-every", type=float, default=0.5)
    args = ap.parse_args(argv)
    t_max, every = args.t_max, args.record_every
    run(1e-3, "rk4", 2 * every, every)  # compile or load both loops before timing
    run(1e-3, "adaptive", 2 * every, every)
    symmetric, _ = run(0.0, "rk4", t_max, every)
    rk4_evals = 4 * round(t_max / DT)
    print(f"anil K = M = 2, alpha to {t_max:g}, records every {every:g}; RK4 dt = {DT:g}")
    head = f"{'d':>7} {'method':>16} {'max|d eps_meta|':>16} {'max|d Q|':>10} {'rhs evals':>10} {'ratio':>7}"
    print(head + f" {'acc/rej':>9} {'escape alpha':>13} {'seconds':>8}")
    for d in args.d:
        ref, sec = run(d, "rk4", t_max, every)
        esc = escape_alpha(ref, symmetric)
        print(
            f"{d:7.0e} {'rk4':>16} {'':>16} {'':>10} {rk4_evals:10d} {1:7.1f} {'':>9} {esc:13.6f} {sec:8.3f}"
        )
        for rtol in args.rtol:
            tr, sec = run(d, "adaptive", t_max, every, rtol=rtol, atol=rtol / 100)
            md = tr.metadata
            de = np.abs(tr.eps_meta - ref.eps_meta).max()
            dq = np.abs(tr.Q - ref.Q).max()
            n = md["rhs_evaluations"]
            steps = f"{md['steps_accepted']}/{md['steps_rejected']}"
            label = f"adaptive {rtol:.0e}"
            print(
                f"{d:7.0e} {label:>16} {de:16.2e} {dq:10.2e} {n:10d} {rk4_evals / n:7.1f} {steps:>9} "
                f"{escape_alpha(tr, symmetric):13.6f} {sec:8.3f}"
            )


if __name__ == "__main__":
    main()
