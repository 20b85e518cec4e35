"""G4 = E[g g g g] (erf) along Price's path: error and cost against the number of
Gauss-Legendre nodes. Prints figures, asserts nothing.

    python benchmarks/g4.py [--nodes 6 8 10 12 16 20 24 32] [--scales 1 3 10] [--covariances 10]
    python benchmarks/g4.py --calibrate

- calibrate (the figures behind derive/quadrature.py RULES): for a grid of largest
  variances c, the largest difference between G4 at n nodes and at 128 over 12
  covariances whose largest variance is c (random, nearly of rank 2, equal variances)
  and the 15 equality patterns with that variance's field among the four (where the
  integrand's singularity is nearest), and the count RULES chooses there;

- convergence: for random covariances of the fields of a (K + M) = 6 dimensional
  Gaussian with variances of order ``scale`` (the tests' random covariance times the
  scale), every equality pattern of the four indices (15), the largest difference
  between G4 at n nodes and G4 at 64 nodes (tests/test_g4.py compares 20 nodes with an
  independent tensor quadrature to 1e-10);
- speed: ns per G4 call from a compiled loop over 1e5 random index tuples (all
  patterns mixed) at 16, 20 and 24 nodes, beside I4 (the closed form of each node's
  integrand) for scale; and G4(k, l, p, q) for every (p, q) at once (G4_table, the
  pair-tilt tables per node) against the n(n+1)/2 calls of G4 it replaces.
Each node count is a module rendered by derive/codegen.py ``render_primitives`` and
compiled by numba (a few seconds each).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from derive import codegen  # noqa: E402
from derive.quadrature import NODES  # noqa: E402

DIM = 6
REFERENCE_NODES = 64
CALIBRATION_NODES = [8, 10, 12, 14, 16, 18, 20, 24, 28, 32, 40, 48, 56, 64]
CALIBRATION_REFERENCE = 128
CALIBRATION_VARIANCES = [0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
                         768, 1024, 2048, 4096]


def load(folder: Path, nodes: int):
    text = codegen.render_primitives(["G4", "I4"], "erf", nodes)
    path = folder / f"g4_n{nodes}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def covariance(rng, scale: float) -> np.ndarray:
    A = rng.normal(size=(DIM, DIM)) * rng.uniform(0.3, 1.8, size=(DIM, 1))
    return scale * (A @ A.T / DIM + 1e-2 * np.eye(DIM))


def patterns() -> list[tuple[int, ...]]:
    return [
        s
        for s in itertools.product(range(4), repeat=4)
        if s[0] == 0 and all(s[i] <= max(s[:i]) + 1 for i in range(1, 4))
    ]


def driver(fn):
    from numba import njit

    @njit(cache=False)
    def run(C, idx, out):
        for i in range(idx.shape[0]):
            out[i] = fn(C, idx[i, 0], idx[i, 1], idx[i, 2], idx[i, 3])

    return run


def ns_per_call(fn, C, idx, repeats: int = 7) -> float:
    run = driver(fn)
    out = np.empty(idx.shape[0])
    run(C, idx, out)  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(C, idx, out)
        times.append(time.perf_counter() - t)
    return 1e9 * min(times) / idx.shape[0]


def load_table(folder: Path):
    path = folder / "g4_table.py"
    path.write_text(codegen.render_primitives(["G4"], "erf", NODES, table=True))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def covariance_n(rng, n: int) -> np.ndarray:
    A = rng.normal(size=(n, n)) * rng.uniform(0.3, 1.8, size=(n, 1))
    return A @ A.T / n + 1e-2 * np.eye(n)


def table_times(mod, C, repeats: int = 7) -> tuple[float, float]:
    """us per (k, l) = (0, 1): the n(n+1)/2 calls of G4 (symmetric in p, q), G4_table."""
    from numba import njit

    g4, table = mod.G4, mod.G4_table

    @njit(cache=False)
    def direct(C, k, j, F):
        n = C.shape[0]
        for p in range(n):
            for q in range(p, n):
                F[p, q] = g4(C, k, j, p, q)
                F[q, p] = F[p, q]

    n = C.shape[0]
    F, B = np.empty((n, n)), np.empty((n, n))
    Cp, A = np.empty((n + 1, n + 1)), np.empty((n + 1, n + 1))
    out, Dn, U0, U1 = (np.empty(n + 1) for _ in range(4))
    runs = {
        "direct": lambda: direct(C, 0, 1, F),
        "table": lambda: table(C, 0, 1, F, Cp, A, B, out, Dn, U0, U1),
    }
    best = {}
    for name, run in runs.items():
        run()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(10):
                run()
            times.append((time.perf_counter() - t) / 10)
        best[name] = 1e6 * min(times)
    return best["direct"], best["table"]


def with_largest_variance(rng, c: float, kind: int) -> np.ndarray:
    """A covariance of DIM fields whose largest variance is c: random (kind 0), nearly
    of rank 2 (1), every variance c (2)."""
    if kind == 1:
        A = rng.normal(size=(DIM, 2))
        C = A @ A.T + 1e-3 * np.eye(DIM)
    else:
        C = covariance(rng, 1.0)
    d = np.sqrt(np.diag(C))
    s = np.ones(DIM) if kind == 2 else rng.uniform(0.2, 1.0, DIM)
    s[rng.integers(DIM)] = 1.0
    return c * C / np.outer(d, d) * np.outer(s, s)


def calibrate(folder: Path) -> None:
    from derive.quadrature import nodes_for

    mods = {n: load(folder, n) for n in CALIBRATION_NODES + [CALIBRATION_REFERENCE]}
    rng = np.random.default_rng(7)
    for m in mods.values():
        m.G4(covariance(rng, 1.0), 0, 1, 2, 3)
    print(f"max |G4(n nodes) - G4({CALIBRATION_REFERENCE} nodes)| against the largest variance c "
          "(12 covariances x 15 patterns); * the count of derive/quadrature.py RULES")
    print(f"{'c':>6} " + "".join(f"{n:>9d}" for n in CALIBRATION_NODES))
    for c in CALIBRATION_VARIANCES:
        worst = np.zeros(len(CALIBRATION_NODES))
        for rep in range(12):
            C = with_largest_variance(rng, c, rep % 3)
            top = int(np.argmax(np.diag(C)))
            for pat in patterns():
                fields = rng.choice(DIM, size=max(pat) + 1, replace=False)
                if top not in fields:
                    fields[0] = top
                idx = tuple(int(fields[p]) for p in pat)
                ref = mods[CALIBRATION_REFERENCE].G4(C, *idx)
                worst = np.maximum(worst, [abs(mods[n].G4(C, *idx) - ref) for n in CALIBRATION_NODES])
        chosen = nodes_for(c)
        marks = ("*" if n == chosen else " " for n in CALIBRATION_NODES)
        cells = "".join(f"{e:>8.1e}{m}" for e, m in zip(worst, marks))
        print(f"{c:>6g} {cells}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[6, 8, 10, 12, 16, 20, 24, 32])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    ap.add_argument("--covariances", type=int, default=10)
    ap.add_argument("--calibrate", action="store_true", help="the figures behind derive/quadrature.py RULES")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.calibrate:
            calibrate(folder)
            return
        t = time.perf_counter()
        mods = {n: load(folder, n) for n in sorted(set(args.nodes) | {16, 20, 24, REFERENCE_NODES})}
        print(f"rendered and imported {len(mods)} modules in {time.perf_counter() - t:.1f} s")
        rng = np.random.default_rng(2024)
        C0 = covariance(rng, 1.0)
        for m in mods.values():  # compile outside the tables' timing
            m.G4(C0, 0, 1, 2, 3)

        print(f"\nconvergence: max |G4(n nodes) - G4({REFERENCE_NODES} nodes)| (path rule) over "
              f"{args.covariances} covariances x 15 equality patterns (kernels: RULES, by the largest "
              "variance)")
        head = "".join(f"{n:>10d}" for n in args.nodes)
        print(f"{'scale':>6} {'max var':>8}  {'pattern':<10}{head}")
        for scale in args.scales:
            covs = [covariance(rng, scale) for _ in range(args.covariances)]
            maxvar = max(float(np.max(np.diag(C))) for C in covs)
            rows = {}
            for C in covs:
                for pat in patterns():
                    fields = rng.choice(DIM, size=max(pat) + 1, replace=False)
                    idx = tuple(int(fields[p]) for p in pat)
                    ref = mods[REFERENCE_NODES].G4(C, *idx)
                    key = "".join("abcd"[p] for p in pat)
                    errs = [abs(mods[n].G4(C, *idx) - ref) for n in args.nodes]
                    rows[key] = np.maximum(rows.get(key, 0.0), errs)
            worst = np.max(list(rows.values()), axis=0)
            for key in ("abcd", "aabc", "aabb", "aaab", "aaaa"):
                cells = "".join(f"{e:>10.1e}" for e in rows[key])
                print(f"{scale:>6g} {maxvar:>8.2f}  {key:<10}{cells}")
            cells = "".join(f"{e:>10.1e}" for e in worst)
            print(f"{scale:>6g} {maxvar:>8.2f}  {'all 15':<10}{cells}")

        print("\nspeed: ns per call, compiled loop over 1e5 random index tuples of a 6x6 covariance")
        idx = rng.integers(0, DIM, size=(100_000, 4))
        C = covariance(rng, 1.0)
        i4 = ns_per_call(mods[20].I4, C, idx)
        for n in (16, 20, 24):
            g4 = ns_per_call(mods[n].G4, C, idx)
            print(f"  G4, {n} nodes: {g4:7.0f} ns ({g4 / i4:.0f} I4 calls)")
        print(f"  I4 (closed form): {i4:7.1f} ns")

        print(f"\nG4(k, l, p, q) for every (p, q) of an n x n covariance, {NODES} nodes: us per (k, l)")
        table_mod = load_table(folder)
        for n in (6, 10, 16):
            C = covariance_n(rng, n)
            direct, table = table_times(table_mod, C)
            print(f"  n = {n:2d}: G4_table {table:7.1f} us, n(n+1)/2 G4 calls {direct:7.1f} us "
                  f"({direct / table:.1f}x)")


if __name__ == "__main__":
    main()
