"""The closure-free Monte Carlo of the expected update at order 2 with a finite support
set (``runtime.simulate_meta.expected_update``, docs/models/anil.md 5.6 "Order 2"):
the reference the finite-``n_s`` second-order flow is checked against.

1. The Jacobians ``da'/dlambda^mu`` (one K x K block per support sample) and
   ``A = da'/da`` of ``support_sensitivities`` equal central finite differences of the
   inner loop re-implemented here in numpy, and the draws are ``draw_adapted``'s.
2. Order 1 is unchanged (golden numbers of the code before order 2 was added), and
   at order 2 the query part (``dQ - sup_Q1 - sup_Q2``, ``dR - sup_R``) is order 1's
   on the same tasks and support sets.
3. A brute-force Monte Carlo typed here in numpy (support AND query samples drawn, the
   Jacobian by hand-written forward mode, ``gamma`` from the sampled query gradient)
   agrees within its and the reference's s.e.m.
4. At a large ``n_s`` the update approaches the population second-order flow of the
   generated kernel (``sup_R``, ``sup_Q1`` its second-order terms), and ``sup_Q2``
   decays like ``1/n_s``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

import runtime
from runtime.scenarios import validation_init, validation_init_wide
from runtime.simulate_meta import MetaStep, draw_adapted, expected_update, support_sensitivities


def g(x):
    return erf(x / math.sqrt(2.0))


def gp(x):
    return math.sqrt(2.0 / math.pi) * np.exp(-(x**2) / 2)


def kernel_values(params, init):
    """(dQ, dR, da, eps_meta) of the generated kernel at ``init``."""
    k = runtime.load("anil")
    d = k.velocity(init, params)
    eps = k.metrics(*k.at(init, params))[list(k.metric_names).index("eps_meta")]
    return d["Q"], d["R"], d["a"], eps


def update(params, init, n_tasks, seed):
    return expected_update(
        "anil", params, init.Q, init.R, init.T, init.vectors, n_tasks, np.random.default_rng(seed)
    )


# ----------------------------------------------------------------------------- Jacobians
def inner_loop(lam, nut, zeta, v, a, alpha, S, sigma):
    """a' of one task: ``S`` steps on the sample statistics of its support set (5.6)."""
    G = g(lam)  # (K, n_s)
    y = v @ g(nut) + sigma * zeta
    ns = lam.shape[1]
    Ch, hh = G @ G.T / ns, G @ y / ns
    c = a.copy()
    for _ in range(S):
        c = c - alpha * (Ch @ c - hh)
    return c


def test_support_jacobians_equal_finite_differences():
    params = {"order": 2, "n_s": 4, "S": 3, "alpha_in": 0.6, "s": 1.5, "sigma": 0.3, "eps_B": 0.5}
    init = validation_init_wide()  # K = 3, M = 2
    model = runtime.load("anil").model
    values = model.resolve_params(params)
    step = MetaStep(model, "erf", values)
    K, M = init.R.shape
    cc = step.concrete(K, M)
    C = cc.covariance()(init.Q, init.R, init.T)
    a = init.vectors["a"]
    n = 3
    draw = support_sensitivities(step, cc, C, a, init.vectors, n, np.random.default_rng(4))
    # the same draws as draw_adapted
    v_ref, ad_ref = draw_adapted(step, cc, C, a, init.vectors, n, np.random.default_rng(4))
    np.testing.assert_array_equal(draw.v_task, v_ref)
    np.testing.assert_array_equal(draw.adapted, ad_ref)
    lam, nut = draw.fields[0], draw.fields[2]
    p = (values["alpha_in"], int(values["S"]), values["sigma"])
    h = 1e-6
    for t in range(n):
        args = (nut[:, t], draw.zeta[t], draw.v_task[:, t])
        np.testing.assert_allclose(inner_loop(lam[:, t], *args, a, *p), draw.adapted[:, t], rtol=1e-12)
        for mu in range(int(values["n_s"])):
            for r in range(K):
                up, dn = lam[:, t].copy(), lam[:, t].copy()
                up[r, mu] += h
                dn[r, mu] -= h
                fd = (inner_loop(up, *args, a, *p) - inner_loop(dn, *args, a, *p)) / (2 * h)
                np.testing.assert_allclose(draw.J[:, r, t, mu], fd, rtol=1e-6, atol=1e-9)
        for k in range(K):
            e = np.eye(K)[k] * h
            fd = (inner_loop(lam[:, t], *args, a + e, *p) - inner_loop(lam[:, t], *args, a - e, *p)) / (2 * h)
            np.testing.assert_allclose(draw.A[:, k, t], fd, rtol=1e-6, atol=1e-9)
    assert np.abs(draw.J).max() > 1e-2  # nothing trivially zero


# ----------------------------------------------------------------------------- order 1
# expected_update at order 1 before order 2 was added (validation start, 500 tasks, seed 7)
GOLDEN = [
    (
        {"n_s": 3, "s": 1.5},
        [[0.23678577796526698, 0.01788481117744151], [0.01788481117744151, 0.1238825843079098]],
        [[0.11443776877974646, 0.040820864190733414], [-0.016803078627072584, 0.06310136603104799]],
        [0.0, 0.0],
        0.7285812713684696,
        [[0.0209501376740078, 0.014642937135997758], [0.014642937135997758, 0.01632026083517455]],
    ),
    (
        {"n_s": 4, "S": 2, "alpha_in": 0.6, "eta_a": 0.5, "sigma": 0.3, "eps_B": 0.5},
        [[0.09797530658589268, 0.00777159152227023], [0.00777159152227023, 0.03595672813175045]],
        [[0.0664819903586649, 0.02959135203067084], [-0.0093478657451266, 0.02870693082659593]],
        [0.0013073810811967692, 0.02023523383494257],
        0.3841325857373179,
        [[0.006717964539778114, 0.004088177783560642], [0.004088177783560642, 0.0036512675519019774]],
    ),
]


@pytest.mark.parametrize("case", range(len(GOLDEN)))
def test_order_one_is_unchanged(case):
    params, dQ, dR, da, eps, dQ_sem = GOLDEN[case]
    eu = update(params, validation_init(), 500, 7)
    np.testing.assert_allclose(eu.dQ[0], dQ, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(eu.dQ[1], dQ_sem, rtol=1e-13)
    np.testing.assert_allclose(eu.dR[0], dR, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(eu.da[0], da, rtol=1e-13, atol=1e-15)
    assert eu.eps_meta[0] == pytest.approx(eps, rel=1e-13)
    assert eu.sup_R is None and eu.sup_Q1 is None and eu.sup_Q2 is None


def test_order_two_query_part_is_order_one_on_the_same_draws():
    """The same seed draws the same tasks and support sets at both orders: without its
    support-direction parts the order-2 update is order 1's (eta_a = 0: the readout's
    step is then zero at both)."""
    params = {"n_s": 3, "s": 1.5, "sigma": 0.3, "n_q": 2}
    init = validation_init()
    one = update(params, init, 400, 11)
    two = update({**params, "order": 2}, init, 400, 11)
    np.testing.assert_allclose(two.dQ[0] - two.sup_Q1[0] - two.sup_Q2[0], one.dQ[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(two.dR[0] - two.sup_R[0], one.dR[0], rtol=1e-9, atol=1e-12)
    assert two.eps_meta[0] == pytest.approx(one.eps_meta[0], rel=1e-12)
    assert np.abs(two.sup_Q2[0]).max() > 0.01


def test_order_two_with_population_support_is_refused():
    with pytest.raises(ValueError, match="finite n_s"):
        update({"order": 2}, validation_init(), 10, 0)


# ----------------------------------------------------------------------------- brute force
def brute_force(p, init, n_tasks, rng):
    """Per task, with support and query samples drawn (docs/models/anil.md 5.4-5.6 typed
    here): the first-order query terms (mean over the ``n_q`` queries), the readout's step
    ``-eta_a A^T b`` and the support-direction parts ``-eta sum_mu gamma^mu_k nu^mu_n``,
    ``-eta sum_mu (gamma^mu_k lambda^mu_l + (k <-> l))``, ``eta^2 sum_mu gamma^mu_k
    gamma^mu_l`` with ``gamma^mu = J^mu^T b``, ``b = mean_q delta g(lambda)`` and ``J^mu =
    da'/dlambda^mu`` by forward mode through the matrices ``C^ = G G^T / n_s``, ``h^ = G y /
    n_s``. Arrays over tasks."""
    Q, R, T = init.Q, init.R, init.T
    a, vbar = init.vectors["a"], init.vectors["vbar"]
    K, M = R.shape
    ns, nq, S, alpha = int(p["n_s"]), int(p["n_q"]), int(p["S"]), p["alpha_in"]
    eta, eta_a, sigma = p["eta"], p["eta_a"], p["sigma"]
    C = np.block([[Q, R, R], [R.T, T, T], [R.T, T, T + p["eps_B"] ** 2 * np.eye(M)]])
    w, V = np.linalg.eigh(C)
    L = V * np.sqrt(np.clip(w, 0, None))

    def fields(*shape):
        u = rng.standard_normal((*shape, K + 2 * M)) @ L.T
        return u[..., :K], u[..., K : K + M], u[..., K + M :]

    n = n_tasks
    v = vbar + p["s"] * rng.standard_normal((n, M))
    lam_s, nu_s, nut_s = fields(n, ns)
    G = g(lam_s)  # (n, ns, K)
    y = np.einsum("tm,tsm->ts", v, g(nut_s)) + sigma * rng.standard_normal((n, ns))
    Ch = np.einsum("tsk,tsl->tkl", G, G) / ns
    hh = np.einsum("ts,tsk->tk", y, G) / ns
    # dC^/dlambda^mu_r = (e_r g^mu^T + g^mu e_r^T) g'^mu_r / n_s, dh^/dlambda^mu_r = y^mu g'^mu_r e_r / n_s
    Gp = gp(lam_s)
    eye = np.eye(K)
    c = np.broadcast_to(a, (n, K)).copy()
    J = np.zeros((n, ns, K, K))  # [t, mu, j, r] = da'_j / dlambda^mu_r
    A = np.broadcast_to(eye, (n, K, K)).copy()
    for _ in range(S):
        gc = np.einsum("tsk,tk->ts", G, c)  # g^mu . c
        outer = eye[None, None] * gc[..., None, None] + G[..., :, None] * c[:, None, None, :]
        dCc = outer * Gp[:, :, None, :]
        dh = eye[None, None] * (y[..., None] * Gp)[:, :, None, :]
        J = J - alpha * (np.einsum("tjl,tslr->tsjr", Ch, J) + (dCc - dh) / ns)
        A = A - alpha * np.einsum("tjl,tlk->tjk", Ch, A)
        c = c - alpha * (np.einsum("tkl,tl->tk", Ch, c) - hh)
    lam, nu, nut = fields(n, nq)
    delta = np.einsum("tk,tqk->tq", c, g(lam)) - np.einsum("tm,tqm->tq", v, g(nut))
    delta = delta - sigma * rng.standard_normal((n, nq))
    Gq = delta[..., None] * c[:, None, :] * gp(lam)
    dR = -eta * np.einsum("tqk,tqn->tkn", Gq, nu) / nq
    Glam = np.einsum("tqk,tql->tkl", Gq, lam) / nq
    dQ = -eta * (Glam + Glam.transpose(0, 2, 1)) + eta**2 / nq * np.einsum("tqk,tql->tkl", Gq, Gq) / nq
    b = np.einsum("tq,tqk->tk", delta, g(lam)) / nq
    da = -eta_a * np.einsum("tjk,tj->tk", A, b)
    gam = np.einsum("tsjr,tj->tsr", J, b)
    sup_R = -eta * np.einsum("tsk,tsn->tkn", gam, nu_s)
    x = np.einsum("tsk,tsl->tkl", gam, lam_s)
    sup_Q1 = -eta * (x + x.transpose(0, 2, 1))
    sup_Q2 = eta**2 * np.einsum("tsk,tsl->tkl", gam, gam)
    return {
        "sup_R": sup_R,
        "sup_Q1": sup_Q1,
        "sup_Q2": sup_Q2,
        "dQ": dQ + sup_Q1 + sup_Q2,
        "dR": dR + sup_R,
        "da": da,
    }


def test_order_two_against_brute_force():
    """Label noise, two queries, feature variability, two inner steps, a trained start."""
    params = {
        "order": 2, "n_s": 3, "S": 2, "alpha_in": 0.6, "s": 1.5, "sigma": 0.3,
        "eps_B": 0.5, "n_q": 2, "eta": 0.8, "eta_a": 0.5,
    }  # fmt: skip
    init = validation_init()
    eu = update(params, init, 20_000, 5)
    p = runtime.load("anil").model.resolve_params(params)
    brute = brute_force(p, init, 400_000, np.random.default_rng(6))
    worst = 0.0
    for name, b in brute.items():
        got = getattr(eu, name)
        b_mean, b_sem = b.mean(0), b.std(0, ddof=1) / math.sqrt(b.shape[0])
        z = np.abs(got[0] - b_mean) / np.sqrt(np.asarray(got[1]) ** 2 + b_sem**2)
        worst = max(worst, float(z.max()))
        assert np.all(z < 4.5), f"{name}: {got[0]} +- {got[1]} against brute force {b_mean} +- {b_sem}"
    assert np.abs(eu.sup_Q2[0]).max() > 20 * eu.sup_Q2[1].max()  # the comparison has power


# ----------------------------------------------------------------------------- large n_s
# a generic setting: label noise, two queries, a trained start, two inner steps
LARGE = {"s": 1.5, "S": 2, "alpha_in": 0.6, "eta_a": 0.5, "sigma": 0.3, "n_q": 2}


def test_large_support_sets_approach_the_population_second_order_flow():
    """n_s = 200: within 4 s.e.m. + 1/n_s of the kernel's order-2 flow at n_s = inf;
    ``sup_R`` and ``sup_Q1`` are its second-order terms (order 2 minus order 1), and
    ``n_s sup_Q2`` is the same at n_s = 50 and 200 (measured: 1 % apart, within the
    s.e.m.)."""
    init = validation_init()
    n_s = 200
    eu = update({**LARGE, "order": 2, "n_s": n_s}, init, 2000, 1)
    two = kernel_values({**LARGE, "order": 2}, init)
    one = kernel_values({**LARGE, "order": 1}, init)
    for name, got, want in (
        ("dQ", eu.dQ, two[0]),
        ("dR", eu.dR, two[1]),
        ("da", eu.da, two[2]),
        ("sup_R", eu.sup_R, two[1] - one[1]),
        ("sup_Q1", eu.sup_Q1, two[0] - one[0]),
    ):
        assert np.all(np.abs(got[0] - want) < 4 * got[1] + 1.0 / n_s), f"{name}: {got} against {want}"
    assert np.abs(two[1] - one[1]).max() > 10 * eu.sup_R[1].max()  # the terms are resolved
    # the eta^2 support term: O(1/n_s)
    assert np.all(np.abs(eu.sup_Q2[0]) < 5.0 / n_s)
    small = update({**LARGE, "order": 2, "n_s": 50}, init, 2000, 2)
    scaled = (50 * small.sup_Q2[0], n_s * eu.sup_Q2[0])
    sem = np.hypot(50 * small.sup_Q2[1], n_s * eu.sup_Q2[1])
    assert np.all(np.abs(scaled[0] - scaled[1]) < 4 * sem + 0.05 * np.abs(scaled[1]))
    assert scaled[1][0, 0] > 10 * n_s * eu.sup_Q2[1][0, 0]
