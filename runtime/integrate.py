"""Integrating a generated flow (Euler as in the literature, or RK4).

The time loops are the generated ``run_euler`` and ``run_rk4`` (rendered from
derive/templates/_macros.jinja into every kernel, so numba's cache sees them
with their right-hand side); this front end checks inputs, runs them in chunks
for the progress bar, stops on divergence and assembles the trajectory.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .init import Init
from .kernels import Kernel, as_kernel
from .trajectory import Trajectory, metadata

METHODS = ("euler", "rk4")
# The threaded right-hand side (rhs_parallel) shares the pairs (k, l) of dQ among
# numba's threads. Below PARALLEL_FROM_K student units the threads cost more than
# they save (two threads, benchmarks/flow_speed.py: 1.25x for two_layer and 1.06x
# for anil at K = M = 8, 1.5x for both at K = M = 16). Its loops are compiled on
# each start (5-20 s; numba cannot cache threaded functions safely), so the
# automatic choice takes it only for runs that would last PARALLEL_MIN_SECONDS serially.
PARALLEL_FROM_K = 12
PARALLEL_MIN_SECONDS = 60.0


def use_parallel(parallel: bool | None, K: int, serial_seconds=None) -> bool:
    """Whether to run the threaded right-hand side: ``parallel`` if given; if None,
    ``K >= PARALLEL_FROM_K``, more than one numba thread, and ``serial_seconds()``
    (an estimate of the serial run time) above ``PARALLEL_MIN_SECONDS``."""
    if parallel is None:
        import numba

        if K < PARALLEL_FROM_K or numba.get_num_threads() < 2:
            return False
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


class FlowDiverged(RuntimeError):
    """The state stopped being finite; ``alpha`` says where."""

    def __init__(self, alpha: float, model: str):
        self.alpha = alpha
        super().__init__(
            f"the {model} flow diverged at alpha = {alpha:.6g} (state no longer finite); "
            "try a smaller dt or learning rate"
        )


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
) -> Trajectory:
    """Integrate the flow of ``model`` from ``init`` up to ``alpha = t_max``.

    ``record_every`` (in alpha, a multiple of ``dt``; default ``dt``, every step)
    sets the recorded times, which start at 0 and end at ``t_max``. ``parallel``
    shares the work of each step among numba's threads (``NUMBA_NUM_THREADS``);
    the default (None) does so for K >= PARALLEL_FROM_K when the serial run would
    take over PARALLEL_MIN_SECONDS (``use_parallel``). The result is the same to
    the last bit either way. ``model`` is a model name or a loaded ``Kernel``
    (``runtime.kernels.load_path``; its activation is its own).
    """
    kernel = as_kernel(model, activation)
    name = kernel.model.name
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    values = kernel.model.resolve_params(params)
    kernel.model.check_flow(values)
    init = init.validate(kernel.model)
    n_steps = steps_for(t_max, dt, "t_max")
    rec = steps_for(record_every if record_every is not None else dt, dt, "record_every")
    if n_steps % rec:
        raise ValueError(f"t_max = {t_max} is not a multiple of record_every = {record_every}")
    K, M = init.K, init.M
    y = kernel.pack_state(init.arrays(), K, M)
    c = kernel.pack_consts(init.arrays(), K, M)
    p = kernel.param_vector(values)
    n_rec = n_steps // rec
    traj = np.empty((n_rec + 1, y.size))
    traj[0] = y
    run = getattr(kernel.module, f"run_{method}")
    if use_parallel(parallel, K, _serial_estimate(run, y, c, p, K, M, dt, n_steps)):
        run = getattr(kernel.module, f"run_{method}_parallel")
    # chunks of whole recording intervals, about 50 of them when a bar is shown
    per_chunk = max(1, n_rec // 50) if progress else n_rec
    bar = _bar(n_steps, progress, f"flow {name}")
    done = 0
    while done < n_rec:
        todo = min(per_chunk, n_rec - done)
        bad = run(y, c, p, K, M, dt, todo * rec, rec, traj, done)
        if bad >= 0:
            if bar:
                bar.close()
            raise FlowDiverged((done * rec + bad) * dt, name)
        done += todo
        if bar:
            bar.update(todo * rec)
    if bar:
        bar.close()
    return _assemble(
        kernel,
        traj,
        c,
        p,
        K,
        M,
        np.arange(n_rec + 1) * (rec * dt),
        values,
        {"t_max": t_max, "dt": dt, "method": method, "record_every": rec * dt},
    )


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


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, mininterval=0.5)
