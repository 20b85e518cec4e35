"""Integrating a generated flow (Euler as in the literature, RK4, or the adaptive
Dormand-Prince 5(4) pair with error control).

The time loops are the generated ``run_euler``, ``run_rk4`` and ``run_adaptive``
(rendered from derive/templates/_macros.jinja into every kernel, so numba's cache
sees them with their right-hand side; the adaptive pair's numbers come from
derive/integrators.py); this front end checks inputs, runs them in chunks for the
progress bar and for interrupts, stops on divergence and assembles the trajectory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time

import numpy as np

from .init import Init
from .kernels import Kernel, as_kernel, compile_notice, needs_compiling, outlined
from .trajectory import Trajectory, metadata

METHODS = ("euler", "rk4", "adaptive")
# the tolerances of method="adaptive" when none are given
RTOL = 1e-8
ATOL = 1e-10
# The threaded right-hand side (rhs_parallel) shares the pairs (k, l) of dQ among
# numba's threads. Below PARALLEL_FROM_K student units the threads cost more than
# they save: benchmarks/flow_speed.py measures the speed-up at each K and prints the
# K from which it pays (two threads: see the README's figures). The threaded loops
# are cached by numba like the others (parallel=True functions are cacheable since
# numba 0.56: the thread count is read at run time, not compiled in; the same cache
# serves 1, 2 or 4 threads, bit for bit), so once compiled a run starts them at
# once, when a few steps timed each way find them faster (on a machine whose cores
# are busy the threads wait for each other: 7.7 ms a step at K = 16 against 0.3 ms
# on one thread, measured here); while they are not yet compiled (about 30 s),
# they are taken only for a run that would last PARALLEL_MIN_SECONDS serially.
PARALLEL_FROM_K = 12
PARALLEL_MIN_SECONDS = 60.0


def use_parallel(
    parallel: bool | None, K: int, serial_seconds=None, compiled: bool = False, threads_faster=None
) -> bool:
    """Whether to run the threaded right-hand side: ``parallel`` if given; if None,
    ``K >= PARALLEL_FROM_K`` and more than one numba thread, and: when the threaded
    loops are ``compiled`` (in this process or numba's cache), ``threads_faster()``
    if given (a few steps timed each way: on a machine whose cores are busy with
    other work the threads wait for each other and lose); otherwise
    ``serial_seconds()`` (an estimate of the serial run time) above
    ``PARALLEL_MIN_SECONDS``."""
    if parallel is None:
        import numba

        if K < PARALLEL_FROM_K or numba.get_num_threads() < 2:
            return False
        if compiled:
            return threads_faster is None or threads_faster()
        return serial_seconds is None or serial_seconds() > PARALLEL_MIN_SECONDS
    if not isinstance(parallel, bool):
        raise ValueError(f"parallel must be True, False or None (automatic), got {parallel!r}")
    return parallel


def _serial_estimate(run, y, c, p, K, M, dt, n_steps):
    """Seconds the serial loop would take for ``n_steps``, from a few timed steps on a copy."""

    def estimate():
        probe = 3
        scratch = np.empty((1, y.size))
        run(y.copy(), c, p, K, M, dt, 1, 2, scratch, 0)  # compiled or loaded from the cache
        t0 = time.perf_counter()
        run(y.copy(), c, p, K, M, dt, probe, probe + 1, scratch, 0)
        return (time.perf_counter() - t0) / probe * n_steps

    return estimate


def _threads_faster(serial, threaded, y, c, p, K, M, dt, probe: int = 4) -> bool:
    """Whether ``threaded`` runs Euler-like steps at least 10 % faster than ``serial``
    now (the least of three timings of ``probe`` steps each, on copies of the state)."""

    def timed(run):
        scratch = np.empty((1, y.size))
        run(y.copy(), c, p, K, M, dt, 1, 2, scratch, 0)  # loaded, threads started
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            run(y.copy(), c, p, K, M, dt, probe, probe + 1, scratch, 0)
            best = min(best, time.perf_counter() - t0)
        return best

    return timed(threaded) < 0.9 * timed(serial)


class FlowDiverged(RuntimeError):
    """The state stopped being finite; ``alpha`` says where, ``trajectory`` holds
    the records before it (marked partial), if any."""

    def __init__(
        self,
        alpha: float,
        model: str,
        trajectory: Trajectory | None = None,
        reason: str = "state no longer finite",
        hint: str = "try a smaller dt or learning rate",
    ):
        self.alpha = alpha
        self.trajectory = trajectory
        super().__init__(f"the {model} flow diverged at alpha = {alpha:.6g} ({reason}); {hint}")


class FlowInterrupted(KeyboardInterrupt):
    """An interrupt (Ctrl-C) between two chunks of the integration: ``trajectory``
    holds the records so far (marked partial), ``alpha`` the last recorded time;
    ``flow(..., resume=trajectory)`` continues from there."""

    def __init__(self, alpha: float, trajectory: Trajectory):
        self.alpha = alpha
        self.trajectory = trajectory
        super().__init__(f"interrupted at alpha = {alpha:.6g}")


class SimulationDiverged(RuntimeError):
    """The simulated weights stopped being finite; ``alpha`` says where."""

    def __init__(self, alpha: float, model: str):
        self.alpha = alpha
        self.model = model
        super().__init__(
            f"the {model} simulation diverged at alpha = {alpha:.6g} (weights no longer finite); "
            "try a smaller learning rate"
        )

    def __reduce__(self):  # raised in worker processes, rebuilt in the parent
        return (SimulationDiverged, (self.alpha, self.model))


class SimulationInterrupted(KeyboardInterrupt):
    """An interrupt (Ctrl-C) of a simulation: ``trajectory`` holds the records that
    every seed that started had made (marked partial), ``alpha`` the last of them."""

    def __init__(self, alpha: float, trajectory: Trajectory):
        self.alpha = alpha
        self.trajectory = trajectory
        super().__init__(f"interrupted at alpha = {alpha:.6g}")


def steps_for(t: float, dt: float, what: str, step_name: str = "dt") -> int:
    """Number of steps of length ``dt`` in ``t``; ``t`` must be a multiple of ``dt``."""
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"{step_name} must be a positive number, got {dt}")
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"{what} must be a positive number, got {t}")
    n = round(t / dt)
    if n < 1 or abs(n * dt - t) > 1e-9 * max(1.0, t):
        raise ValueError(f"{what} = {t} is not a whole number of steps {step_name} = {dt:g}")
    return n


def run_key(
    kernel: Kernel, values: dict, y0, c, method: str, dt: float, rec: int, n_steps: int, tolerances=None
) -> str:
    """What determines a flow's records: a partial trajectory with the same key can
    be resumed (``flow(..., resume=...)``) and gives the uninterrupted result (for
    method="adaptive", to within the tolerances ``(rtol, atol)``)."""
    h = hashlib.sha256()
    what = [kernel.model.name, kernel.activation, kernel.file_hash, sorted(values.items())]
    more = [repr(float(x)) for x in tolerances] if tolerances is not None else []
    h.update(json.dumps([*what, method, repr(dt), rec, n_steps, *more], default=str).encode())
    h.update(np.ascontiguousarray(y0, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(c, dtype=np.float64).tobytes())
    return h.hexdigest()


# Each call of the compiled loop runs about this long: an interrupt (Ctrl-C) is seen
# between calls, and the progress bar moves.
CHUNK_SECONDS = 0.2
# ``flow(log=...)`` tells of runs longer than this, and of states at least this large
LOG_SECONDS = 2.0
LARGE_STATE = 10_000


def flow(
    model: str | Kernel,
    init: Init,
    params: dict | None = None,
    t_max: float = 10.0,
    dt: float = 0.01,
    method: str = "euler",
    record_every: float | None = None,
    activation: str = "erf",
    progress: bool = False,
    parallel: bool | None = None,
    resume: Trajectory | None = None,
    log=None,
    rtol: float | None = None,
    atol: float | None = None,
) -> Trajectory:
    """Integrate the flow of ``model`` from ``init`` up to ``alpha = t_max``.

    ``record_every`` (in alpha, a multiple of ``dt``; default ``dt``, every step)
    sets the recorded times, which start at 0 and end at ``t_max``. ``parallel``
    shares the work of each step among numba's threads (``NUMBA_NUM_THREADS``);
    the default (None) does so for K >= PARALLEL_FROM_K when the serial run would
    take over PARALLEL_MIN_SECONDS (``use_parallel``). The result is the same to
    the last bit either way. ``model`` is a model name or a loaded ``Kernel``
    (``runtime.kernels.load_path``; its activation is its own).

    An interrupt (KeyboardInterrupt, Ctrl-C) raises ``FlowInterrupted`` with the
    records so far; a divergence raises ``FlowDiverged`` with the records before
    it. Such a partial trajectory (``metadata["complete"]`` false), given back as
    ``resume`` with the same arguments, is continued from its last record: the
    result equals the uninterrupted run. A ``resume`` of other arguments
    (``metadata["run_key"]`` differs) or a complete one is ignored. ``log``, a
    function of a string, hears of a long run: that a large flow is being prepared,
    and the time per step once the first steps are timed.

    ``method="adaptive"``: the embedded Dormand-Prince 5(4) pair with error control
    (``run_adaptive``): each step is accepted when its estimated error is within
    ``atol + rtol |y|`` (root mean square over the state; defaults RTOL and ATOL),
    and sets the next step. ``dt`` is then only the first step; ``record_every``
    (default ``dt``) need not be a multiple of it, but ``t_max`` must be a multiple
    of ``record_every``. The records come from the pair's continuous extension (of
    order 4), so they do not restrict the steps. The metadata count the
    right-hand-side evaluations and the accepted and rejected steps. A state whose
    slope is not finite, or a step that must shrink below about 1e-15 alpha, stops
    the flow with ``FlowDiverged``. A resumed adaptive run restarts its steps at
    the last record with the step ``dt``: the same as the uninterrupted run to
    within the tolerances, not to the bit.
    """
    kernel = as_kernel(model, activation)
    name = kernel.model.name
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    values = kernel.model.resolve_params(params)
    kernel.model.check_flow(values)
    init = init.validate(kernel.model)
    if method == "adaptive":
        return _flow_adaptive(
            kernel, init, values, t_max, dt, record_every, rtol, atol, progress, parallel, resume, log
        )
    if rtol is not None or atol is not None:
        raise ValueError(f"rtol and atol are for method='adaptive', not {method!r}")
    n_steps = steps_for(t_max, dt, "t_max")
    rec = steps_for(record_every if record_every is not None else dt, dt, "record_every")
    if n_steps % rec:
        raise ValueError(f"t_max = {t_max} is not a multiple of record_every = {record_every}")
    K, M = init.K, init.M
    y = kernel.pack_state(init.arrays(), K, M)
    c = kernel.pack_consts(init.arrays(), K, M)
    p = kernel.param_vector(values)
    n_rec = n_steps // rec
    check_trajectory_size(n_rec + 1, y.size, "record_every")
    key = run_key(kernel, values, y, c, method, dt, rec, n_steps)
    traj = np.empty((n_rec + 1, y.size))
    traj[0] = y
    done = 0  # records made
    if resume is not None and resume.metadata.get("run_key") == key and not resume.metadata.get("complete"):
        items = kernel.module.STATE
        n = len(resume.arrays["alpha"])
        if 1 <= n <= n_rec + 1:
            traj[:n] = np.concatenate([resume.arrays[k].reshape(n, -1) for k, _ in items], axis=1)
            done = n - 1
            y = traj[done].copy()
    resumed_at = done * rec * dt
    if log and y.size >= LARGE_STATE:
        log(f"preparing the {name} flow of K = {K}, M = {M} ({y.size} numbers in the state)")
    say = log or (_stderr if progress else None)
    run = getattr(kernel.module, f"run_{method}")
    scratch = np.empty((2, y.size))
    # compiled (told, it takes a while) or loaded from numba's cache before the
    # progress bar starts its clock, and before the first chunk is timed
    if say and needs_compiling(run, kernel.module.metrics):
        say(compile_notice(kernel))
    if say and needs_compiling(*outlined(kernel, p)):
        what = f"of {kernel.model.name}/{kernel.activation} that these parameters reach"
        say(f"compiling the outlined part {what} (first run only, numba caches it; about 1.5 min)")
    run(y.copy(), c, p, K, M, dt, 0, 1, scratch, 0)
    kernel.metrics(y, c, p, K, M)
    threaded = getattr(kernel.module, f"run_{method}_parallel")
    estimate = _serial_estimate(run, y, c, p, K, M, dt, n_steps - done * rec)
    faster = lambda: _threads_faster(run, threaded, y, c, p, K, M, dt)  # noqa: E731
    if use_parallel(parallel, K, estimate, not needs_compiling(threaded), faster):
        run = threaded
        if say and needs_compiling(run):
            say(compile_notice(kernel, "threaded loops", "first run only, numba caches them; about 30 s"))
        run(y.copy(), c, p, K, M, dt, 0, 1, scratch, 0)
    extra = {"t_max": t_max, "dt": dt, "method": method, "record_every": rec * dt, "run_key": key}
    if done:
        extra["resumed_from_alpha"] = resumed_at

    def partial(n_records: int, stopped: str) -> Trajectory:
        alpha = np.arange(n_records) * (rec * dt)
        more = {"complete": False, "alpha_reached": float(alpha[-1]), "stopped": stopped}
        return _assemble(kernel, traj[:n_records], c, p, K, M, alpha, values, {**extra, **more})

    bar = _bar(n_steps, progress, f"flow {name}")
    if bar:
        bar.update(done * rec)
    # Chunks of about CHUNK_SECONDS: whole recording intervals, or a part of one when
    # one interval takes longer (then the record is copied at its end).
    step = done * rec  # steps made; the state y is at step
    made = done  # the last record made
    chunk = 1
    first = True
    try:
        while step < n_steps:
            if chunk >= rec and step % rec == 0:
                todo = min(chunk // rec * rec, n_steps - step)
                t0 = time.perf_counter()
                bad = run(y, c, p, K, M, dt, todo, rec, traj, step // rec)
            else:
                todo = min(chunk, rec - step % rec)
                t0 = time.perf_counter()
                bad = run(y, c, p, K, M, dt, todo, todo, scratch, 0)
            elapsed = time.perf_counter() - t0
            if bad >= 0:
                last = (step + bad - 1) // rec  # the last finite record
                raise FlowDiverged((step + bad) * dt, name, partial(last + 1, "diverged"))
            step += todo
            if step % rec == 0:
                traj[step // rec] = y
                made = step // rec
            if bar:
                bar.update(todo)
            if log and first:
                left = (n_steps - step) * elapsed / todo
                if left > LOG_SECONDS:
                    log(f"flow {name}: {elapsed / todo * 1e3:.3g} ms per step, about {left:.0f} s to go")
            first = False
            chunk = int(min(max(chunk * CHUNK_SECONDS / max(elapsed, 1e-6), chunk / 4, 1), chunk * 8))
    except KeyboardInterrupt:
        raise FlowInterrupted(made * rec * dt, partial(made + 1, "interrupted")) from None
    finally:
        if bar:
            bar.close()
    return _assemble(kernel, traj, c, p, K, M, np.arange(n_rec + 1) * (rec * dt), values, extra)


def _flow_adaptive(
    kernel, init, values, t_max, dt, record_every, rtol, atol, progress, parallel, resume, log
):
    """``flow`` with method="adaptive" (its docstring), after the common checks."""
    name = kernel.model.name
    rtol = RTOL if rtol is None else rtol
    atol = ATOL if atol is None else atol
    if not (math.isfinite(rtol) and rtol > 0):
        raise ValueError(f"rtol must be a positive number, got {rtol}")
    if not (math.isfinite(atol) and atol >= 0):
        raise ValueError(f"atol must be a number >= 0, got {atol}")
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"dt (the first step) must be a positive number, got {dt}")
    every = record_every if record_every is not None else dt
    n_rec = steps_for(t_max, every, "t_max", "record_every")
    K, M = init.K, init.M
    y = kernel.pack_state(init.arrays(), K, M)
    c = kernel.pack_consts(init.arrays(), K, M)
    p = kernel.param_vector(values)
    check_trajectory_size(n_rec + 1, y.size, "record_every")
    key = run_key(kernel, values, y, c, "adaptive", dt, n_rec, n_rec, (rtol, atol, every))
    traj = np.empty((n_rec + 1, y.size))
    traj[0] = y
    done = 0  # records made
    # counts: right-hand-side evaluations, accepted steps, rejected steps, the next record,
    # whether the last step was rejected (run_adaptive in derive/templates/_macros.jinja)
    counts = np.zeros(5, np.int64)
    if resume is not None and resume.metadata.get("run_key") == key and not resume.metadata.get("complete"):
        n = len(resume.arrays["alpha"])
        if 1 <= n <= n_rec + 1:
            traj[:n] = np.concatenate(
                [resume.arrays[k].reshape(n, -1) for k, _ in kernel.module.STATE], axis=1
            )
            done = n - 1
            y = traj[done].copy()
            for i, k in enumerate(COUNTS):
                counts[i] = int(resume.metadata.get(k, 0))
    alpha0 = t_max if done == n_rec else done * every
    counts[3] = done + 1
    if log and y.size >= LARGE_STATE:
        log(f"preparing the {name} flow of K = {K}, M = {M} ({y.size} numbers in the state)")
    run = kernel.module.run_adaptive
    # the time of the serial loop, estimated by RK4 steps of dt (more than the adaptive run takes)
    n_est = max(1, round((t_max - alpha0) / dt))
    estimate = _serial_estimate(kernel.module.run_rk4, y, c, p, K, M, dt, n_est)
    rk4, rk4_threaded = kernel.module.run_rk4, kernel.module.run_rk4_parallel
    compiled = not needs_compiling(kernel.module.run_adaptive_parallel, rk4_threaded)
    faster = lambda: _threads_faster(rk4, rk4_threaded, y, c, p, K, M, dt)  # noqa: E731
    if use_parallel(parallel, K, estimate, compiled, faster):
        run = kernel.module.run_adaptive_parallel
    extra = {"t_max": t_max, "dt": dt, "method": "adaptive", "record_every": every}
    extra.update({"rtol": rtol, "atol": atol, "run_key": key})
    if done:
        extra["resumed_from_alpha"] = alpha0

    def tally() -> dict:
        return {k: int(counts[i]) for i, k in enumerate(COUNTS)}

    def partial(n_records: int, stopped: str) -> Trajectory:
        alpha = record_times(n_records, every, t_max, n_rec)
        more = {"complete": False, "alpha_reached": float(alpha[-1]), "stopped": stopped, **tally()}
        return _assemble(kernel, traj[:n_records], c, p, K, M, alpha, values, {**extra, **more})

    bar = _bar(n_rec, progress, f"flow {name}", "record")
    if bar:
        bar.update(done)
    clock = np.array([alpha0, dt])
    k1 = np.empty_like(y)
    # compiled or loaded from the cache (no step tried), so that the first chunk times steps
    scratch = (np.empty((1, y.size)), clock.copy(), counts.copy(), k1)
    run(y.copy(), c, p, K, M, t_max, rtol, atol, 0, every, *scratch, False)
    chunk = 1  # steps tried per call, adapted to about CHUNK_SECONDS
    fresh = True  # the first call computes the slope at the start
    first = True
    try:
        while True:
            before = int(counts[3])
            t0 = time.perf_counter()
            status = run(y, c, p, K, M, t_max, rtol, atol, chunk, every, traj, clock, counts, k1, fresh)
            elapsed = time.perf_counter() - t0
            fresh = False
            made = int(counts[3]) - 1  # the last record made
            if bar:
                bar.update(made + 1 - before)
            if status == 0:
                break
            if status in (2, 3):
                why = "slope no longer finite" if status == 2 else "step size underflow"
                hint = "try a smaller learning rate" + (" or tolerance" if status == 3 else "")
                raise FlowDiverged(float(clock[0]), name, partial(made + 1, "diverged"), why, hint)
            if log and first:
                left = (t_max - clock[0]) / max(clock[0] - alpha0, 1e-300) * elapsed
                if left > LOG_SECONDS and clock[0] > alpha0:
                    log(f"flow {name}: {elapsed / chunk * 1e3:.3g} ms per step, about {left:.0f} s to go")
            first = False
            chunk = int(min(max(chunk * CHUNK_SECONDS / max(elapsed, 1e-6), chunk / 4, 1), chunk * 8))
    except KeyboardInterrupt:
        made = int(counts[3]) - 1
        raise FlowInterrupted(
            float(record_times(made + 1, every, t_max, n_rec)[-1]), partial(made + 1, "interrupted")
        ) from None
    finally:
        if bar:
            bar.close()
    alpha = record_times(n_rec + 1, every, t_max, n_rec)
    return _assemble(kernel, traj, c, p, K, M, alpha, values, {**extra, **tally()})


# the counts of an adaptive flow in its metadata, in the order of run_adaptive's counts
COUNTS = ("rhs_evaluations", "steps_accepted", "steps_rejected")


def record_times(n_records: int, every: float, t_max: float, n_rec: int) -> np.ndarray:
    """The first ``n_records`` of the times ``j * every`` (j = 0..n_rec), the last
    being ``t_max`` itself (where run_adaptive writes it)."""
    alpha = np.arange(n_records) * every
    if n_records == n_rec + 1:
        alpha[-1] = t_max
    return alpha


def check_trajectory_size(n_records: int, size: int, hint: str) -> None:
    """Refuse a trajectory (n_records, size) of float64 larger than the memory."""
    need = n_records * size * 8
    avail = physical_memory()
    if avail and need > avail / 2:
        raise ValueError(
            f"the trajectory would take {_gib(need)} ({n_records} records of {size} numbers), "
            f"over half the memory ({_gib(avail)}); record less often with a larger {hint}"
        )


def physical_memory() -> int:
    """Bytes of physical memory (0 where unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def _assemble(kernel: Kernel, traj, c, p, K, M, alpha, values, extra) -> Trajectory:
    arrays = {"alpha": alpha}
    state = kernel.unpack_state(traj, K, M)
    consts = kernel.unpack(kernel.module.CONSTS, c, K, M)
    # the order parameters then the readouts, the kernel's layout (derive/model.py OVERLAPS)
    arrays.update({k: np.array(v) for k, v in state.items()})
    arrays.update({k: np.array(v) for k, v in consts.items()})
    mets = kernel.metrics(traj, c, p, K, M)
    for i, name in enumerate(kernel.metric_names):
        arrays[name] = mets[:, i]
    arrays["r"] = normalised_overlaps(arrays["Q"], arrays["R"], arrays["T"])
    return Trajectory(arrays, metadata("flow", kernel, values, K=K, M=M, **extra))


def normalised_overlaps(Q: np.ndarray, R: np.ndarray, T: np.ndarray) -> np.ndarray:
    """``r_km = R_km / sqrt(Q_kk T_mm)`` (docs/models/anil.md 5.7), over any leading axes."""
    q = np.einsum("...kk->...k", Q)
    with np.errstate(divide="ignore", invalid="ignore"):
        return R / np.sqrt(q[..., :, None] * np.diag(T)[None, :])


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _bar(total: int, enabled: bool, desc: str, unit: str = "step"):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=0.5)
