"""Goldt et al.'s C++ ODE integrator against the generated two_layer flow (erf): agreement
and speed. Prints figures, asserts nothing.

    python benchmarks/cpp_compare.py BINARY [--sizes 8 16 32] [--rounds 3] [--threads 2]
                                            [--fresh-cache]

BINARY is a build of the two-layer ODE integrator of sgoldt/nn2pp (``scmpp_ode.cpp``
with ``libnn2pp.h``), kept outside this repository; this script only runs it. Besides
its own options (``--K --M --lr --lr2 --wd --sigma --both --dt``, and ``--prefix P``,
which reads the initial ``Q, R, T`` and the teacher's and student's readouts from
``P_Q0.dat, P_R0.dat, P_T0.dat, P_A0.dat, P_v0.dat``) the build must take
``--nsteps N --every E``: exactly N Euler steps (each a call of its ``propagate`` over
one dt; its own schedule prints at logarithmic times), printing every E steps and the
last, each line ``t, eg, et, eg_frac, et_frac, diff, Q (upper triangle, row by row),
R, A, v`` at full precision (17 significant digits).

- agreement: six cases (K, M from 2 to 9, weight decay, label noise, eta != eta_v, two
  of them with a correlated teacher), 2000 Euler steps of dt = 0.01 from the same
  overlaps; the largest absolute difference of Q, R, v and eps_g over every step between
  the C++ and ``run_euler`` of generated/two_layer_erf.py (``runtime.load("two_layer")``).
  The differences are rounding, mostly the C++'s: it adds each of its terms into Q(i, k)
  in place (~250 additions at K = M = 9), which rounds a step by a few ulp of |Q| (at
  K = M = 9, |Q| ~ 4: 5e-15 off a long-double evaluation of the same step, ours 1e-16),
  and these add up over the steps; hence starts with overlaps of order one;
- speed per step and per unit alpha at K = M = --sizes, one thread each, both layers
  trained, dt = 0.01, from the same state with the same parameters: the C++ by its
  process's CPU time (``getrusage(RUSAGE_CHILDREN)`` around each run, OMP_NUM_THREADS=1),
  the start-up removed by taking the difference of a short and a long run over the
  difference of their steps; ours as benchmarks/flow_speed.py times it (``run_euler``
  in the process's CPU time after a warm-up); each the least of --rounds. The issue's
  target is the C++ at least 10x slower;
- with --threads T > 1: ``run_euler_parallel`` with T numba threads (wall time, least of
  --rounds) against one thread (CPU time, as above, so a busy machine understates the
  gain) at K = M = 16 and 32 (target 1.7x), and the start of a fresh ``python -c`` that
  loads the kernel and runs 3 threaded Euler steps at K = M = 16 (NUMBA_NUM_THREADS=T):
  the process's wall time, run twice, the first filling numba's cache if it is empty,
  the second the warm start (target <= 2 s). The cache is numba's usual one
  (``generated/__pycache__``) unless --fresh-cache gives an empty one, so that the first
  run is a cold start (compiling the threaded loops: 15-40 s here).

Conventions, read off both codes: the first layer's flow has eta (not eta / K) in its
linear terms and eta^2 v_i v_k (first-layer rate only, no other factor) before
sum I4 with the weights (+1, -2, +1), the label noise enters as eta^2 sigma^2 v_i v_k J2,
weight decay is -kappa R, -2 kappa Q, -kappa v, not multiplied by a learning rate. One
difference: the C++ decays v whenever --both is given, ours only when eta_v != 0 (with
eta_v = 0 the readout is frozen, decay included), so the cases here train v.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DT = 0.01
AGREEMENT_STEPS = 2000

# K, M, eta, eta_v, kappa, sigma, correlated teacher
CASES = [
    (2, 2, 1.0, 0.5, 0.01, 0.1, False),
    (3, 2, 0.8, 1.2, 0.05, 0.3, True),
    (2, 5, 0.6, 0.3, 0.02, 0.5, False),
    (5, 3, 0.5, 0.8, 0.001, 0.2, False),
    (4, 7, 0.7, 0.2, 0.03, 0.05, True),
    (9, 9, 0.3, 0.6, 0.01, 0.1, False),
]

# the speed runs: both layers trained, every term of the flow present
SPEED_PARAMS = {"eta": 0.5, "eta_v": 0.3, "kappa": 0.01, "sigma": 0.1}


def start(K: int, M: int, seed: int, correlated: bool = False):
    """Overlaps of order one (Q_kk ~ 1 at every K: the C++ rounds in proportion to
    |Q|) with clearly distinct units, a positive-definite covariance and readouts of
    order one: Q, R, T, v, vs (with T = 1 and K = M = 2 the draws of
    tests/test_goldt_convention.py's start)."""
    rng = np.random.default_rng(seed)
    if correlated:
        B = rng.standard_normal((M, M))
        T = 0.7 * np.eye(M) + 0.3 * B @ B.T / M
    else:
        T = np.eye(M)
    R = rng.uniform(-0.5, 0.5, (K, M)) * math.sqrt(2 / M) + 0.3 * np.eye(K, M)
    A = 0.4 * rng.standard_normal((K, K)) * math.sqrt(2 / K)
    Q = R @ np.linalg.solve(T, R.T) + A @ A.T + 0.2 * np.eye(K)
    Q = (Q + Q.T) / 2
    v = rng.uniform(0.4, 1.3, K)
    vs = rng.uniform(0.6, 1.2, M)
    return Q, R, T, v, vs


def ours(kernel, Q, R, T, v, vs, params):
    """The kernel's flat arrays y, c, p of this state and these parameters."""
    from runtime import Init

    K, M = R.shape
    init = Init(Q, R, T, {"v": v, "vs": vs}).validate(kernel.model)
    y = kernel.pack_state(init.arrays(), K, M)
    c = kernel.pack_consts(init.arrays(), K, M)
    p = kernel.param_vector(kernel.model.resolve_params(params))
    return y, c, p


def cpp_run(binary: str, workdir: str, Q, R, T, v, vs, params, n_steps: int, every: int):
    """Run the C++ integrator for n_steps from this state: its printed rows (an array,
    one row per printed step) and the CPU time of its process."""
    K, M = R.shape
    prefix = os.path.join(workdir, f"init_K{K}_M{M}")
    for name, a in (("Q0", Q), ("R0", R), ("T0", T), ("A0", vs), ("v0", v)):
        np.savetxt(f"{prefix}_{name}.dat", np.atleast_1d(a), fmt="%.17g")
    cmd = [binary, "--prefix", prefix, "--K", str(K), "--M", str(M), "--both"]
    cmd += ["--lr", repr(params["eta"]), "--lr2", repr(params["eta_v"])]
    cmd += ["--wd", repr(params["kappa"]), "--sigma", repr(params["sigma"]), "--dt", repr(DT)]
    cmd += ["--nsteps", str(n_steps), "--every", str(every)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rows = np.loadtxt(io.StringIO(out.stdout), delimiter=",", comments="#", ndmin=2)
    ncol = 6 + K * (K + 1) // 2 + K * M + M + K
    if rows.shape[1] != ncol:
        raise RuntimeError(f"{binary} printed {rows.shape[1]} columns, expected {ncol}: {out.stdout[:300]}")
    return rows, cpu


def cpp_columns(rows, K: int, M: int) -> dict[str, np.ndarray]:
    """The C++ rows as t, eps_g, Q (upper triangle), R, vs, v."""
    o = 6
    nq = K * (K + 1) // 2
    cols = {"t": rows[:, 0], "eps_g": rows[:, 1], "Q": rows[:, o : o + nq]}
    o += nq
    cols["R"] = rows[:, o : o + K * M]
    o += K * M
    cols["vs"] = rows[:, o : o + M]
    o += M
    cols["v"] = rows[:, o : o + K]
    return cols


def agreement(binary: str, kernel) -> None:
    print(f"1. agreement: {AGREEMENT_STEPS} Euler steps, dt = {DT}, both layers trained, every step compared")
    head = (
        f"{'K':>3} {'M':>3} {'eta':>5} {'eta_v':>5} {'kappa':>6} {'sigma':>5} {'T':>5} {'|dQ| moved':>10}"
        f" {'max|Q|':>6} {'max|Q diff|':>12} {'max|R diff|':>12} {'max|v diff|':>12} {'max|eps_g diff|':>15}"
    )
    print(head)
    worst = 0.0
    with tempfile.TemporaryDirectory() as work:
        for seed, (K, M, eta, eta_v, kappa, sigma, corr) in enumerate(CASES, start=1):
            params = {"eta": eta, "eta_v": eta_v, "kappa": kappa, "sigma": sigma}
            Q, R, T, v, vs = start(K, M, seed, corr)
            rows, _ = cpp_run(binary, work, Q, R, T, v, vs, params, AGREEMENT_STEPS, 1)
            ref = cpp_columns(rows, K, M)
            steps = np.rint(ref["t"] / DT).astype(int)
            if not np.array_equal(steps, np.arange(AGREEMENT_STEPS + 1)):
                raise RuntimeError(f"the C++ printed steps {steps[:5]}..{steps[-3:]}, not every step")
            y, c, p = ours(kernel, Q, R, T, v, vs, params)
            traj = np.empty((AGREEMENT_STEPS + 1, y.size))
            traj[0] = y
            status = kernel.module.run_euler(y, c, p, K, M, DT, AGREEMENT_STEPS, 1, traj, 0)
            if status != -1:
                raise RuntimeError(f"our flow stopped being finite at step {status}")
            st = kernel.unpack_state(traj, K, M)
            iu = np.triu_indices(K)
            mine = {
                "Q": st["Q"][:, iu[0], iu[1]],
                "R": st["R"].reshape(len(traj), K * M),
                "v": st["v"],
                "eps_g": kernel.metrics(traj, c, p, K, M)[:, 0],
            }
            if not np.array_equal(ref["vs"][0], vs):
                raise RuntimeError("the C++ read the teacher's readouts differently")
            diffs = {k: float(np.abs(mine[k] - ref[k]).max()) for k in ("Q", "R", "v", "eps_g")}
            worst = max(worst, *diffs.values())
            moved = float(np.abs(ref["Q"][-1] - ref["Q"][0]).max())
            print(
                f"{K:>3} {M:>3} {eta:>5g} {eta_v:>5g} {kappa:>6g} {sigma:>5g} {'corr' if corr else 'I':>5}"
                f" {moved:>10.3g} {np.abs(ref['Q']).max():>6.2f} {diffs['Q']:>12.2e} {diffs['R']:>12.2e}"
                f" {diffs['v']:>12.2e} {diffs['eps_g']:>15.2e}"
            )
    print(f"  largest difference over the six cases: {worst:.2e} (the issue asks <= 1e-12)")


def cpp_step_time(binary: str, K: int, rounds: int) -> tuple[float, tuple[int, int]]:
    """Seconds per Euler step of the C++ at K = M and the two lengths: the least CPU time
    of --rounds runs of a short and of a long length, their difference over the
    difference of their steps (the start-up drops out). Lengths from a first guess at
    the cost (K^3.8): the long run ~1.6 s, the short one an eighth of it (its noise then
    weighs little)."""
    guess = 0.24e-3 * (K / 8) ** 3.8
    long = max(40, round(1.6 / guess))
    short = long // 8
    Q, R, T, v, vs = start(K, K, 100 + K)
    best = {short: math.inf, long: math.inf}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(rounds):
            for n in (short, long):
                rows, cpu = cpp_run(binary, work, Q, R, T, v, vs, SPEED_PARAMS, n, n)
                if not np.isfinite(np.delete(rows[-1], [2, 3, 4, 5])).all():  # those four are nan
                    raise RuntimeError(f"the C++ run at K = {K} ended with non-finite values")
                best[n] = min(best[n], cpu)
    return (best[long] - best[short]) / (long - short), (short, long)


def cpp_startup(binary: str, rounds: int) -> float:
    """CPU seconds of a whole C++ process that makes one step at K = M = 2 (least of
    ``rounds``): its start-up, what the differences above remove."""
    Q, R, T, v, vs = start(2, 2, 1)
    with tempfile.TemporaryDirectory() as work:
        return min(cpp_run(binary, work, Q, R, T, v, vs, SPEED_PARAMS, 1, 1)[1] for _ in range(rounds))


def our_step_time(kernel, K: int, rounds: int, threads: int = 1) -> float:
    """Seconds per Euler step of ours at K = M from the state the C++ is timed at, the
    least of ``rounds`` runs of ~0.25 s after a warm-up (compile or cache load): CPU
    time of the process with one thread (``run_euler``), wall time with several
    (``run_euler_parallel``), as benchmarks/flow_speed.py step_time."""
    import numba

    numba.set_num_threads(threads)
    run = getattr(kernel.module, "run_euler_parallel" if threads > 1 else "run_euler")
    clock = time.perf_counter if threads > 1 else time.process_time
    Q, R, T, v, vs = start(K, K, 100 + K)
    y0, c, p = ours(kernel, Q, R, T, v, vs, SPEED_PARAMS)
    guess = 0.03e-3 * (K / 8) ** 3.65 / threads
    n = max(20, round(0.25 / guess))
    traj = np.empty((2, y0.size))
    run(y0.copy(), c, p, K, K, DT, 2, n + 10, traj, 0)  # compile or load, warm
    best = math.inf
    for _ in range(rounds):
        y = y0.copy()
        t0 = clock()
        status = run(y, c, p, K, K, DT, n, n + 10, traj, 0)
        best = min(best, (clock() - t0) / n)
        if status != -1:
            raise RuntimeError(f"our flow at K = {K} stopped being finite at step {status}")
    numba.set_num_threads(1)
    return best


def speed(binary: str, kernel, sizes, rounds: int) -> dict[int, float]:
    print(
        f"2. speed, K = M, one thread, Euler dt = {DT}, both layers trained "
        f"(eta {SPEED_PARAMS['eta']}, eta_v {SPEED_PARAMS['eta_v']}, kappa {SPEED_PARAMS['kappa']},"
        f" sigma {SPEED_PARAMS['sigma']}); least of {rounds}; load average {loadavg()}"
    )
    print(
        f"{'K = M':>6} {'C++ ms/step':>12} {'C++ s/alpha':>12} {'C++ runs, steps':>16}"
        f" {'ours ms/step':>13} {'ours s/alpha':>13} {'C++ / ours':>11}"
    )
    one = {}
    ratios = []
    for K in sizes:
        tc, (short, long) = cpp_step_time(binary, K, rounds)
        to = our_step_time(kernel, K, rounds)
        one[K] = to
        ratios.append(tc / to)
        print(
            f"{K:>6} {tc * 1e3:>12.4f} {tc / DT:>12.4f} {f'{short}, {long}':>16}"
            f" {to * 1e3:>13.4f} {to / DT:>13.4f} {tc / to:>10.1f}x",
            flush=True,
        )
    startup = cpp_startup(binary, rounds)
    print(f"  C++ process start-up (a run of one step at K = M = 2, CPU time): {startup * 1e3:.1f} ms")
    print(f"  target: C++ / ours >= 10x; measured {', '.join(f'{r:.1f}x' for r in ratios)}; load {loadavg()}")
    return one


WARM = """
import time
t0 = time.perf_counter()
import numba
import numpy as np
from runtime import Init, load
K = 16
kernel = load("two_layer")
Q = 0.5 * np.eye(K) + 0.05
R = 0.1 * np.ones((K, K)) / K + 0.2 * np.eye(K)
init = Init(Q, R, np.eye(K), {"v": np.full(K, 0.5), "vs": np.ones(K)}).validate(kernel.model)
y = kernel.pack_state(init.arrays(), K, K)
c = kernel.pack_consts(init.arrays(), K, K)
p = kernel.param_vector(kernel.model.resolve_params({"eta": 0.5, "eta_v": 0.3, "kappa": 0.01, "sigma": 0.1}))
traj = np.empty((2, y.size))
status = kernel.module.run_euler_parallel(y, c, p, K, K, 0.01, 3, 4, traj, 0)
assert status == -1
print(numba.get_num_threads(), time.perf_counter() - t0)
"""


def warm_start(threads: int, cache: str | None) -> tuple[float, float, int]:
    """Wall time of a fresh process that loads the kernel and runs 3 threaded steps at
    K = M = 16, measured around it, the time inside it to its last step, and its
    number of numba threads."""
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    if cache is not None:
        env["NUMBA_CACHE_DIR"] = cache
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", WARM], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - t0
    n, inside = out.stdout.split()[-2:]
    return wall, float(inside), int(n)


def threaded(kernel, one: dict[int, float], threads: int, rounds: int, fresh_cache: bool) -> None:
    print(f"3. {threads} numba threads (run_euler_parallel, wall time) against one thread (CPU time)")
    print(f"{'K = M':>6} {'1 thread ms/step':>17} {f'{threads} threads ms/step':>19} {'speed-up':>9}")
    for K in (16, 32):
        t1 = one[K] if K in one else our_step_time(kernel, K, rounds)
        tp = our_step_time(kernel, K, rounds, threads=threads)
        print(f"{K:>6} {t1 * 1e3:>17.4f} {tp * 1e3:>19.4f} {t1 / tp:>8.2f}x", flush=True)
    print(f"  target: >= 1.7x; load average {loadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = tmp if fresh_cache else None
        where = "an empty numba cache" if fresh_cache else "numba's usual cache"
        first = warm_start(threads, cache)
        second = warm_start(threads, cache)
    print(f"  fresh process, load the kernel, 3 threaded steps at K = M = 16 ({where}), wall time:")
    for name, (wall, inside, n) in (("first (fills the cache)", first), ("second (warm start)", second)):
        print(f"    {name:<24} {wall:6.2f} s (in the process, to its last step: {inside:.2f} s; {n} threads)")
    print("  target: warm start <= 2 s")


def loadavg() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("binary", help="the C++ ODE integrator (built outside this repository)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads of the threaded timings (1: none)")
    parser.add_argument(
        "--fresh-cache", action="store_true", help="start the fresh processes with an empty numba cache"
    )
    args = parser.parse_args()
    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        parser.error(f"{binary} is not an executable file")
    # numba reads this when first imported: room for the threaded timings
    os.environ["NUMBA_NUM_THREADS"] = str(max(1, args.threads))
    from runtime import load as load_kernel

    kernel = load_kernel("two_layer")
    print(
        f"C++: {binary}; ours: {kernel.module.__file__} (sha256 {kernel.file_hash[:12]});"
        f" {os.cpu_count()} cpus, load average {loadavg()}"
    )
    agreement(binary, kernel)
    one = speed(binary, kernel, args.sizes, args.rounds)
    if args.threads > 1:
        threaded(kernel, one, args.threads, args.rounds, args.fresh_cache)


if __name__ == "__main__":
    main()
