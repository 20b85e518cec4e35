"""Finite support sets on the simulation side (docs/models/anil.md 5.6-5.7).

1. ``runtime.simulate_meta.expected_update``, the closure-free Monte Carlo of the
   first-order flow over tasks and support sets: at ``n_s = inf`` it equals the
   generated kernel's right-hand side and eps_meta (to round-off: the mean over the
   task noise is then exact); at a large ``n_s`` it approaches them; at ``n_s = 2``
   it agrees with a brute-force Monte Carlo written below in plain numpy (support
   AND query samples drawn, the update rules of docs/models/anil.md 5.4-5.5 typed
   here, the inner loop of 5.6 as matrices), and differs from the population flow
   by more than the tolerance (the test can fail).
2. A simulation with finite ``n_s`` reports as ``eps_meta`` the error after
   adapting on ``n_s`` support samples, estimated at the simulated weights: above
   the population metric of the same state, equal to ``expected_update``'s estimate
   at the recorded overlaps, the other metrics the kernel's, and the run's own
   random draws untouched by the estimate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

import runtime
from runtime.scenarios import validation_init
from runtime.simulate_meta import expected_update

# a generic setting: label noise, feature variability, a trained start, two inner steps
PARAMS = {"eta": 0.8, "eta_a": 0.5, "s": 1.5, "sigma": 0.2, "eps_B": 0.3, "S": 2, "alpha_in": 0.6}


def kernel_values(params, init):
    """(dQ, dR, da, eps_meta) of the generated kernel at ``init``."""
    k = runtime.load("anil")
    K, M = init.R.shape
    y = k.pack_state({"Q": init.Q, "R": init.R, "a": init.vectors["a"]}, K, M)
    c = k.pack_consts({"T": init.T, "vbar": init.vectors["vbar"]}, K, M)
    p = k.param_vector(k.model.resolve_params(params))
    dy = np.zeros_like(y)
    k.module.rhs(y, c, p, K, M, dy)
    d = k.unpack_state(dy, K, M)
    eps = k.metrics(y, c, p, K, M)[list(k.metric_names).index("eps_meta")]
    return d["Q"], d["R"], d["a"], eps


def update(params, n_s, n_tasks, seed, init=None):
    init = init or validation_init()
    return expected_update(
        "anil",
        {**params, "n_s": n_s},
        init.Q,
        init.R,
        init.T,
        init.vectors,
        n_tasks,
        np.random.default_rng(seed),
    )


def test_population_expected_update_is_the_kernel_rhs():
    eu = update(PARAMS, math.inf, 16, 0)
    dQ, dR, da, eps = kernel_values(PARAMS, validation_init())
    np.testing.assert_allclose(eu.dQ[0], dQ, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(eu.dR[0], dR, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(eu.da[0], da, rtol=1e-9, atol=1e-12)
    assert eu.eps_meta[0] == pytest.approx(eps, rel=1e-9)
    assert np.all(eu.dQ[1] == 0)  # exact: no Monte Carlo error
    assert np.abs(dQ).max() > 0.05 and np.abs(da).max() > 0.01  # nothing trivially zero


def test_large_support_sets_approach_the_kernel_rhs():
    """n_s = 4000: the support-set bias is O(1/n_s), the Monte Carlo error small
    (the control variate); measured |difference| / (s.e.m. + 1/n_s) below 1."""
    n_s = 4000
    eu = update(PARAMS, n_s, 100, 1)
    for got, want in zip((eu.dQ, eu.dR, eu.da, eu.eps_meta), kernel_values(PARAMS, validation_init())):
        np.testing.assert_array_less(np.abs(got[0] - want), 5 * np.asarray(got[1]) + 2.0 / n_s)


# ----------------------------------------------------------------------------- brute force
def g(x):
    return erf(x / math.sqrt(2.0))


def gp(x):
    return math.sqrt(2.0 / math.pi) * np.exp(-(x**2) / 2)


def brute_force(params, init, n_s, n_tasks, n_query, rng):
    """Per task: the mean over ``n_query`` query samples of the first-order updates
    (docs/models/anil.md 5.4-5.5: dR_kn = -eta E[G_k nu_n], dQ_kl = -eta E[G_k lambda_l +
    G_l lambda_k] + eta^2/n_q E[G_k G_l], G_k = delta a'_k g'(lambda_k); da =
    -eta_a E[delta g(lambda)]) and of the clean error after adaptation, with a' from
    ``S`` steps on ``n_s`` drawn support samples (5.6). Returns arrays over tasks."""
    p = runtime.load("anil").model.resolve_params({**params, "n_s": n_s})
    Q, R, T = init.Q, init.R, init.T
    a, vbar = init.vectors["a"], init.vectors["vbar"]
    K, M = R.shape
    C = np.block([[Q, R, R], [R.T, T, T], [R.T, T, T + p["eps_B"] ** 2 * np.eye(M)]])
    w, V = np.linalg.eigh(C)
    L = V * np.sqrt(np.clip(w, 0, None))

    def fields(*shape):
        u = rng.standard_normal((*shape, K + 2 * M)) @ L.T
        return u[..., :K], u[..., K : K + M], u[..., K + M :]

    v = vbar + p["s"] * rng.standard_normal((n_tasks, M))
    lam, _, nut = fields(n_tasks, n_s)
    y = np.einsum("tm,tsm->ts", v, g(nut)) + p["sigma"] * rng.standard_normal((n_tasks, n_s))
    Ch = np.einsum("tsk,tsl->tkl", g(lam), g(lam)) / n_s
    hh = np.einsum("ts,tsk->tk", y, g(lam)) / n_s
    c = np.broadcast_to(a, (n_tasks, K)).copy()
    for _ in range(int(p["S"])):
        c = c - p["alpha_in"] * (np.einsum("tkl,tl->tk", Ch, c) - hh)
    lam, nu, nut = fields(n_tasks, n_query)
    clean = np.einsum("tm,tqm->tq", v, g(nut))
    f = np.einsum("tk,tqk->tq", c, g(lam))
    delta = f - clean - p["sigma"] * rng.standard_normal((n_tasks, n_query))
    G = delta[..., None] * c[:, None, :] * gp(lam)
    eta, n_q = p["eta"], p["n_q"]
    dR = -eta * np.einsum("tqk,tqn->tkn", G, nu) / n_query
    GG = np.einsum("tqk,tql->tkl", G, G) / n_query
    Glam = np.einsum("tqk,tql->tkl", G, lam) / n_query
    dQ = -eta * (Glam + Glam.transpose(0, 2, 1)) + eta**2 / n_q * GG
    da = -p["eta_a"] * np.einsum("tq,tqk->tk", delta, g(lam)) / n_query
    eps = 0.5 * ((f - clean) ** 2).mean(-1)
    return dQ, dR, da, eps


def test_finite_support_expected_update_against_brute_force():
    n_s = 2
    init = validation_init()
    eu = update(PARAMS, n_s, 20000, 2)
    brute = brute_force(PARAMS, init, n_s, 20000, 64, np.random.default_rng(3))
    population = kernel_values(PARAMS, init)
    worst_fit, worst_gap = 0.0, 0.0
    for got, b, pop in zip((eu.dQ, eu.dR, eu.da, eu.eps_meta), brute, population):
        b_mean = b.mean(0)
        b_sem = b.std(0, ddof=1) / math.sqrt(b.shape[0])
        tol = 5 * np.sqrt(np.asarray(got[1]) ** 2 + b_sem**2)
        worst_fit = max(worst_fit, float(np.max(np.abs(got[0] - b_mean) / tol)))
        worst_gap = max(worst_gap, float(np.max(np.abs(pop - b_mean) / tol)))
    assert worst_fit < 1, worst_fit  # measured 0.4
    # with the same tolerance, the population flow is rejected: the test has power
    assert worst_gap > 2, worst_gap  # measured 2.8 (14 combined s.e.m.)


# ----------------------------------------------------------------------------- the simulator
def test_simulation_reports_eps_meta_after_adapting_on_the_support_set():
    params = {"n_s": 1, "s": 1.5, "S": 1}
    init = validation_init()
    kw = dict(N=200, seeds=2, t_max=0.5, init=init, record_every=0.25, seed=5)
    sim = runtime.simulate("anil", params, metric_tasks=400, **kw)
    assert sim.metadata["metric_tasks"] == 400
    assert sim.metadata["metrics_over_support_sets"] == ["eps_meta"]
    assert sim.eps_meta_mc_sem.shape == sim.eps_meta.shape
    k = runtime.load("anil")
    p = k.param_vector(k.model.resolve_params({**params, "n_s": math.inf}))
    p_fin = k.param_vector(k.model.resolve_params(params))
    names = list(k.metric_names)
    for s in range(2):
        c = k.pack_consts({"T": sim.T, "vbar": init.vectors["vbar"]}, 2, 2)
        ys = np.stack(
            [k.pack_state({"Q": sim.Q[s, t], "R": sim.R[s, t], "a": sim.a[s, t]}, 2, 2) for t in range(3)]
        )
        pop = k.metrics(ys, c, p, 2, 2)
        for other in ("eps_pre", "eps_opt"):
            np.testing.assert_allclose(getattr(sim, other)[s], pop[:, names.index(other)], rtol=1e-12)
        # one support sample: far above the population inner loop's error
        gap = sim.eps_meta[s] - pop[:, names.index("eps_meta")]
        assert np.all(gap > 5 * sim.eps_meta_mc_sem[s]), (gap, sim.eps_meta_mc_sem[s])  # measured 7-11
        # and it is the flow's finite-support eps_meta at the simulated overlaps (one
        # inner step: exact, docs/models/anil.md 5.6); measured within 1 s.e.m.
        fin = k.metrics(ys, c, p_fin, 2, 2)[:, names.index("eps_meta")]
        assert np.all(np.abs(sim.eps_meta[s] - fin) < 4 * sim.eps_meta_mc_sem[s]), (sim.eps_meta[s], fin)
    # at the start the network realises exactly the given overlaps (T = I, no eps_B)
    eu = update({"s": 1.5, "S": 1}, 1, 4000, 6, init=init)
    for s in range(2):
        tol = 5 * math.hypot(eu.eps_meta[1], sim.eps_meta_mc_sem[s, 0])
        assert abs(sim.eps_meta[s, 0] - eu.eps_meta[0]) < tol
    # the estimate draws from a stream of its own: the run is the same with fewer tasks
    other = runtime.simulate("anil", params, metric_tasks=2, **kw)
    np.testing.assert_array_equal(other.Q, sim.Q)
    assert np.abs(other.eps_meta - sim.eps_meta).max() > 0


def test_metric_tasks_is_checked():
    with pytest.raises(ValueError, match="metric_tasks must be >= 2"):
        runtime.simulate("anil", {"n_s": 2}, N=20, seeds=1, t_max=0.1, metric_tasks=1)


def test_realised_covariances_of_perturbed_task_teachers_match_real_draws():
    """With feature variability each task has its own teacher B + eps_B Z: the
    covariances realised by these vectors, drawn through their sufficient statistics
    (QR and Bartlett's Wishart, no N-vector), have the law of real draws of Z; at a
    small N (8 degrees of freedom left) a wrong count would move the means by 1/N."""
    from runtime.simulate_meta import MetaStep, realised_covariances

    eps_B, N, n = 0.7, 12, 40000
    rng = np.random.default_rng(9)
    W, B = rng.standard_normal((2, N)), rng.standard_normal((2, N))
    step = MetaStep(
        runtime.load("anil").model, "erf", runtime.load("anil").model.resolve_params({"eps_B": eps_B})
    )
    fast = realised_covariances(step, W, B, n, rng)
    Bt = B + eps_B * rng.standard_normal((n, 2, N))
    V = np.concatenate([np.broadcast_to(np.vstack([W, B]), (n, 4, N)), Bt], axis=1)
    real = np.einsum("tin,tjn->tij", V, V) / N
    iu = np.triu_indices(6)
    a, b = fast[:, iu[0], iu[1]], real[:, iu[0], iu[1]]
    fixed = (iu[0] < 4) & (iu[1] < 4)  # W and B alone: no random entry
    assert np.abs(a[:, fixed] - b[:, fixed]).max() < 1e-12
    sem = np.sqrt((a.var(0) + b.var(0)) / n) + 1e-15
    assert np.all(np.abs(a.mean(0) - b.mean(0)) < 5 * sem)
    ca, cb = np.cov(a.T), np.cov(b.T)
    scale = np.sqrt(np.outer(np.diag(cb), np.diag(cb))) + 1e-15
    assert np.abs(ca - cb).max() / scale.max() < 0.05, np.abs(ca - cb).max() / scale.max()
