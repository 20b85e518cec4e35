"""The closure-free order-2 expected update with finite support sets: prints figures, asserts nothing.

    python benchmarks/order2_reference.py [--tasks 50000] [--n-s 3 10] [--seed 0]

At the validation start (runtime/scenarios.py ``validation_init``: K = M = 2, the
first of ``VALIDATION_SUPPORT``'s settings, S = 1, alpha_in = 1, s = 1.5, the other
parameters at their defaults) and order 2, ``runtime.simulate_meta.expected_update``
over ``--tasks`` tasks and support sets for each ``n_s``: ``dQ``, ``dR``, ``da``,
``eps_meta`` and the support-direction parts of ``dR`` and ``dQ`` (docs/models/anil.md
5.6 "Order 2"): ``sup_R = -eta E[sum_mu gamma^mu_k nu^mu_n]``, ``sup_Q1 = -eta
E[sum_mu (gamma^mu_k lambda^mu_l + gamma^mu_l lambda^mu_k)]``, ``sup_Q2 = eta^2
E[sum_mu gamma^mu_k gamma^mu_l]``, each entry mean +- Monte Carlo s.e.m. (``dQ`` and
``dR`` include their parts). For comparison, the generated kernel's population
(n_s = inf) flow at orders 1 and 2: its second-order terms (order 2 minus order 1)
are what ``sup_R`` and ``sup_Q1`` tend to as n_s grows (``sup_Q2`` like 1/n_s).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import runtime
from runtime.scenarios import validation_init
from runtime.simulate_meta import expected_update

SETTING = {"order": 2, "S": 1, "alpha_in": 1.0, "s": 1.5}


def entries(name, value) -> list[str]:
    mean, sem = (np.atleast_1d(np.asarray(x, dtype=float)) for x in value)
    out = []
    for idx in np.ndindex(*mean.shape):
        where = "" if mean.size == 1 else "[" + ",".join(str(i + 1) for i in idx) + "]"
        out.append(f"  {name + where:<12} {mean[idx]: .6f} +- {sem[idx]:.6f}")
    return out


def kernel(params, init):
    d = runtime.load("anil").velocity(init, params)
    return d["Q"], d["R"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=50_000)
    ap.add_argument("--n-s", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-kernel", action="store_true", help="skip the population flow (numba compile)")
    args = ap.parse_args()
    init = validation_init()
    print(f"anil at the validation start, {SETTING}, {args.tasks} tasks, seed {args.seed}")
    print(
        f"Q = {init.Q.tolist()}, R = {init.R.tolist()}, T = I, a = {init.vectors['a'].tolist()}, "
        f"vbar = {init.vectors['vbar'].tolist()}"
    )
    for n_s in args.n_s:
        t0 = time.time()
        eu = expected_update(
            "anil", {**SETTING, "n_s": n_s}, init.Q, init.R, init.T, init.vectors, args.tasks,
            np.random.default_rng(args.seed),
        )  # fmt: skip
        print(f"\nn_s = {n_s}  [{time.time() - t0:.1f} s, derivation included]")
        for name in ("sup_R", "sup_Q1", "sup_Q2", "dQ", "dR", "da", "eps_meta"):
            print("\n".join(entries(name, getattr(eu, name))))
    if not args.no_kernel:
        Q2, R2 = kernel({**SETTING, "n_s": float("inf")}, init)
        Q1, R1 = kernel({**SETTING, "order": 1, "n_s": float("inf")}, init)
        print("\npopulation flow (kernel, n_s = inf), order 2; second-order terms = order 2 - order 1")
        print(f"  dQ {Q2.round(6).tolist()}  dR {R2.round(6).tolist()}")
        print(f"  dQ2 - dQ1 {(Q2 - Q1).round(6).tolist()}  dR2 - dR1 {(R2 - R1).round(6).tolist()}")


if __name__ == "__main__":
    main()
