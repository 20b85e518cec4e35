"""The finite-N simulator: the update rules of a model applied to real vectors.

This is the ground truth the flows are tested against (docs/simulation.md section 6).
One step: a fresh input ``x ~ N(0, I_N)`` and label noise ``zeta``; the fields
``lambda = W x / sqrt(N)``, ``nu = B x / sqrt(N)``; the per-sample gradients of
the model's loss (``G_k = dL/dlambda_k`` and ``dL/dc_k`` for each trained
readout, generated from the same model file as the flow); then each update rule
of the model file (derive/model.py: ``FirstLayer.step``,
``ReadoutUpdate.step``) with its own rate, decay and scaling. Models with an
inner loop (meta-learning) run the algorithm of runtime/simulate_meta.py, which
applies the same update rules.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time

import numpy as np

from derive.model import CONST_OVERLAPS, STATE_OVERLAPS
from derive.simulator import standard_form

from .init import Init, readouts, realise, sample_network
from .integrate import (
    SimulationDiverged,
    SimulationInterrupted,
    _bar,
    _gib,
    _stderr,
    normalised_overlaps,
    physical_memory,
    steps_for,
)
from .kernels import Kernel, as_kernel, compile_notice, needs_compiling
from .simulate_meta import SeedInterrupted, default_metric_tasks, prepare_metrics, run_seed_meta
from .trajectory import Trajectory, metadata


# a simulation checks for a request to stop (an interrupt) every this many steps
STOP_CHECK_STEPS = 256


def _run_seed(kernel, W, B, vec, p, rates, N, n_steps, rec, rng, bar, stop=None):
    K, M = W.shape[0], B.shape[0]
    model = kernel.model
    rules = model.readout_updates
    offsets = {}
    o = 0
    for v in model.state_vectors + model.const_vectors:
        n = K if v.over == "student" else M
        offsets[v.name] = (o, o + n)
        o += n
    views = {name: vec[a:b] for name, (a, b) in offsets.items()}
    out = np.empty(K * (1 + len(rules)))
    grads = kernel.module.sample_gradients
    sqrt_n = math.sqrt(N)
    (fl_rate, fl_decay), ro = rates[0], rates[1:]
    n_rec = n_steps // rec
    overlaps = {o.name: np.empty((n_rec + 1, *o.shape(K, M))) for o in STATE_OVERLAPS}
    vecs = {v.name: np.empty((n_rec + 1, K)) for v in model.state_vectors}

    def record(i):
        for o in STATE_OVERLAPS:
            overlaps[o.name][i] = o.of(W, B)
        for name in vecs:
            vecs[name][i] = views[name]

    record(0)
    made = 0  # the last record made; an interrupt returns the records up to it

    def made_so_far():
        return (
            {name: x[: made + 1] for name, x in overlaps.items()},
            {name: x[: made + 1] for name, x in vecs.items()},
        )

    try:
        for step in range(1, n_steps + 1):
            if stop is not None and step % STOP_CHECK_STEPS == 0 and stop():
                break
            x = rng.standard_normal(N)
            zeta = rng.standard_normal()
            lam = W @ x / sqrt_n
            nu = B @ x / sqrt_n
            grads(lam, nu, zeta, vec, p, K, M, out)
            model.first_layer.step(W, out[:K], x, fl_rate, fl_decay)
            for i, rule in enumerate(rules):
                rule.step(views[rule.vector.name], out[K * (i + 1) : K * (i + 2)], N, *ro[i])
            if step % rec == 0:
                record(step // rec)
                made = step // rec
                if not all(np.all(np.isfinite(a[made])) for a in overlaps.values()):
                    raise SimulationDiverged(step / N, model.name)
                if bar:
                    bar.update(rec)
    except KeyboardInterrupt:
        raise SeedInterrupted(made_so_far()) from None
    return made_so_far()


def seed_bytes(model, values: dict, K: int, M: int, N: int) -> int:
    """Bytes of the vectors of length N one seed holds at once: student and teacher
    weights, the orthonormalised directions that build them (with QR's copy), and
    the inputs of a step (one x; for meta-learning the query and support samples
    and the task's teacher variations)."""
    vectors = K + M + 2 * (K + M) + 1
    if model.inner_loop is not None:
        n_s = values.get("n_s", math.inf)
        vectors += int(values.get("n_q", 1)) + (int(n_s) if math.isfinite(n_s) else 0) + M
    return 8 * N * vectors


def check_memory(model, values: dict, K: int, M: int, N: int, workers: int) -> None:
    """Refuse a simulation whose seeds running at once would not fit in memory."""
    need = seed_bytes(model, values, K, M, N) * workers
    avail = physical_memory()
    if avail and need > 0.8 * avail:
        raise ValueError(
            f"N = {N}: the simulation would need about {_gib(need)} ({workers} seed(s) at once, "
            f"{_gib(need / workers)} each), over the memory of this machine ({_gib(avail)}); "
            "use a smaller N"
        )


def default_record_steps(n_steps: int, records: int = 100) -> int:
    """About ``records`` records: the largest divisor of ``n_steps`` not above
    ``n_steps / records``, so that the last record is at ``t_max``."""
    target = max(1, n_steps // records)
    return max(d for d in range(1, target + 1) if n_steps % d == 0)


class _SharedCounter:
    """A progress counter that worker processes update (``.update(n)`` like tqdm)."""

    def __init__(self, value):
        self.value = value

    def update(self, n: int) -> None:
        with self.value.get_lock():
            self.value.value += n


_COUNTER = None
# Set (to 1) by an interrupt: seeds running return their records so far, seeds not
# yet started do not start. A multiprocessing Value, inherited by the workers.
_STOP = None


def _stopping() -> bool:
    return _STOP is not None and bool(_STOP.value)


def _init_worker(value, stop) -> None:
    global _COUNTER, _STOP
    _COUNTER = _SharedCounter(value)
    _STOP = stop
    # the parent decides: an interrupt sets _STOP, and each worker returns its records
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (the parent's, which stops the run as SIGINT does) ends a worker: the
    # pool's terminate() sends it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# The kernels of the simulations of this process, by id. A Kernel holds a module,
# which a job cannot carry to a worker by pickling; the workers are forked after
# the kernel is entered here, so they find it by its key.
_KERNELS: dict[int, Kernel] = {}


def _seed_job(job: dict, seed_i: int, bar=None):
    """One seed: build the network, run it; its evolving order parameters and
    readouts over the records, and its constant order parameters (T)."""
    if _stopping():
        return None
    kernel = _KERNELS[job["kernel"]]
    spec = kernel.model
    bar = bar if bar is not None else _COUNTER
    rng = np.random.default_rng(seed_i)
    W, B, vec = _network(job, spec, rng)
    # the draws of the metrics estimated over support sets: a stream of their own
    metric_rng = np.random.default_rng(np.random.SeedSequence(seed_i).spawn(1)[0])
    try:
        out = _run(kernel, job, (W, B, vec), job["N"], rng, bar, metric_rng)
    except SeedInterrupted as exc:  # in this process (workers ignore SIGINT): stop the others
        if _STOP is not None:
            _STOP.value = 1
        out = exc.records
    return (*out, {o.name: o.of(W, B) for o in CONST_OVERLAPS})


def _network(job: dict, spec, rng):
    """A seed's student and teacher weights and its readouts (one flat vector)."""
    N, K, M = job["N"], job["K"], job["M"]
    if job["init"] is not None:
        W, B = realise(job["init"], N, rng)
    else:
        W, B = sample_network(K, M, N, rng, job["sigma0"])
    order = spec.state_vectors + spec.const_vectors
    vec = np.concatenate(
        [np.asarray(job["base_vectors"][v.name], dtype=np.float64) for v in order] + [np.zeros(0)]
    )
    return W, B, vec


def _warm(kernel, job: dict, say) -> None:
    """Compile the simulator's kernels (or load them from numba's cache) before the
    progress bar starts and before the workers are forked (each would compile
    them again): one step of a small network, with the types of the real run."""
    spec = kernel.model
    module = kernel.module
    if spec.inner_loop is None:
        main = module.sample_gradients
    elif hasattr(module, "meta_steps") and standard_form(spec) is not None:
        main = module.meta_steps
    else:  # the numpy reference (MetaStep): nothing to compile but the metrics
        main = None
    functions = [f for f in (main, module.metrics) if f is not None]
    if say and needs_compiling(*functions):
        say(compile_notice(kernel, "simulator's kernels"))
    K, M = job["K"], job["M"]
    if main is not None:
        small = {**job, "N": K + M + 8, "n_steps": 1, "rec": 1}
        rng = np.random.default_rng(0)
        try:
            _run(kernel, small, _network(small, spec, rng), small["N"], rng, None)
        except SimulationDiverged:  # one step of a small network may; it is compiled all the same
            pass
    c = np.zeros(kernel.consts_size(K, M))
    kernel.metrics(np.zeros(kernel.state_size(K, M)), c, job["p"], K, M)
    if spec.inner_loop is not None and math.isfinite(job["values"].get("n_s", math.inf)):
        # the metrics over support sets: their expressions derived once, before a fork
        prepare_metrics(spec, kernel.activation, job["values"], K, M)


def _run(kernel, job, args, N, rng, bar, metric_rng=None):
    spec = kernel.model
    if spec.inner_loop is not None:
        out = run_seed_meta(
            spec,
            *args,
            job["values"],
            job["rates"],
            N,
            job["n_steps"],
            job["rec"],
            rng,
            bar,
            job["activation"],
            module=kernel.module,
            stop=_stopping,
            metric_tasks=job["metric_tasks"] if metric_rng is not None else 0,
            metric_rng=metric_rng,
        )
    else:
        args = (*args, job["p"], job["rates"], N, job["n_steps"], job["rec"], rng, bar)
        out = _run_seed(kernel, *args, stop=_stopping)
    return out


def _parallel(job, seeds_list, n_workers, total, progress, desc):
    """The seeds in ``n_workers`` forked processes. On an interrupt the workers (which
    ignore SIGINT) are told to stop and return their records so far."""
    ctx = mp.get_context("fork")
    value = ctx.Value("q", 0)
    bar = _bar(total, progress, desc)
    pool = ctx.Pool(n_workers, initializer=_init_worker, initargs=(value, _STOP))
    try:
        pending = [pool.apply_async(_seed_job, (job, sd)) for sd in seeds_list]
        try:
            while not all(f.ready() for f in pending):
                time.sleep(0.1)
                if bar:
                    bar.n = value.value
                    bar.refresh()
        except KeyboardInterrupt:
            _STOP.value = 1
        results = [f.get() for f in pending]
        pool.close()
    finally:
        pool.terminate()  # at once, also on a second interrupt while the workers stop
        pool.join()
    if bar:
        bar.n = total
        bar.close()
    return results


def simulate(
    model: str | Kernel,
    params: dict | None = None,
    N: int = 500,
    seeds: int = 5,
    t_max: float = 1.0,
    init: Init | None = None,
    K: int = 2,
    M: int = 2,
    sigma0: float = 0.1,
    vectors: dict | None = None,
    record_every: float | None = None,
    seed: int = 0,
    activation: str = "erf",
    progress: bool = False,
    workers: int | None = None,
    log=None,
    metric_tasks: int | None = None,
) -> Trajectory:
    """Run ``seeds`` independent finite-N simulations of ``model`` up to ``alpha = t_max``.

    Seed ``i`` uses ``numpy.random.default_rng(seed + i)``. With ``init`` the
    networks are built with exactly its overlaps (``realise``); without it, they
    are sampled (``w ~ N(0, sigma0^2)``, ``T = I``, readouts from ``vectors`` or
    the model's defaults), so that ``sampled_init(model, K, M, N, seed)`` is the
    flow's starting point for seed index 0. ``record_every`` (in alpha, a
    multiple of 1/N) defaults to about 100 records. Seeds run in ``workers`` processes
    (default: one per core for long runs); the results do not depend on it.
    ``model`` is a model name or a loaded ``Kernel`` (``runtime.kernels.load_path``;
    its activation is its own). ``log`` (a function of a string; with ``progress``
    by default stderr) hears that the kernels are being compiled, on a first run.

    With a finite support set (``n_s``), the metrics that depend on it (``eps_meta``)
    are the error after adapting on ``n_s`` fresh support samples, estimated at each
    record at the simulated weights over ``metric_tasks`` tasks and support sets
    (default ``runtime.simulate_meta.default_metric_tasks(n_s)``: 2000 up to n_s = 50,
    fewer beyond; ``realised_metrics``: the query expectation exact), with
    their Monte Carlo s.e.m. per seed in ``NAME_mc_sem``; the other metrics, and all
    of them with ``n_s = inf``, are the kernel's at the recorded order parameters.
    """
    kernel = as_kernel(model, activation)
    _KERNELS[id(kernel)] = kernel
    name = kernel.model.name
    spec = kernel.model
    values = spec.resolve_params(params)
    N = int(N)
    if N < 1:
        raise ValueError(f"N must be >= 1, got {N}")
    if int(seeds) < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0 (a numpy seed), got {seed}")
    if metric_tasks is None:
        metric_tasks = default_metric_tasks(values.get("n_s", math.inf))
    if int(metric_tasks) < 2:
        raise ValueError(f"metric_tasks must be >= 2 (a Monte Carlo s.e.m.), got {metric_tasks}")
    if init is not None:
        init = init.validate(spec)
        K, M = init.K, init.M
        base_vectors = init.vectors
    else:
        base_vectors = readouts(spec, K, M, vectors)
    if N < K + M:
        raise ValueError(f"N = {N} must be at least K + M = {K + M}")
    # one step is 1/N of alpha: times must be whole numbers of steps
    n_steps = steps_for(t_max, 1.0 / N, "t_max", "1/N")
    if workers is None:  # processes pay off only for long runs
        workers = (os.cpu_count() or 1) if n_steps * int(seeds) >= 200_000 else 1
    n_workers = max(1, min(int(seeds), int(workers)))
    check_memory(spec, values, K, M, N, n_workers)
    if record_every is None:
        rec = default_record_steps(n_steps)
    else:
        rec = steps_for(record_every, 1.0 / N, "record_every", "1/N")
    if n_steps % rec:
        raise ValueError(f"t_max = {t_max} is not a multiple of record_every = {record_every}")
    p = kernel.param_vector(values)
    rates = [(spec.numeric(spec.first_layer.rate, values), spec.numeric(spec.first_layer.decay, values))]
    rates += [(spec.numeric(r.rate, values), spec.numeric(r.decay, values)) for r in spec.readout_updates]

    job = {
        "kernel": id(kernel),
        "activation": kernel.activation,
        "values": values,
        "init": init,
        "base_vectors": base_vectors,
        "K": K,
        "M": M,
        "N": N,
        "sigma0": sigma0,
        "n_steps": n_steps,
        "rec": rec,
        "rates": rates,
        "p": p,
        "metric_tasks": int(metric_tasks),
    }
    seeds_list = [seed + i for i in range(int(seeds))]
    total = n_steps * int(seeds)
    with np.errstate(all="ignore"):  # the metrics of a zero state
        _warm(kernel, job, log or (_stderr if progress else None))
    global _STOP
    _STOP = mp.get_context("fork").Value("b", 0)
    try:
        if n_workers == 1:
            bar = _bar(total, progress, f"simulate {name} N={N}")
            results = []
            for sd in seeds_list:
                try:
                    results.append(_seed_job(job, sd, bar))
                except KeyboardInterrupt:  # between two seeds
                    _STOP.value = 1
                if _stopping():  # an interrupt in this seed (its records so far) or between seeds
                    _STOP.value = 1
                    break
            if bar:
                bar.close()
        else:
            results = _parallel(job, seeds_list, n_workers, total, progress, f"simulate {name} N={N}")
        interrupted = bool(_STOP.value)
    finally:
        _STOP = None
    used = [sd for sd, r in zip(seeds_list, results) if r is not None]  # not: seeds that had not started
    results = [r for r in results if r is not None]
    if interrupted and not results:
        raise KeyboardInterrupt
    n_t = min(len(next(iter(r[0].values()))) for r in results)
    results = [
        ({k: v[:n_t] for k, v in r[0].items()}, {k: v[:n_t] for k, v in r[1].items()}, r[2]) for r in results
    ]
    interrupted = interrupted and n_t < n_steps // rec + 1
    overlaps_seeds, vectors_seeds, consts_seeds = zip(*results)
    # each seed's teacher has its own realised T (equal to round-off); its metrics use it
    T_seeds = [c["T"] for c in consts_seeds]

    arrays = {"alpha": np.arange(n_t) * (rec / N)}
    for o in STATE_OVERLAPS:
        arrays[o.name] = np.stack([ov[o.name] for ov in overlaps_seeds])
    arrays.update(consts_seeds[0])
    for v in spec.state_vectors:
        arrays[v.name] = np.stack([vs[v.name] for vs in vectors_seeds])
    for v in spec.const_vectors:
        arrays[v.name] = np.asarray(base_vectors[v.name], dtype=np.float64)
    n_seeds, n_t = arrays["Q"].shape[:2]
    mets = np.empty((n_seeds, n_t, len(kernel.metric_names)))
    r = np.empty_like(arrays["R"])
    for s in range(n_seeds):
        consts = {**consts_seeds[s], **{v.name: base_vectors[v.name] for v in spec.const_vectors}}
        c = kernel.pack_consts(consts, K, M)
        states = np.stack(
            [
                kernel.pack_state({k: arrays[k][s, t] for k, _ in kernel.module.STATE}, K, M)
                for t in range(n_t)
            ]
        )
        mets[s] = kernel.metrics(states, c, p, K, M)
        for i, name in enumerate(kernel.metric_names):  # estimated over support sets
            if f"metric:{name}" in vectors_seeds[s]:
                mets[s][:, i] = vectors_seeds[s][f"metric:{name}"]
        r[s] = normalised_overlaps(arrays["Q"][s], arrays["R"][s], T_seeds[s])
    for i, name in enumerate(kernel.metric_names):
        arrays[name] = mets[..., i]
    estimated = [name for name in kernel.metric_names if f"metric_sem:{name}" in vectors_seeds[0]]
    for name in estimated:
        arrays[f"{name}_mc_sem"] = np.stack([vs[f"metric_sem:{name}"] for vs in vectors_seeds])
    arrays["r"] = r
    summarised = [o.name for o in STATE_OVERLAPS] + ["r"] + [v.name for v in spec.state_vectors]
    for name in summarised + list(kernel.metric_names):
        a = arrays[name]
        arrays[f"{name}_mean"] = a.mean(axis=0)
        arrays[f"{name}_sem"] = (
            a.std(axis=0, ddof=1) / np.sqrt(n_seeds) if n_seeds > 1 else np.full(a.shape[1:], np.nan)
        )
    meta = metadata(
        "simulation",
        kernel,
        values,
        K=K,
        M=M,
        N=N,
        seeds=len(results),
        seed=seed,
        seeds_used=used,
        t_max=t_max,
        record_every=rec / N,
        sigma0=None if init is not None else sigma0,
        init="explicit overlaps (realised exactly)" if init is not None else "sampled network",
        metric_tasks=int(metric_tasks) if estimated else None,
        metrics_over_support_sets=estimated,
    )
    traj = Trajectory(arrays, meta)
    if interrupted:
        alpha = float(arrays["alpha"][-1])
        meta.update(complete=False, alpha_reached=alpha, stopped="interrupted", seeds_asked=int(seeds))
        raise SimulationInterrupted(alpha, traj)
    return traj
