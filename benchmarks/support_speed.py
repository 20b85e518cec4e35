"""Cost of a finite-support-set step of ``anil`` against a population step: prints
figures, asserts nothing.

    python benchmarks/support_speed.py [--sizes 2 4 8] [--S 1 2] [--order 1] [--repeats 20]

For each K = M: the time of one right-hand side (``rhs``, erf, first order unless
``--order 2``) at ``n_s = inf`` and at ``n_s = 10``, the ratio, and the share of the
support-set moments (``task_moments`` at ``n_s = 10`` minus at ``inf``).

Measured (2-core machine shared with a CI run and another user, load average 2.9;
rhs at n_s = 10 / population, the ratio; the minimum of 60 repeats, the kernels
interleaved in one run, so that only figures of the same run compare):

    K = M   S   E1 per (s, t) (acbba2c)   CMV from lV, AV (a094573)   + G4 rows >= k (ce0888d)
      8     1   10.8 ms / 0.053 (202x)    2.64 ms / 0.054 (49x)       2.57 ms / 0.054 (48x)
      8     2   35.7 ms / 0.062 (576x)    3.36 ms / 0.070 (48x)       3.25 ms / 0.063 (52x)

(the population figure varies by 30 % between repeats under this load). This script,
median of 30: at ce0888d, load 2.1, S = 1 2.79 ms / 0.046 (60x), S = 2 3.49 ms / 0.046
(75x); at acbba2c, load 3.5, 23.3 ms / 0.045 (521x), 73.2 ms / 0.045 (1634x). The first
change contracts N with the loadings and means of the families at step s, then at
t, then with Pi^s and Pi^t one at a time, and reads CMV and CVV from lV and AV after
the steps (derive/meta.py _support_excess): K^5 M work per (s, t) instead of K^6 per
(s, t) and per pair of task quantities (E1: 43 % of the old step at S = 1, with F2,
AV and the Pi contractions of CMV 12 % more). The second computes the G4 table of
the path along k only for the rows p, q >= k (the rest by G4's symmetry) and the
pair tilt's I2 on its upper triangle (G4_tables, g4_tilt2_block): half the
arcsines, but shorter loops vectorise less well, so only 5-10 % faster.

Where the time goes now (S = 1, median of 60 under load, objmode timers around the
sections of a copy of task_moments): G4_tables 70 % (1.9 ms alone); CVV (K^4 M^2)
9 %; the recursion of Sig, V, X, Z 7 %; Pi and the contraction of N with the
families (NL, Nm, F1, F2) 9 %; CMV 5 %; the rest of the rhs 5 %. The floor is the
G4 values: the covariance N of the coefficients needs G4(k, l, p, q) for k, l student
units and p, q student units or task fields (the fields whose coefficients are
nonzero; the label noise's reads I2 only), 2586 distinct values at K = M = 8 (330 +
960 + 1296). In one run: population rhs 0.054 ms; one G4 call 1.30 us, 2586 calls
3.35 ms (62x); the table 1.86 ms (0.72 us per value, 35x). At most 3x a population
step is 0.16 ms, 124 G4 calls: out of reach at K = M = 8 by a factor of 12 (the
table) to 21 (one call per value) on the G4 values alone; even three tilted I2 per
value and node of the 20-node path rule, at the 7 ns of the vectorised loop, make
1.1 ms (20x). Reaching 3x needs a cheaper G4 (fewer nodes lose accuracy, below) or
a covariance that reads fewer of them.

Order 2 (``--order 2``: the tangent of the support moments along every direction of
Q, R and the start, and the eta^2 term, in the outlined block). Before, at 7eeea34, in
one run (median of 3-10): K = M = 2 3.8 ms (220x the population order-2 step), 4
200 ms (1976x), 8 19.3 s (13375x) at S = 1; 4.9 ms, 327 ms at S = 2. Most of it: the
K^4 directional G4 of every direction differentiated under G4's integral (7 us a
call), the primitives of the eta^2 term called inside sums over indices they do not
read (K^4 M^2 components with K^2-fold inner sums), and G4 called directly in E_q[b
b^T]. Now (this script, median of 10, load 1.2): G4_dir by Price's theorem, entry by
entry of dC (closed forms, only where dC is nonzero); the task program's sums and
primitives hoisted to the indices they read (derive/meta.py hoist_partial_sums);
E_q[b b^T] from a G4 table:

    K = M   S   rhs n_s = inf   rhs n_s = 10   ratio
      2     1      0.013 ms        0.241 ms      19
      2     2      0.010 ms        0.283 ms      29
      4     1      0.044 ms        1.98 ms       45
      4     2      0.047 ms        2.87 ms       61
      8     1      0.639 ms        67.3 ms      105
      8     2      0.678 ms        102 ms       151

(the values equal the old kernel's to 8e-16 relative, erf and linear, K, M up to 4, S
= 1..3, n_s = 3, 10, inf). Then each G4_dir call is guarded by G4_dir_touches
(inlined: whether dC has a nonzero entry among its fields): a K^4 sweep along one Q
direction 31.5 -> 21.3 ns an entry. Median of 30, two runs at load ~1: K = M = 8, S
= 1 52-66 ms, S = 2 94-97 ms, against a population order-2 step of 0.68-0.92 ms
(timings on this machine vary by 20-30 % between runs). What remains at K = 8: the
tangent's K^5 M contractions per direction (100 directions) and the G4_dir calls that
a direction touches.

The G4 table (96 % of task_moments at K = 8 in an earlier version): K (K + 1) / 2
pairs k <= l, each about 2 (K + M)^2 pair-tilted I2 per node of the path rule. Since
d6bbf6b the node count follows the largest variance of the table's rows
(derive/quadrature.py RULES: 10 nodes up to 2, 12 up to 3, ... 64 up to 2048, each
within 1e-11), where it was 20 for every variance. In one run, K = M = 8, n_s = 10,
largest variance 2.3 (12 nodes), median of 40: S = 1 3.85 -> 2.67 ms (87x -> 60x a
population step of 0.044 ms), S = 2 4.57 -> 3.62 ms (102x -> 81x); G4_tables alone for
16 rows 2.95 ms at 20 nodes, 1.46 ms at 10.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# this checkout's runtime and generated/, not an installed copy's (a worktree)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(f, repeats):
    f()  # compiled or loaded from the cache
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def case(K, M, S, n_s, repeats, order=1):
    from runtime import Init, load

    kernel = load("anil")
    rng = np.random.default_rng(0)
    A = rng.standard_normal((K + M, K + M))
    full = A @ A.T / (K + M) + 0.5 * np.eye(K + M)
    init = Init(full[:K, :K], full[:K, K:], np.eye(M), {"a": 0.1 * np.ones(K), "vbar": np.zeros(M)})
    init = init.validate(kernel.model)
    y, c, p, K, M = kernel.at(init, {"S": S, "n_s": n_s, "alpha_in": 0.5, "order": order})
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
    ap.add_argument("--order", type=int, default=1, choices=(1, 2))
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"order {args.order}")
    head = f"{'K = M':>6} {'S':>3} {'rhs n_s=inf':>14} {'rhs n_s=10':>14} {'ratio':>7}"
    print(head + f" {'support moments':>16}")
    for K in args.sizes:
        for S in args.S:
            pop, tpop = case(K, K, S, float("inf"), args.repeats, args.order)
            fin, tfin = case(K, K, S, 10.0, args.repeats, args.order)
            print(
                f"{K:>6} {S:>3} {pop * 1e3:>11.3f} ms {fin * 1e3:>11.3f} ms {fin / pop:>7.2f} "
                f"{(tfin - tpop) * 1e3:>13.3f} ms"
            )


if __name__ == "__main__":
    main()
