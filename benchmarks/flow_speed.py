"""Speed of the generated flows and of the simulator: prints figures, asserts nothing.

    python benchmarks/flow_speed.py [--sizes 2 4 8 12 16 32 64] [--anil-sizes ...]
                                    [--repeats 5] [--threads 2] [--plot FILE]
                                    [--count-sizes 2 3 4 5 6 8 16]

- time per Euler step and per unit alpha (dt = 0.01) of two_layer (erf, both
  layers trained) and anil (erf, order 1, S = 1), one thread, the least of
  --repeats runs after a warm-up (K <= 16; half as many above), in the process's
  CPU time; the fitted exponent of cost against K;
- the arcsine floor: the cost of the kernels' own arcsine alone; per size the
  arcsines a step computes against the distinct integrals among them, the time
  per arcsine, and the time per step over the floor (distinct integrals times
  the arcsine's cost);
- with --threads T > 1: the same with the threaded right-hand side
  (run_euler_parallel, T numba threads, in wall time; its compile time is not
  counted) for K >= 4, the speed-up over one thread, and the K from which the
  threads pay, beside the rule the runtime follows (PARALLEL_FROM_K); the cold
  and warm start of a process that runs the threaded loops (numba caches them);
- the simulator's outer step of anil (order 1, population mode, N = 1000, K = M = 2);
- the vectorisation of the table loops (tilt2_table, packed_dot, I2C_fill): packed
  against scalar double-precision instructions in numba's machine code;
- time of `python -m derive regenerate` (in a scratch copy, the tree untouched);
- cold start (empty numba cache: compile) and warm start (cache filled) of a
  fresh process, up to the first integrated step;
- with --plot, a log-log figure of the time per step against K.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def state(model: str, K: int, M: int):
    """A generic state of ``model`` (random overlaps, no two integrals equal by
    accident) as the kernel's flat arrays: kernel, y, c, p."""
    from runtime import Init, load

    kernel = load(model)
    rng = np.random.default_rng(0)
    A = rng.standard_normal((K + M, K + M))
    full = A @ A.T / (K + M) + 0.5 * np.eye(K + M)
    vectors = (
        {"v": np.full(K, 0.5), "vs": np.ones(M)}
        if model == "two_layer"
        else {"a": np.zeros(K), "vbar": np.zeros(M)}
    )
    init = Init(full[:K, :K], full[:K, K:], full[K:, K:], vectors)
    init = init.validate(kernel.model)
    y0 = kernel.pack_state(init.arrays(), K, M)
    c = kernel.pack_consts(init.arrays(), K, M)
    p = kernel.param_vector(
        kernel.model.resolve_params({"eta": 0.1, "eta_v": 0.1} if model == "two_layer" else {})
    )
    return kernel, y0, c, p


def step_time(model: str, K: int, M: int, repeats: int, dt: float = 0.01, threads: int = 1) -> float:
    """Seconds per Euler step: the least over ``repeats`` runs (the machine may be
    shared: the least is the run least disturbed), in CPU time of the process with
    one thread, in wall time with several."""
    import numba

    numba.set_num_threads(threads)
    run = "run_euler_parallel" if threads > 1 else "run_euler"
    clock = time.perf_counter if threads > 1 else time.process_time
    kernel, y0, c, p = state(model, K, M)
    n = max(20, int(2e6 / (K + M) ** 4))
    traj = np.empty((2, y0.size))
    getattr(kernel.module, run)(y0.copy(), c, p, K, M, dt, 2, n + 10, traj, 0)  # compile / warm
    times = []
    for _ in range(repeats):
        y = y0.copy()
        t0 = clock()
        getattr(kernel.module, run)(y, c, p, K, M, dt, n, n + 10, traj, 0)
        times.append((clock() - t0) / n)
    numba.set_num_threads(1)
    return min(times)


def asin_time(size: int = 4096, repeats: int = 7) -> float:
    """Seconds per value of the kernels' own arcsine (``asin_`` of the generated
    module) alone, in a loop numba vectorises: the floor of a table entry."""
    from numba import njit

    from generated.two_layer_erf import asin_

    @njit(error_model="numpy", fastmath={"contract"})
    def loop(x, out, reps):
        for _ in range(reps):
            for i in range(x.size):
                out[i] = asin_(x[i])

    x = np.random.default_rng(1).uniform(-1.0, 1.0, size)
    out = np.empty_like(x)
    loop(x, out, 1)
    reps = 2000
    best = math.inf
    for _ in range(repeats):
        t0 = time.process_time()
        loop(x, out, reps)
        best = min(best, (time.process_time() - t0) / reps / size)
    return best


COUNT = """
import json, sys
import numpy as np
sys.path.insert(0, {bench!r})
import flow_speed
counts = {{}}
for K in {sizes!r}:
    kernel, y, c, p = flow_speed.state({model!r}, K, K)
    module = kernel.module
    args = []
    inner = module.asin_

    def counting(x):
        args.append(x)
        return inner(x)

    module.asin_ = counting
    module.rhs(y, c, p, K, K, np.empty_like(y))
    module.asin_ = inner
    distinct = len({{float(f"{{a:.10e}}") for a in args}})
    counts[K] = (len(args), distinct)
print(json.dumps(counts))
"""


def asin_counts(model: str, sizes) -> dict[int, tuple[int, int]]:
    """For each K (= M): the arcsines one evaluation of the right-hand side computes,
    and how many distinct values they take (their arguments to 10 digits, at a
    generic state: equal integrals have equal arguments), counted by running the
    generated module as plain Python (NUMBA_DISABLE_JIT) with its ``asin_`` wrapped."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    code = COUNT.format(bench=str(ROOT / "benchmarks"), sizes=list(sizes), model=model)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return {int(k): tuple(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def count_at(counts: dict[int, tuple[int, int]], K: int) -> tuple[int, int, bool]:
    """(arcsines, distinct, counted) at K: counted, or above the counted sizes the
    polynomial of degree 4 in K through the counts at the five largest of them
    (a step's integrals are pairs of units times pairs of rows: degree 4)."""
    if K in counts:
        return (*counts[K], True)
    ks = sorted(counts)[-5:]
    vals = []
    for j in range(2):
        poly = np.polyfit(ks, [counts[k][j] for k in ks], 4)
        vals.append(int(round(np.polyval(poly, K))))
    return vals[0], vals[1], False


STARTUP = """
import time; t0 = time.perf_counter()
import numpy as np
from runtime import Init, flow
init = Init(0.5 * np.eye(2), 0.1 * np.ones((2, 2)), np.eye(2))
flow("two_layer", init, {"eta_v": 0.5}, t_max=0.01, dt=0.01)
print(time.perf_counter() - t0)
"""


STARTUP_THREADED = """
import time; t0 = time.perf_counter()
import numpy as np
from runtime import Init, flow
K = 16
init = Init(0.5 * np.eye(K), 0.1 * np.ones((K, K)) / K, np.eye(K))
flow("two_layer", init, {"eta_v": 0.5}, t_max=0.01, dt=0.01, parallel=True)
print(time.perf_counter() - t0)
"""


def startup(cache: str, threads: int = 1) -> float:
    """Seconds of a fresh process to its first integrated step, with numba's cache in
    ``cache``: two_layer K = M = 2 on one thread, or K = M = 16 on the threaded loops."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_NUM_THREADS=str(threads))
    script = STARTUP if threads == 1 else STARTUP_THREADED
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def threads_pay_from(threaded: list[tuple[int, float, float]]) -> int | None:
    """The least K from which the threads are faster at every measured size
    (``threaded``: K, one-thread and threaded time per step), or None."""
    best = None
    for K, t1, tp in sorted(threaded, reverse=True):
        if tp >= t1:
            break
        best = K
    return best


def regenerate_time() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        for part in ("derive", "generated"):
            shutil.copytree(ROOT / part, Path(tmp) / part, ignore=shutil.ignore_patterns("__pycache__"))
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "derive", "regenerate"], cwd=tmp, check=True, capture_output=True
        )
        return time.perf_counter() - t0


def simulator_step_time(N: int = 1000, steps: int = 2000) -> float:
    """Seconds per outer step of the anil simulator (order 1, population mode, K = M = 2)."""
    from runtime import simulate
    from runtime.scenarios import validation_init

    kw = {"N": N, "seeds": 1, "init": validation_init(), "workers": 1}
    simulate("anil", {}, t_max=10 / N, record_every=10 / N, **kw)  # warm
    t0 = time.perf_counter()
    simulate("anil", {}, t_max=steps / N, record_every=steps / N, **kw)
    return (time.perf_counter() - t0) / steps


VECTORS = """
import re, sys
import numpy as np
sys.path.insert(0, {bench!r})
import flow_speed
module = flow_speed.state({model!r}, 8, 8)[0].module
n = 16
A = np.random.default_rng(0).standard_normal((n, n))
C = A @ A.T / n + np.eye(n)
X, W = np.empty(n * (n + 1) // 2), np.ones(n * (n + 1) // 2)
# each called once, so that numba compiles it with the kernels' types
module.tilt2_table(C, 0, 1, np.empty(n), X, np.empty(n, np.int64))
module.packed_dot(X, W)
module.I2C_fill(C, np.empty((n, n)), np.empty(n))
ops = r"v?(?:fn?m(?:add|sub)\\d{{3}}|add|sub|mul|div|sqrt|max|min|and|or|xor)"
for name in ("tilt2_table", "packed_dot", "I2C_fill"):
    fn = getattr(module, name)
    asm = fn.inspect_asm(fn.signatures[0])
    packed = len(re.findall(rf"\\b{{ops}}pd\\b", asm))
    scalar = len(re.findall(rf"\\b{{ops}}sd\\b", asm))
    widest = "ymm" if "ymm" in asm else ("xmm" if "xmm" in asm else "none")
    print(f"  {{name}}: {{packed}} packed, {{scalar}} scalar double instructions (widest: {{widest}})")
"""


def vector_report(model: str = "two_layer") -> list[str]:
    """For the table loops of ``model``'s kernel (erf): how many of the
    double-precision arithmetic instructions in the machine code numba generates
    (``inspect_asm``, in a process with an empty numba cache: cached code cannot be
    inspected) are packed (``...pd``) rather than scalar (``...sd``), and the widest
    vector register used: the loops are meant to vectorise."""
    code = VECTORS.format(bench=str(ROOT / "benchmarks"), model=model)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
        )
    return out.stdout.strip().splitlines()


def fit_exponent(sizes, times) -> float:
    """Slope of log(time) against log(K) over the sizes >= 8 (the asymptotic regime)."""
    pts = [(math.log(k), math.log(t)) for k, t in zip(sizes, times) if k >= 8]
    if len(pts) < 2:
        return float("nan")
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def main() -> None:
    adapted = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    adapted.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 12, 16, 32, 64])
    adapted.add_argument("--anil-sizes", type=int, nargs="+", default=[2, 4, 8, 12, 16, 32, 64])
    adapted.add_argument("--repeats", type=int, default=5)
    adapted.add_argument(
        "--count-sizes",
        type=int,
        nargs="+",
        default=[2, 3, 4, 5, 6, 8, 16],
        help="K (= M) at which the arcsines are counted (at least five: larger K are interpolated)",
    )
    adapted.add_argument("--threads", type=int, default=2, help="threads of the threaded timings (1: none)")
    adapted.add_argument("--plot", help="write a log-log figure of the time per step here")
    args = adapted.parse_args()
    # numba reads this when first imported: room for the threaded timings
    os.environ["NUMBA_NUM_THREADS"] = str(max(1, args.threads))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    asin_s = asin_time()
    print(f"the kernels' arcsine alone (asin_, vectorised loop): {asin_s * 1e9:.2f} ns per value")
    print(
        "asin / step: arcsines one right-hand side computes; distinct: the distinct integrals among\n"
        "them (counted by running the module as Python, K <= max of --count-sizes; above, the\n"
        "degree-4 polynomial through the counts, marked ~); ns / asin: time per step over asin / step;\n"
        "floor: distinct x the arcsine's own cost; x floor: time per step over the floor;\n"
        "speed-up: one thread (CPU time) over the threads (wall time), so a busy machine understates it"
    )
    results = {}
    for model, sizes, what in (
        ("two_layer", args.sizes, "erf, both layers trained"),
        ("anil", args.anil_sizes, "erf, order 1, S = 1"),
    ):
        print(f"{model}, {what}, Euler dt = 0.01")
        counts = asin_counts(model, args.count_sizes)
        head = (
            f"{'K = M':>6} {'ms / step':>11} {'s / alpha':>10} {'asin / step':>12} {'distinct':>11}"
            f" {'ns / asin':>9} {'floor ms':>9} {'x floor':>8}"
        )
        if args.threads > 1:
            head += f" {f'{args.threads} threads':>11} {'speed-up':>9}"
        print(head)
        times, threaded = [], []
        for K in sizes:
            reps = args.repeats if K <= 16 else max(2, args.repeats // 2)
            t = step_time(model, K, K, reps)
            times.append(t)
            calls, distinct, counted = count_at(counts, K)
            mark = " " if counted else "~"
            floor = distinct * asin_s
            line = (
                f"{K:>6} {t * 1e3:>11.4f} {t * 100:>10.4f} {mark}{calls:>11} {mark}{distinct:>10}"
                f" {t / calls * 1e9:>9.2f} {floor * 1e3:>9.4f} {t / floor:>8.2f}"
            )
            if args.threads > 1 and K >= 4:
                tp = step_time(model, K, K, reps, threads=args.threads)
                threaded.append((K, t, tp))
                line += f" {tp * 1e3:>11.4f} {t / tp:>9.2f}"
            print(line, flush=True)
        print(f"  cost ~ K^{fit_exponent(sizes, times):.2f} (fit over K >= 8, one thread)")
        if threaded:
            since = threads_pay_from(threaded)
            from runtime.integrate import PARALLEL_FROM_K

            print(
                f"  {args.threads} threads pay from K = {since} on (faster at every measured K from there);"
                f" runtime's rule: K >= PARALLEL_FROM_K = {PARALLEL_FROM_K}"
            )
        results[model] = (sizes, times, threaded)
    sim_us = simulator_step_time() * 1e6
    print(f"anil simulator, order 1, population, N = 1000, K = M = 2: {sim_us:.1f} us / outer step")
    if args.plot:
        plot(results, args.plot, args.threads)
    print("vectorisation of the table loops (two_layer, machine code of this CPU):")
    for line in vector_report():
        print(line)
    print(f"regenerate (all models): {regenerate_time():.2f} s")
    with tempfile.TemporaryDirectory() as cache:
        print(f"cold start to first step (empty numba cache): {startup(cache):.2f} s")
        print(f"warm start to first step (numba cache filled): {startup(cache):.2f} s")
    if args.threads > 1:
        with tempfile.TemporaryDirectory() as cache:
            cold = startup(cache, args.threads)
            warm = startup(cache, args.threads)
            print(
                f"threaded loops, {args.threads} threads, two_layer K = M = 16, to the first step:"
                f" cold {cold:.2f} s, warm {warm:.2f} s (numba caches them)"
            )


def plot(results, path, threads) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.8), constrained_layout=True)
    for i, (model, (sizes, times, threaded)) in enumerate(results.items()):
        ax.loglog(sizes, np.array(times) * 1e3, "o-", color=f"C{i}", label=f"{model}, one thread")
        if threaded:
            ks, _, ts = zip(*threaded)
            label = f"{model}, {threads} threads"
            ax.loglog(ks, np.array(ts) * 1e3, "s--", color=f"C{i}", mfc="none", label=label)
    # Goldt et al.'s C++ integrator built on this machine, two_layer, one thread, CPU time (issue 12)
    ax.loglog([8, 16, 32], [0.24, 3.3, 48.0], "kx", ms=8, label="C++ reference (two_layer)")
    ks = sorted({k for sizes, _, _ in results.values() for k in sizes})
    ax.set_xticks(ks)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("K = M")
    ax.set_ylabel("ms per Euler step")
    ax.legend()
    fig.savefig(path, dpi=130)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
