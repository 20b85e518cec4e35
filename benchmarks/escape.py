"""Linear stability against flows: the escape delay per decade of the initial asymmetry.

    python benchmarks/escape.py [--d 1e-4 1e-5 1e-6 1e-7] [--t-max 400]

For each configuration (the anil reference scenario at first and second order and
with a larger inner rate, and the soft committee machine, K = M = 2), adaptive flows
from the nearly symmetric start of asymmetry d (``reference_init(d)``: Q0 = 0.01 I,
R0 = 0.01 + d [[1, -1], [-1, 1]]) and from d = 0: the escape alpha of each
(``escape_alpha``: the metric 0.01 below that of the symmetric flow; for scm, 0.001,
its plateau being lower), the least-squares slope against log10(1/d), and what
``runtime.analyze`` predicts from the flow at the middle d: ln(10) / lambda_max at
the plateau's fixed point, with |rhs| there and the wall time of the analysis.
Prints figures, asserts nothing (tests/test_analyze.py holds the checks).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import runtime
from runtime import Init
from runtime.scenarios import REFERENCE, escape_alpha, reference_init

CONFIGS = [
    ("anil, reference (order 1)", "anil", {}, 0.01),
    ("anil, order 2", "anil", {"order": 2}, 0.01),
    ("anil, alpha_in = 1.5", "anil", {"alpha_in": 1.5}, 0.01),
    ("anil, eps_B = 0.5", "anil", {"eps_B": 0.5}, 0.01),
    ("scm, eta = 1", "scm", {"eta": 1.0}, 0.001),
]


def start(model: str, d: float) -> Init:
    init = reference_init(d)
    return init if model == "anil" else Init(init.Q, init.R, init.T, {})


def escape(fl, sym, metric: str, margin: float) -> float:
    """escape_alpha's rule on any metric: the first alpha where ``fl`` is ``margin``
    below the symmetric flow (linear between records)."""
    if metric == "eps_meta":
        return escape_alpha(fl, sym, margin)
    gap = sym.arrays[metric] - margin - fl.arrays[metric]
    idx = np.nonzero(gap > 0)[0]
    if idx.size == 0:
        return float("nan")
    i = int(idx[0])
    a0, a1, g0, g1 = fl.alpha[i - 1], fl.alpha[i], gap[i - 1], gap[i]
    return float(a0 + (a1 - a0) * (-g0) / (g1 - g0))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=float, nargs="+", default=[1e-4, 1e-5, 1e-6, 1e-7])
    ap.add_argument("--t-max", type=float, default=400.0)
    args = ap.parse_args(argv)
    ds = sorted(args.d, reverse=True)
    middle = ds[len(ds) // 2]
    print(
        f"escape alpha per decade of d, flows at d = {', '.join(f'{d:g}' for d in ds)} (adaptive, rtol 1e-8)"
    )
    head = f"{'configuration':<28} {'escape alphas':<34} {'measured':>9} {'predicted':>9} {'error':>7}"
    print(head + f" {'lambda_max':>10} {'|rhs|':>8} {'analyze s':>9}")
    for label, model, params, margin in CONFIGS:
        values = {**REFERENCE["params"], **params} if model == "anil" else params
        metric = "eps_meta" if model == "anil" else "eps_g"
        runs = {
            d: runtime.flow(
                model, start(model, d), values, t_max=args.t_max, dt=0.01, method="adaptive", record_every=0.5
            )  # fmt: skip
            for d in [0.0, *ds]
        }
        esc = np.array([escape(runs[d], runs[0.0], metric, margin) for d in ds])
        ok = np.isfinite(esc)
        slope = np.polyfit(np.log10(1 / np.array(ds))[ok], esc[ok], 1)[0] if ok.sum() >= 2 else float("nan")
        t0 = time.perf_counter()
        res = runtime.analyze(runs[middle])
        seconds = time.perf_counter() - t0
        left = [pa.fixed_point for pa in res.plateaus if pa.plateau.left and pa.fixed_point is not None]
        if not left:
            print(f"{label:<28} {np.array2string(esc, precision=1):<34} {slope:>9.3g}  (no plateau left)")
            continue
        fp = left[0]
        err = (fp.escape_per_decade - slope) / slope
        print(
            f"{label:<28} {np.array2string(esc, precision=1):<34} {slope:>9.3g} {fp.escape_per_decade:>9.3g} "
            f"{err:>+7.1%} {fp.lambda_max:>10.4g} {fp.rhs_norm:>8.1e} {seconds:>9.2f}"
        )


if __name__ == "__main__":
    main()
