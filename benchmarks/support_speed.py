"""Cost of a finite-support-set step of ``anil`` against a population step: prints
figures, asserts nothing.

    python benchmarks/support_speed.py [--sizes 2 4 8] [--S 1 2] [--repeats 20]

For each K = M: the time of one right-hand side (``rhs``, first order, erf) at
``n_s = inf`` and at ``n_s = 10``, the ratio, and the share of the support-set
moments (``task_moments`` at ``n_s = 10`` minus at ``inf``).

Measured (2-core machine under load, rhs at n_s = 10 / population, the ratio):

    K = M   S   before (G4 per entry)       after (G4_tables, contracted)
      8     1   19.0 ms / 0.065 (290x)      2.3 ms / 0.064 (35x)
      8     2   18.5 ms / 0.065 (285x)      2.4 ms / 0.064 (38x)
     16     1    337 ms / 0.75 (450x)       28.5 ms / 0.75 (38x)
     16     2    378 ms / 0.75 (505x)       31 ms / 0.77 (40x)

The rest is the G4 table itself (96 % of task_moments at K = 8): K (K + 1) / 2
pairs k <= l, each about 2 (K + M)^2 pair-tilted I2 per node of the 20-node path
rule. Fewer nodes cost accuracy at large variances (max |G4_table(n) - G4_table(20)|,
random covariances of max variance 5 / 19 / 74: 16 nodes 1.5e-14 / 1.7e-10 / 3.7e-8,
12 nodes 2.1e-11 / 4.0e-8 / 1.2e-6), for at most 20/16 or 20/12 of the time.
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
