"""Cost of a finite-support-set step of ``anil`` against a population step: prints
figures, asserts nothing.

    python benchmarks/support_speed.py [--sizes 2 4 8] [--S 1 2] [--repeats 20]

For each K = M: the time of one right-hand side (``rhs``, first order, erf) at
``n_s = inf`` and at ``n_s = 10``, the ratio, and the share of the support-set
moments (``task_moments`` at ``n_s = 10`` minus at ``inf``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def timed(f, repeats):
    f()  # compiled or loaded from the cache
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def case(K, M, S, n_s, repeats):
    from runtime import Init, load

    kernel = load("anil")
    rng = np.random.default_rng(0)
    A = rng.standard_normal((K + M, K + M))
    full = A @ A.T / (K + M) + 0.5 * np.eye(K + M)
    init = Init(full[:K, :K], full[:K, K:], np.eye(M), {"a": 0.1 * np.ones(K), "vbar": np.zeros(M)})
    init = init.validate(kernel.model)
    y = kernel.pack_state(init.arrays(), K, M)
    c = kernel.pack_consts(init.arrays(), K, M)
    p = kernel.param_vector(kernel.model.resolve_params({"S": S, "n_s": n_s, "alpha_in": 0.5}))
    mod = kernel.module
    dy = np.empty_like(y)
    C = np.empty((K + 2 * M, K + 2 * M))
    mod.covariance(y, c, p, K, M, C)
    rhs = timed(lambda: mod.rhs(y, c, p, K, M, dy), repeats)
    task = timed(lambda: mod.task_moments(y, c, p, K, M, C, False), repeats)
    return rhs, task


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--S", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    head = f"{'K = M':>6} {'S':>3} {'rhs n_s=inf':>14} {'rhs n_s=10':>14} {'ratio':>7}"
    print(head + f" {'support moments':>16}")
    for K in args.sizes:
        for S in args.S:
            pop, tpop = case(K, K, S, float("inf"), args.repeats)
            fin, tfin = case(K, K, S, 10.0, args.repeats)
            print(
                f"{K:>6} {S:>3} {pop * 1e3:>11.3f} ms {fin * 1e3:>11.3f} ms {fin / pop:>7.2f} "
                f"{(tfin - tpop) * 1e3:>13.3f} ms"
            )


if __name__ == "__main__":
    main()
