"""The 64-point sweep of the reference scenario (8 alpha_in x 8 eta, alpha to 300,
adaptive) on a LocalCluster of 1 and of 2 worker processes, set up as the embedded
cluster of ``runtime.sweep`` is: seconds and speed-up. Each cluster is started, and
its workers load the kernel (a one-point sweep), before the clock starts; the
start-up is printed apart. The clock covers the whole ``sweep`` call: checking the
spec, creating the store, the points, reading the dataset back, the figure.

    python benchmarks/sweep_speed.py [--workers 1 2] [--t-max 300] [--record-every 1] [--method rk4 --dt 0.01]

Every point is then compared with a single ``flow`` run of the same settings.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def spec(t_max: float, every: float, alpha_in, eta, method: str = "adaptive", dt: float = 0.01) -> dict:
    fixed = {} if method == "adaptive" else {"dt": dt}
    return {
        "model": "anil",
        "t_max": t_max,
        "method": method,
        **fixed,
        "record_every": every,
        "params": {"S": 1, "order": 1},
        "grid": {"alpha_in": list(alpha_in), "eta": list(eta)},
        "init": {"scenario": "reference"},
    }


def main() -> None:
    import dask
    from distributed import LocalCluster

    from runtime.sweep import EMBEDDED_CONFIG, sweep

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--t-max", type=float, default=300.0)
    ap.add_argument("--record-every", type=float, default=1.0)
    ap.add_argument("--method", default="adaptive", choices=("adaptive", "rk4", "euler"))
    ap.add_argument("--dt", type=float, default=0.01, help="the step of rk4 and euler")
    ap.add_argument("--repeats", type=int, default=2, help="timed sweeps per cluster (the best is kept)")
    args = ap.parse_args()
    grid = np.round(np.linspace(0.25, 2.0, 8), 4)
    big = spec(args.t_max, args.record_every, grid, grid, args.method, args.dt)
    small = spec(args.record_every, args.record_every, [1.0], [1.0], args.method, args.dt)
    fixed = {} if args.method == "adaptive" else {"dt": args.dt}
    times = {}
    # the machine's load beside the figures: on a shared machine other processes take cores
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    for n in args.workers:
        t0 = time.perf_counter()
        with dask.config.set(EMBEDDED_CONFIG):  # the embedded cluster's settings
            cl = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        with cl:
            with tempfile.TemporaryDirectory() as tmp:
                sweep(small, scheduler=cl.scheduler_address, out=Path(tmp) / "warm", progress=False)
                startup = time.perf_counter() - t0
                best = []
                for r in range(args.repeats):
                    t1 = time.perf_counter()
                    ds = sweep(big, scheduler=cl.scheduler_address, out=Path(tmp) / f"s{r}", progress=False)
                    best.append(time.perf_counter() - t1)
                    assert int(ds.done.sum()) == ds.done.size == 64
        times[n] = min(best)
        print(
            f"{n} worker{'s' if n > 1 else ' '}: 64 points in {times[n]:.2f} s "
            f"({times[n] / 64 * 1e3:.0f} ms per point; runs {', '.join(f'{b:.2f}' for b in best)} s); "
            f"cluster start and kernel load {startup:.1f} s"
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if 1 in times:
        for n in times:
            if n != 1:
                print(f"speed-up with {n} workers: {times[1] / times[n]:.2f}x")
    # every point against a single flow with the same settings, in this process
    from runtime import flow
    from runtime.scenarios import reference_init

    same = 0
    for i, alpha_in in enumerate(ds.alpha_in.values):
        for j, eta in enumerate(ds.eta.values):
            params = {"S": 1, "order": 1, "alpha_in": alpha_in, "eta": eta}
            tr = flow("anil", reference_init(1e-3), params, t_max=args.t_max, method=args.method,
                      record_every=args.record_every, **fixed)  # fmt: skip
            point = ds.isel(alpha_in=i, eta=j)
            same += all(
                np.array_equal(point[k].values, tr.arrays[k]) for k in ("Q", "R", "a", "eps_meta", "eps_opt")
            )
    print(
        f"{same} of {ds.done.size} points equal to single flow runs to the bit (Q, R, a, eps_meta, eps_opt)"
    )
    div = int(np.isfinite(ds.diverged_alpha.values).sum())
    counts = ""
    if args.method == "adaptive":
        n = ds.rhs_evaluations
        counts = f"; rhs evaluations per point {int(n.min())}-{int(n.max())}"
    lo, hi = float(ds.final_eps_meta.min()), float(ds.final_eps_meta.max())
    print(f"diverged points: {div}; final eps_meta from {lo:.4f} to {hi:.4f}{counts}")


if __name__ == "__main__":
    main()
