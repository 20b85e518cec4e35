"""The Monte Carlo over tasks and support sets (finite n_s): prints figures, asserts nothing.

    python benchmarks/finite_support.py [--n 1000] [--n-s 1 3 10 100 1000] [--eps-B 0 0.5]

1. The simulator's eps_meta with finite n_s (``realised_metrics``, what each record
   of ``runtime.simulate`` costs): at a network of N units realising the validation
   start (runtime/scenarios.py ``validation_init``, s = 1.5), the time per record
   with the default number of tasks, the estimate and its Monte Carlo s.e.m., and
   the s.e.m. without the control variate (the plain mean of the same draws).
2. ``expected_update`` at the validation start (order 1, n_s given): time, and the
   largest s.e.m. of dQ, dR, da and eps_meta for 2000 tasks.
Derivations (sympy, once per setting) are done before timing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from derive.models import get_model
from runtime.init import realise
from runtime.scenarios import validation_init
from runtime.simulate_meta import (
    MetaStep,
    _mean_sem,
    default_metric_tasks,
    draw_adapted,
    expected_update,
    realised_covariances,
    realised_metrics,
)

SPEC = get_model("anil")


def plain_sem(step, W, B, vectors, n, rng) -> float:
    """The s.e.m. of the plain Monte Carlo mean of eps_meta (no control variate)."""
    K, M = W.shape[0], B.shape[0]
    cc = step.concrete(K, M)
    C = realised_covariances(step, W, B, n, rng)
    fn = cc.field_mean(("metrics", ("eps_meta",)), [SPEC.metrics["eps_meta"]])
    v, c = draw_adapted(step, cc, C, vectors["a"], vectors, n, rng)
    args = step._args(cc, tasks={"v_task": v, "adapted": c}, vectors=vectors)
    Cn = np.moveaxis(np.broadcast_to(C, (n, *C.shape[-2:])) if C.ndim == 2 else C, 0, -1)
    vals = np.broadcast_to(np.asarray(fn(*args, Cn)[0], dtype=float), (n,))
    return float(_mean_sem(vals)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-s", type=int, nargs="+", default=[1, 3, 10, 100, 1000])
    ap.add_argument("--eps-B", type=float, nargs="+", default=[0.0, 0.5])
    args = ap.parse_args()
    init = validation_init()
    W, B = realise(init, args.n, np.random.default_rng(0))
    vectors = dict(init.vectors)
    print(f"1. simulator's eps_meta per record, N = {args.n}")
    for eb in args.eps_B:
        for ns in args.n_s:
            step = MetaStep(SPEC, "erf", SPEC.resolve_params({"n_s": ns, "s": 1.5, "eps_B": eb}))
            rng = np.random.default_rng(1)
            tasks = default_metric_tasks(ns)
            realised_metrics(step, W, B, vectors, tasks, rng)
            t0 = time.perf_counter()
            for _ in range(3):
                m, se = realised_metrics(step, W, B, vectors, tasks, rng)["eps_meta"]
            ms = 1000 * (time.perf_counter() - t0) / 3
            plain = plain_sem(step, W, B, vectors, tasks, rng)
            print(
                f"   eps_B = {eb:g}, n_s = {ns:5d}, {tasks:4d} tasks: {ms:6.0f} ms/record, "
                f"eps_meta = {m:.4f} +- {se:.4f} (plain Monte Carlo +- {plain:.4f})"
            )
    print("2. expected_update at the validation start, 2000 tasks")
    for ns in args.n_s:
        params = {"n_s": ns, "s": 1.5, "eta_a": 0.5}
        expected_update(SPEC, params, init.Q, init.R, init.T, vectors, 10, np.random.default_rng(0))
        t0 = time.perf_counter()
        eu = expected_update(SPEC, params, init.Q, init.R, init.T, vectors, 2000, np.random.default_rng(0))
        s = time.perf_counter() - t0
        sems = ", ".join(f"{k} {np.max(getattr(eu, k)[1]):.4f}" for k in ("dQ", "dR", "da", "eps_meta"))
        print(f"   n_s = {ns:5d}: {s:5.2f} s, largest s.e.m.: {sems}")


if __name__ == "__main__":
    main()
