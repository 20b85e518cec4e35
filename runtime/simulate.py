"""The finite-N simulator: the update rules of a model applied to real vectors.

This is the ground truth the flows are tested against (MODELS.md section 6).
One step: a fresh input ``x ~ N(0, I_N)`` and label noise ``zeta``; the fields
``lambda = W x / sqrt(N)``, ``nu = B x / sqrt(N)``; the per-sample gradients of
the model's loss (``G_k = dL/dlambda_k`` and ``dL/dc_k`` for each trained
readout, generated from the same model file as the flow); then each update rule
of the model file (derive/model.py: ``FirstLayer.step``,
``ReadoutUpdate.step``) with its own rate, decay and scaling.
"""

from __future__ import annotations

import math

import numpy as np

from .init import Init, realise, sample_network
from .integrate import SimulationDiverged, _bar, steps_for
from .kernels import load
from .trajectory import Trajectory, metadata


def _run_seed(kernel, W, B, vec, p, rates, N, n_steps, rec, rng, bar):
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
    Qs = np.empty((n_rec + 1, K, K))
    Rs = np.empty((n_rec + 1, K, M))
    vecs = {v.name: np.empty((n_rec + 1, K)) for v in model.state_vectors}

    def record(i):
        Qs[i] = W @ W.T / N
        Rs[i] = W @ B.T / N
        for name in vecs:
            vecs[name][i] = views[name]

    record(0)
    for step in range(1, n_steps + 1):
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
            if not np.all(np.isfinite(Qs[step // rec])):
                raise SimulationDiverged(step / N, model.name)
            if bar:
                bar.update(rec)
    return Qs, Rs, vecs


def simulate(
    model: str,
    params: dict | None = None,
    N: int = 500,
    seeds: int = 5,
    t_max: float = 1.0,
    init: Init | None = None,
    K: int = 2,
    M: int = 2,
    sigma0: float = 0.1,
    vectors: dict | None = None,
    record_every: float = 0.1,
    seed: int = 0,
    activation: str = "erf",
    progress: bool = False,
) -> Trajectory:
    """Run ``seeds`` independent finite-N simulations of ``model`` up to ``alpha = t_max``.

    Seed ``i`` uses ``numpy.random.default_rng(seed + i)``. With ``init`` the
    networks are built with exactly its overlaps (``realise``); without it, they
    are sampled (``w ~ N(0, sigma0^2)``, ``T = I``, readouts from ``vectors`` or
    the model's defaults), so that ``sampled_init(model, K, M, N, seed)`` is the
    flow's starting point for seed index 0.
    """
    kernel = load(model, activation)
    spec = kernel.model
    values = spec.resolve_params(params)
    N = int(N)
    if N < 1:
        raise ValueError(f"N must be >= 1, got {N}")
    if int(seeds) < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if init is not None:
        init = init.validate(spec)
        K, M = init.K, init.M
        base_vectors = init.vectors
    else:
        base_vectors = (
            Init(np.eye(K), np.zeros((K, M)), np.eye(M), dict(vectors or {})).validate(spec).vectors
        )
    if N < K + M:
        raise ValueError(f"N = {N} must be at least K + M = {K + M}")
    # one step is 1/N of alpha: times must be whole numbers of steps
    n_steps = steps_for(t_max, 1.0 / N, "t_max", "1/N")
    rec = steps_for(record_every, 1.0 / N, "record_every", "1/N")
    if n_steps % rec:
        raise ValueError(f"t_max = {t_max} is not a multiple of record_every = {record_every}")
    p = kernel.param_vector(values)
    rates = [(spec.numeric(spec.first_layer.rate, values), spec.numeric(spec.first_layer.decay, values))]
    rates += [(spec.numeric(r.rate, values), spec.numeric(r.decay, values)) for r in spec.readout_updates]
    order = spec.state_vectors + spec.const_vectors

    results = []
    T_real = None
    bar = _bar(n_steps * int(seeds), progress, f"simulate {model} N={N}")
    for i in range(int(seeds)):
        rng = np.random.default_rng(seed + i)
        if init is not None:
            W, B = realise(init, N, rng)
        else:
            W, B = sample_network(K, M, N, rng, sigma0)
        vec = np.concatenate(
            [np.asarray(base_vectors[v.name], dtype=np.float64) for v in order] + [np.zeros(0)]
        )
        T_real = B @ B.T / N
        results.append(_run_seed(kernel, W, B, vec, p, rates, N, n_steps, rec, rng, bar))
    if bar:
        bar.close()

    arrays = {"alpha": np.arange(n_steps // rec + 1) * (rec / N)}
    arrays["Q"] = np.stack([r[0] for r in results])
    arrays["R"] = np.stack([r[1] for r in results])
    arrays["T"] = T_real
    for v in spec.state_vectors:
        arrays[v.name] = np.stack([r[2][v.name] for r in results])
    consts = {"T": T_real, **{v.name: base_vectors[v.name] for v in spec.const_vectors}}
    c = kernel.pack_consts(consts, K, M)
    for v in spec.const_vectors:
        arrays[v.name] = np.asarray(base_vectors[v.name], dtype=np.float64)
    n_seeds, n_t = arrays["Q"].shape[:2]
    states = np.empty((n_seeds, n_t, kernel.state_size(K, M)))
    for s in range(n_seeds):
        for t in range(n_t):
            states[s, t] = kernel.pack_state({k: arrays[k][s, t] for k, _ in kernel.module.STATE}, K, M)
    mets = kernel.metrics(states.reshape(-1, states.shape[-1]), c, p, K, M).reshape(n_seeds, n_t, -1)
    for i, name in enumerate(kernel.metric_names):
        arrays[name] = mets[..., i]
    for name in ["Q", "R", *[v.name for v in spec.state_vectors], *kernel.metric_names]:
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
        seeds=int(seeds),
        seed=seed,
        t_max=t_max,
        record_every=rec / N,
        sigma0=None if init is not None else sigma0,
        init="explicit overlaps (realised exactly)" if init is not None else "sampled network",
    )
    return Trajectory(arrays, meta)
