"""The generated ``anil`` kernels against a direct numpy evaluation of docs/models/anil.md.

The reference below does not import derive. It types the closed forms of
section 2 as tensors over the fields ``u = (lambda_1..K, nu_1..M, nu_task_1..M)``
with covariance ``[[Q, R, R], [R^T, T, T], [R^T, T, T + eps_B^2 I]]``, runs the
inner loop of 5.3 as plain matrices (matrix powers, not the kernel's
recursion), takes the task moments of ``z = (a', v_task)`` and their fourth moments
by its own Isserlis formula, and assembles the flows of 5.5 with einsum over the
signed readouts: ``d = y - f = sum_p sgn_p z_p g(u_p) + sigma zeta`` with
``sgn = -1`` on the student entries ``a'`` and ``+1`` on the task readout ``v_task``.

Second order (``order = 2``): the derivatives of ``a'`` in ``Q`` (one symmetric
variable per pair) and ``R`` are central finite differences of that numpy inner
loop, contracted as docs/models/anil.md 5.4 / 5.5 say. Independently of that chain rule, the
second-order flow is checked to be gradient descent on ``eps_meta`` (a finite
difference of the meta-error along ``w_k -> w_k + eps B_n`` and ``w_k -> w_k + eps w_l``).
"""

from __future__ import annotations


import numpy as np
import pytest

from closed_forms import load, tensors_erf, tensors_linear

PARAMS = ("eta", "eta_a", "alpha_in", "S", "order", "n_q", "n_s", "s", "eps_B", "sigma")
METRICS = ("eps_pre", "eps_meta", "eps_opt")
N_STATES = 15
RTOL1 = 1e-10  # first order: closed forms on both sides
RTOL2 = 1e-6  # second order: finite differences on the reference side
FD_STEP = 1e-5


def i2_only(C, act):
    if act == "linear":
        return C.copy()
    d = np.diag(C)
    return (2 / np.pi) * np.arcsin(C / np.sqrt(np.outer(1 + d, 1 + d)))


TENSORS = {"erf": tensors_erf, "linear": tensors_linear}


# ---------------------------------------------------------------------------
# the reference


def field_cov(Q, R, T, eps_B):
    """Covariance of (lambda_1..K, nu_1..M, nu_task_1..M), docs/models/anil.md 5.1."""
    M = T.shape[0]
    return np.block([[Q, R, R], [R.T, T, T], [R.T, T, T + eps_B**2 * np.eye(M)]])


def support(Q, R, T, eps_B, act):
    """C_kl = I2(lambda_k, lambda_l), D_km = I2(lambda_k, nu_task_m)."""
    K, M = R.shape
    I2 = i2_only(field_cov(Q, R, T, eps_B), act)
    return I2[:K, :K], I2[:K, K + M :]


def inner_maps(Q, R, T, eps_B, alpha_in, S, act):
    """A = (I - alpha C)^S and G = alpha sum_{s<S} (I - alpha C)^s D, by matrix powers."""
    C, D = support(Q, R, T, eps_B, act)
    K = C.shape[0]
    B = np.eye(K) - alpha_in * C
    A = np.linalg.matrix_power(B, S)
    P = sum((np.linalg.matrix_power(B, k) for k in range(S)), np.zeros((K, K)))
    return A, alpha_in * P @ D


def adapted(Q, R, T, a, vbar, eps_B, alpha_in, S, act):
    """a' = mu + G xi-part: returns (A a + G vbar, G) (a' = A a + G v_task is affine in v_task)."""
    A, G = inner_maps(Q, R, T, eps_B, alpha_in, S, act)
    return A @ a + G @ vbar, G


def isserlis4(m, S):
    """E[z_p z_q z_r z_t] for z ~ N(m, S)."""
    e = np.einsum
    out = e("p,q,r,t->pqrt", m, m, m, m)
    out = out + e("pq,r,t->pqrt", S, m, m) + e("pr,q,t->pqrt", S, m, m) + e("pt,q,r->pqrt", S, m, m)
    out = out + e("qr,p,t->pqrt", S, m, m) + e("qt,p,r->pqrt", S, m, m) + e("rt,p,q->pqrt", S, m, m)
    out = out + e("pq,rt->pqrt", S, S) + e("pr,qt->pqrt", S, S) + e("pt,qr->pqrt", S, S)
    return out


def signed_index(K, M):
    """Field index of each entry of z = (a', v_task) and its sign in d = y - f."""
    fidx = np.r_[np.arange(K), K + M + np.arange(M)]
    sgn = np.r_[-np.ones(K), np.ones(M)]
    return fidx, sgn


def error_from_moments(I2, K, M, mz, Lz):
    """1/2 E_tau E_x[(f - y_clean)^2] for z = (readout, v_task) = mz + Lz xi."""
    fidx, sgn = signed_index(K, M)
    E2 = Lz @ Lz.T + np.outer(mz, mz)
    return 0.5 * np.einsum("p,q,pq,pq->", sgn, sgn, E2, I2[np.ix_(fidx, fidx)])


def adapted_derivatives(Q, R, T, a, vbar, eps_B, alpha_in, S, act, h=FD_STEP):
    """Central differences of (mu_adapted, G) in Q_kl (Q_kl and Q_lk together) and R_km.

    Returns dmuQ[j,k,l], dGQ[j,k,l,r], dmuR[j,k,m], dGR[j,k,m,r]."""
    K, M = R.shape
    dmuQ = np.zeros((K, K, K))
    dGQ = np.zeros((K, K, K, M))
    dmuR = np.zeros((K, K, M))
    dGR = np.zeros((K, K, M, M))

    def at(Qx, Rx):
        return adapted(Qx, Rx, T, a, vbar, eps_B, alpha_in, S, act)

    for k in range(K):
        for l_ in range(k, K):
            E = np.zeros((K, K))
            E[k, l_] = E[l_, k] = 1.0
            mp, Gp = at(Q + h * E, R)
            mm, Gm = at(Q - h * E, R)
            for kk, ll in ((k, l_), (l_, k)):
                dmuQ[:, kk, ll] = (mp - mm) / (2 * h)
                dGQ[:, kk, ll, :] = (Gp - Gm) / (2 * h)
        for m in range(M):
            E = np.zeros((K, M))
            E[k, m] = 1.0
            mp, Gp = at(Q, R + h * E)
            mm, Gm = at(Q, R - h * E)
            dmuR[:, k, m] = (mp - mm) / (2 * h)
            dGR[:, k, m, :] = (Gp - Gm) / (2 * h)
    return dmuQ, dGQ, dmuR, dGR


def reference(Q, R, T, a, vbar, prm, act="erf"):
    """dQ, dR, da and the metrics (eps_pre, eps_meta, eps_opt) of docs/models/anil.md 5.5 / 5.7."""
    K, M = R.shape
    eta, eta_a, alpha_in = prm["eta"], prm["eta_a"], prm["alpha_in"]
    S, order, n_q = int(prm["S"]), prm["order"], prm["n_q"]
    s, eps_B, sigma = prm["s"], prm["eps_B"], prm["sigma"]
    Cf = field_cov(Q, R, T, eps_B)
    I2, I3, I4, J2 = TENSORS[act](Cf)
    fidx, sgn = signed_index(K, M)
    st = np.arange(K)

    A, G = inner_maps(Q, R, T, eps_B, alpha_in, S, act)
    mz = np.r_[A @ a + G @ vbar, vbar]
    Lz = s * np.vstack([G, np.eye(M)])  # z = mz + Lz xi, xi ~ N(0, I_M)
    Sz = Lz @ Lz.T
    E2 = Sz + np.outer(mz, mz)
    E4 = isserlis4(mz, Sz)

    # E[a'_k g'(lam_k) u_b d] = sum_p sgn_p E[z_k z_p] I3(k, b, f(p))
    I3s = I3[np.ix_(st, np.arange(K + 2 * M), fidx)]  # (k, b, p)
    X = eta * np.einsum("kp,p,kbp->kb", E2[:K], sgn, I3s)
    dR = X[:, K : K + M].copy()  # b = nu_n, the shared teacher field
    XQ = X[:, :K]
    I4s = I4[np.ix_(st, st, fidx, fidx)]
    quad = np.einsum("klpq,p,q,klpq->kl", E4[:K, :K], sgn, sgn, I4s)
    quad = quad + sigma**2 * E2[:K, :K] * J2[:K, :K]
    dQ = XQ + XQ.T + eta**2 / n_q * quad
    # E[d g(lam_j)] = sum_p sgn_p mz_p I2(j, f(p))
    Eg_d = I2[np.ix_(st, fidx)] @ (sgn * mz)
    if order == 1:
        da = eta_a * Eg_d
    else:
        da = eta_a * A.T @ Eg_d  # a receives -eta_a A^T E[delta g(lambda)], delta = -d
        dmuQ, dGQ, dmuR, dGR = adapted_derivatives(Q, R, T, a, vbar, eps_B, alpha_in, S, act)
        two = 1.0 + np.eye(K)  # (1 + [k = i])
        # H[p, j]: -E_x[delta g(lam_j)] = sum_p sgn_p z_p I2(f(p), j)
        H = sgn[:, None] * I2[np.ix_(fidx, st)]

        def term(Ym, Yl):
            # eta * sum_{p,j} H[p,j] E[z_p Y_j] for Y = Ym + Yl xi (Ym [j, ...], Yl [j, ..., r])
            return eta * (np.einsum("pj,p,j...->...", H, mz, Ym) + np.einsum("pj,pr,j...r->...", H, Lz, Yl))

        dQw_m = dmuQ * two[None]
        dQw_l = s * dGQ * two[None, :, :, None]
        dR_l = s * dGR
        # dR_kn: sum_l (da'_j/dQ_kl)(1+[k=l]) R_ln + sum_m (da'_j/dR_km) T_mn
        YmR = np.einsum("jkl,ln->jkn", dQw_m, R) + np.einsum("jkm,mn->jkn", dmuR, T)
        YlR = np.einsum("jklr,ln->jknr", dQw_l, R) + np.einsum("jkmr,mn->jknr", dR_l, T)
        dR = dR + term(YmR, YlR)
        # dQ_kl: sum_i (da'_j/dQ_ki)(1+[k=i]) Q_il + sum_m (da'_j/dR_km) R_lm, plus (k <-> l)
        YmQ = np.einsum("jki,il->jkl", dQw_m, Q) + np.einsum("jkm,lm->jkl", dmuR, R)
        YlQ = np.einsum("jkir,il->jklr", dQw_l, Q) + np.einsum("jkmr,lm->jklr", dR_l, R)
        extra = term(YmQ, YlQ)
        dQ = dQ + extra + extra.T

    # metrics
    L_pre = np.vstack([np.zeros((K, M)), s * np.eye(M)])
    eps_pre = error_from_moments(I2, K, M, np.r_[a, vbar], L_pre)
    eps_meta = error_from_moments(I2, K, M, mz, Lz)
    C, D = I2[:K, :K], I2[:K, K + M :]
    Gs = np.linalg.pinv(C) @ D
    eps_opt = error_from_moments(I2, K, M, np.r_[Gs @ vbar, vbar], s * np.vstack([Gs, np.eye(M)]))
    return dQ, dR, da, np.array([eps_pre, eps_meta, eps_opt])


# ---------------------------------------------------------------------------
# the kernel ABI


def pack(mod, Q, R, T, a, vbar, prm):
    parts = {"Q": Q, "R": R, "a": a, "T": T, "vbar": vbar}
    y = np.concatenate([np.ravel(parts[name]) for name, _ in mod.STATE]).astype(float)
    c = np.concatenate([np.ravel(parts[name]) for name, _ in mod.CONSTS]).astype(float)
    p = np.array([prm[name] for name in mod.PARAMS], dtype=float)
    return y, c, p


def run(mod, Q, R, T, a, vbar, prm):
    """(dQ, dR, da, metrics) from a generated anil module."""
    K, M = R.shape
    y, c, p = pack(mod, Q, R, T, a, vbar, prm)
    dy = np.full_like(y, np.nan)
    mod.rhs(y, c, p, K, M, dy)
    out = np.full(len(mod.METRICS), np.nan)
    mod.metrics(y, c, p, K, M, out)
    return dy[: K * K].reshape(K, K), dy[K * K : K * K + K * M].reshape(K, M), dy[K * K + K * M :], out


def random_state(rng, K, M):
    """Random positive-definite [[Q, R], [R^T, T]] (entries 0.1..3), readouts a and vbar."""
    n = K + M
    X = rng.normal(size=(n, n)) * rng.uniform(0.3, 1.8, size=(n, 1))
    Cov = X @ X.T / n + 1e-2 * np.eye(n)
    Q, R, T = Cov[:K, :K].copy(), Cov[:K, K:].copy(), Cov[K:, K:].copy()
    return Q, R, T, rng.normal(size=K), rng.normal(size=M)


KM_FIXED = [(1, 1), (1, 2), (2, 1), (2, 3), (3, 2), (3, 3), (2, 2), (3, 1), (1, 3)]


def state_case(i, order=1):
    rng = np.random.default_rng(9100 + i)
    if i < len(KM_FIXED):
        K, M = KM_FIXED[i]
    else:
        K, M = (int(x) for x in rng.integers(1, 4, size=2))
    Q, R, T, a, vbar = random_state(rng, K, M)
    prm = {
        "eta": float(rng.uniform(0.1, 2.0)),
        "eta_a": 0.0 if i % 5 == 3 else float(rng.uniform(0.1, 2.0)),
        "alpha_in": float(rng.uniform(0.1, 1.5)),
        "S": float(i % 4),
        "order": float(order),
        "n_q": float(1 + i % 3),
        "n_s": np.inf,
        "s": 0.0 if i % 7 == 5 else float(rng.uniform(0.2, 1.5)),
        "eps_B": 0.0 if i % 3 == 1 else float(rng.uniform(0.1, 1.0)),
        "sigma": 0.0 if i % 4 == 2 else float(rng.uniform(0.1, 1.0)),
    }
    return Q, R, T, a, vbar, prm


def assert_rel(got, want, rtol, what=""):
    """max |got - want| <= rtol * max(|want|) (the scale of the whole array, floored at 1e-12)."""
    got = np.asarray(got, float)
    want = np.asarray(want, float)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: not finite: {got}"
    assert np.all(np.isfinite(want)), f"{what}: reference not finite: {want}"
    scale = max(1e-12, float(np.max(np.abs(want)))) if want.size else 1.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert err <= rtol * scale, (
        f"{what}: max error {err:.3g} > {rtol:g} * {scale:.3g}\ngot  {got}\nwant {want}"
    )


def tag(R, prm):
    return f"K,M={R.shape} " + " ".join(f"{k}={v:.3g}" for k, v in prm.items())


# ---------------------------------------------------------------------------
# layout and the reference's own ingredients


def test_kernel_layout():
    for name in ("anil_erf", "anil_linear"):
        mod = load(name)
        assert mod.PARAMS == PARAMS
        assert mod.STATE == (("Q", ("K", "K")), ("R", ("K", "M")), ("a", ("K",)))
        assert mod.CONSTS == (("T", ("M", "M")), ("vbar", ("M",)))
        assert mod.METRICS == METRICS


def test_isserlis_monte_carlo():
    """The reference's fourth moments against sampling (it is the test's own code)."""
    rng = np.random.default_rng(3)
    m = rng.normal(size=3) * 0.7
    L = rng.normal(size=(3, 3)) * 0.6
    z = m + rng.normal(size=(400_000, 3)) @ L.T
    E4 = isserlis4(m, L @ L.T)
    for idx in [(0, 0, 0, 0), (0, 1, 2, 2), (1, 1, 2, 0), (0, 1, 0, 1), (2, 2, 2, 1)]:
        prod = np.prod(z[:, list(idx)], axis=1)
        se = prod.std() / np.sqrt(len(prod))
        assert abs(prod.mean() - E4[idx]) < 5 * se, (idx, prod.mean(), E4[idx], se)


# ---------------------------------------------------------------------------
# 1. first order against the reference


@pytest.mark.parametrize("i", range(N_STATES))
def test_first_order_rhs_and_metrics_match_reference(i):
    mod = load("anil_erf")
    Q, R, T, a, vbar, prm = state_case(i, order=1)
    dQ, dR, da, met = run(mod, Q, R, T, a, vbar, prm)
    rQ, rR, ra, rmet = reference(Q, R, T, a, vbar, prm)
    t = tag(R, prm)
    assert_rel(dQ, rQ, RTOL1, f"dQ {t}")
    assert_rel(dR, rR, RTOL1, f"dR {t}")
    if prm["eta_a"] == 0.0:
        assert np.all(da == 0.0), f"eta_a = 0 must freeze a: {da}"
    else:
        assert_rel(da, ra, RTOL1, f"da {t}")
    for n, name in enumerate(METRICS):
        assert_rel(met[n], rmet[n], RTOL1, f"{name} {t}")


@pytest.mark.parametrize("K, M, order", [(7, 5, 1), (5, 9, 1), (6, 4, 2)])
def test_rhs_matches_reference_at_larger_sizes(K, M, order):
    """Sizes where the table of the tilted I2 (students and task-teacher rows, a
    compact copy of the covariance) runs whole vectors and remainders."""
    mod = load("anil_erf")
    rng = np.random.default_rng(10 * K + M)
    Q, R, T, a, vbar = random_state(rng, K, M)
    prm = dict(state_case(12, order)[5], eps_B=0.4, s=0.8, S=2.0)
    dQ, dR, da, met = run(mod, Q, R, T, a, vbar, prm)
    rQ, rR, ra, rmet = reference(Q, R, T, a, vbar, prm)
    t = tag(R, prm)
    rtol = RTOL1 if order == 1 else RTOL2
    assert_rel(dQ, rQ, rtol, f"dQ {t}")
    assert_rel(dR, rR, rtol, f"dR {t}")
    if prm["eta_a"] != 0.0:
        assert_rel(da, ra, rtol, f"da {t}")
    assert_rel(met, rmet, RTOL1, f"metrics {t}")


def test_reference_is_sensitive():
    """The comparisons have teeth: each ingredient of the reference moves it by far
    more than the tolerances (noise, n_q, eps_B, s, S, the second-order terms)."""
    Q, R, T, a, vbar, prm = state_case(11)  # K, M = random, S = 3, n_q = 3, eps_B, sigma > 0
    assert prm["S"] == 3 and prm["sigma"] > 0 and prm["eps_B"] > 0 and prm["s"] > 0
    base = reference(Q, R, T, a, vbar, prm)
    for change in (
        {"sigma": prm["sigma"] + 0.1},
        {"n_q": prm["n_q"] + 1},
        {"eps_B": prm["eps_B"] + 0.1},
        {"s": prm["s"] + 0.1},
        {"S": prm["S"] - 1},
        {"alpha_in": prm["alpha_in"] * 1.01},
        {"order": 2.0},
    ):
        other = reference(Q, R, T, a, vbar, {**prm, **change})
        diff = max(float(np.max(np.abs(x - y))) for x, y in zip(base[:3], other[:3]))
        assert diff > 1e-4, change


# ---------------------------------------------------------------------------
# 2. second order against the reference (finite-difference sensitivities)


@pytest.mark.parametrize("i", range(N_STATES))
def test_second_order_rhs_matches_reference(i):
    mod = load("anil_erf")
    Q, R, T, a, vbar, prm = state_case(i, order=2)
    dQ, dR, da, met = run(mod, Q, R, T, a, vbar, prm)
    rQ, rR, ra, rmet = reference(Q, R, T, a, vbar, prm)
    t = tag(R, prm)
    assert_rel(dQ, rQ, RTOL2, f"dQ {t}")
    assert_rel(dR, rR, RTOL2, f"dR {t}")
    if prm["eta_a"] != 0.0:
        assert_rel(da, ra, RTOL2, f"da {t}")
    assert_rel(met, rmet, RTOL1, f"metrics {t}")  # the metrics do not depend on order
    if prm["S"] > 0:
        # the second-order terms are visible at this tolerance
        r1 = reference(Q, R, T, a, vbar, {**prm, "order": 1.0})
        gap = max(float(np.max(np.abs(x - y))) for x, y in zip((rQ, rR), r1[:2]))
        assert gap > 1e3 * RTOL2 * max(np.max(np.abs(rQ)), np.max(np.abs(rR))), gap


@pytest.mark.parametrize("i", [1, 2, 3, 6, 7, 11])
def test_sensitivities_match_finite_differences(i):
    """task_moments' mu_adapted_dQ, L_adapted_dQ, mu_adapted_dR, L_adapted_dR against central differences
    of the numpy inner loop (the ingredient of the second-order flow, alone)."""
    mod = load("anil_erf")
    Q, R, T, a, vbar, prm = state_case(i, order=2)
    K, M = R.shape
    y, c, p = pack(mod, Q, R, T, a, vbar, prm)
    Cf = field_cov(Q, R, T, prm["eps_B"])
    out = mod.task_moments(y, c, p, K, M, Cf, True)
    mu_dQ, L_dQ, mu_dR, L_dR = out[6], out[7], out[8], out[9]
    dmuQ, dGQ, dmuR, dGR = adapted_derivatives(
        Q, R, T, a, vbar, prm["eps_B"], prm["alpha_in"], int(prm["S"]), "erf"
    )
    t = tag(R, prm)
    assert_rel(mu_dQ, dmuQ, RTOL2, f"mu_adapted_dQ {t}")
    assert_rel(L_dQ, prm["s"] * dGQ, RTOL2, f"L_adapted_dQ {t}")
    assert_rel(mu_dR, dmuR, RTOL2, f"mu_adapted_dR {t}")
    assert_rel(L_dR, prm["s"] * dGR, RTOL2, f"L_adapted_dR {t}")


def eps_meta_of(Q, R, T, a, vbar, prm, frozen=None):
    """eps_meta (numpy) at (Q, R, a); ``frozen = (mu_adapted, G)`` keeps a' fixed (first order)."""
    K, M = R.shape
    I2 = i2_only(field_cov(Q, R, T, prm["eps_B"]), "erf")
    if frozen is None:
        mu, G = adapted(Q, R, T, a, vbar, prm["eps_B"], prm["alpha_in"], int(prm["S"]), "erf")
    else:
        mu, G = frozen
    return error_from_moments(I2, K, M, np.r_[mu, vbar], prm["s"] * np.vstack([G, np.eye(M)]))


def move(Q, R, T, k, other, eps):
    """Order parameters after w_k -> w_k + eps * other, other = ('B', n) or ('w', l), to first order."""
    K, M = R.shape
    kind, idx = other
    q = Q[idx, :] if kind == "w" else R[:, idx]  # w_i . other / N
    r = R[idx, :] if kind == "w" else T[idx, :]  # B_m . other / N
    Q2, R2 = Q.copy(), R.copy()
    Q2[k, :] += eps * q
    Q2[:, k] += eps * q
    R2[k, :] += eps * r
    return Q2, R2


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("i", [1, 3, 6, 7, 11])
def test_flow_is_gradient_descent_on_eps_meta(order, i):
    """Independent of the chain rule of 5.4: the drift of w_k is -eta times the
    gradient of the meta-error (through the inner loop at order 2, at fixed a'
    at order 1), so dR_kn = -eta d eps_meta / d(w_k along B_n), the eta-linear part
    of dQ_kl = -eta (d/d(w_k along w_l) + d/d(w_l along w_k)) eps_meta, and
    da = -eta_a grad_a eps_meta (through a' = A a + G v_task at order 2)."""
    mod = load("anil_erf")
    Q, R, T, a, vbar, prm = state_case(i, order=order)
    prm["eta_a"] = 0.7
    K, M = R.shape
    h = FD_STEP
    frozen = None
    if order == 1:
        frozen = adapted(Q, R, T, a, vbar, prm["eps_B"], prm["alpha_in"], int(prm["S"]), "erf")

    def deriv(other, k):
        Qp, Rp = move(Q, R, T, k, other, h)
        Qm, Rm = move(Q, R, T, k, other, -h)
        return (
            eps_meta_of(Qp, Rp, T, a, vbar, prm, frozen) - eps_meta_of(Qm, Rm, T, a, vbar, prm, frozen)
        ) / (2 * h)

    eta = prm["eta"]
    dQ1, dR, da, _ = run(mod, Q, R, T, a, vbar, prm)
    dQ2 = run(mod, Q, R, T, a, vbar, {**prm, "eta": 2 * eta})[0]
    lin = (4 * dQ1 - dQ2) / 2  # dQ = eta X + eta^2 Y  ->  eta X
    want_R = np.array([[-eta * deriv(("B", n), k) for n in range(M)] for k in range(K)])
    D = np.array([[deriv(("w", j), k) for j in range(K)] for k in range(K)])
    want_lin = -eta * (D + D.T)
    want_a = np.empty(K)
    for j in range(K):
        e = np.zeros(K)
        e[j] = h
        if order == 1:
            fp = (frozen[0] + e, frozen[1])
            fm = (frozen[0] - e, frozen[1])
        else:
            fp = fm = None
        ep = eps_meta_of(Q, R, T, a + e, vbar, prm, fp)
        em = eps_meta_of(Q, R, T, a - e, vbar, prm, fm)
        want_a[j] = -prm["eta_a"] * (ep - em) / (2 * h)
    t = tag(R, prm)
    assert_rel(dR, want_R, RTOL2, f"dR vs gradient {t}")
    assert_rel(lin, want_lin, RTOL2, f"dQ (eta-linear part) vs gradient {t}")
    assert_rel(da, want_a, RTOL2, f"da vs gradient {t}")


# ---------------------------------------------------------------------------
# 3. reductions and properties


def two_layer_run(Q, R, T, v, vs, eta, eta_v, sigma):
    tl = load("two_layer_erf")
    K, M = R.shape
    y = np.concatenate([Q.ravel(), R.ravel(), v]).astype(float)
    c = np.concatenate([T.ravel(), vs]).astype(float)
    p = np.array([{"eta": eta, "eta_v": eta_v, "kappa": 0.0, "sigma": sigma}[n] for n in tl.PARAMS])
    dy = np.full_like(y, np.nan)
    tl.rhs(y, c, p, K, M, dy)
    out = np.full(1, np.nan)
    tl.metrics(y, c, p, K, M, out)
    return dy[: K * K].reshape(K, K), dy[K * K : K * K + K * M].reshape(K, M), dy[K * K + K * M :], out[0]


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("i", range(10))
def test_no_adaptation_equals_two_layer(order, i):
    """S = 0, s = 0, eps_B = 0, n_q = 1: anil is two_layer with v = a, vs = vbar,
    eta_v = eta_a, kappa = 0 (at order 2 too: A = I and no sensitivity)."""
    Q, R, T, a, vbar, prm = state_case(i, order=order)
    prm.update(S=0.0, s=0.0, eps_B=0.0, n_q=1.0)
    dQ, dR, da, met = run(load("anil_erf"), Q, R, T, a, vbar, prm)
    tQ, tR, tv, eps_g = two_layer_run(Q, R, T, a, vbar, prm["eta"], prm["eta_a"], prm["sigma"])
    t = tag(R, prm)
    assert_rel(dQ, tQ, 1e-12, f"dQ {t}")
    assert_rel(dR, tR, 1e-12, f"dR {t}")
    assert_rel(da, tv, 1e-12, f"da {t}")
    assert_rel(met[0], eps_g, 1e-12, f"eps_pre {t}")
    assert_rel(met[1], eps_g, 1e-12, f"eps_meta {t}")


@pytest.mark.parametrize("i", [1, 2, 3, 5, 6, 7, 9, 10, 11, 13])
def test_deterministic_tasks_equal_two_layer_at_adapted_readout(i):
    """s = 0, eps_B = 0, n_q = 1, order 1, any S: every task is the same, so anil is
    two_layer with v = a' = A a + G vbar (from the numpy inner loop), da included."""
    Q, R, T, a, vbar, prm = state_case(i, order=1)
    prm.update(s=0.0, eps_B=0.0, n_q=1.0)
    dQ, dR, da, met = run(load("anil_erf"), Q, R, T, a, vbar, prm)
    a_adapted, _ = adapted(Q, R, T, a, vbar, 0.0, prm["alpha_in"], int(prm["S"]), "erf")
    tQ, tR, tv, eps_g = two_layer_run(Q, R, T, a_adapted, vbar, prm["eta"], prm["eta_a"], prm["sigma"])
    t = tag(R, prm)
    assert_rel(dQ, tQ, 1e-11, f"dQ {t}")
    assert_rel(dR, tR, 1e-11, f"dR {t}")
    assert_rel(da, tv, 1e-11, f"da {t}")
    assert_rel(met[1], eps_g, 1e-11, f"eps_meta {t}")


@pytest.mark.parametrize("order", [1, 2])
def test_dQ_symmetric(order):
    mod = load("anil_erf")
    for i in range(N_STATES):
        Q, R, T, a, vbar, prm = state_case(i, order=order)
        dQ = run(mod, Q, R, T, a, vbar, prm)[0]
        assert_rel(dQ, dQ.T, 1e-13, f"dQ - dQ^T order {order} case {i}")


@pytest.mark.parametrize("module", ["anil_erf", "anil_linear"])
def test_errors_nonnegative_and_eps_opt_is_minimal(module):
    """a* = C^+ D v_task minimises the per-task error over readouts, so eps_opt <= eps_pre
    and eps_opt <= eps_meta; all three are >= 0. eps_opt depends neither on a nor on
    the inner loop, and S = 0 gives eps_meta = eps_pre."""
    mod = load(module)
    rng = np.random.default_rng(57)
    for _ in range(40):
        K, M = (int(x) for x in rng.integers(1, 4, size=2))
        Q, R, T, a, vbar = random_state(rng, K, M)
        prm = {
            "eta": 1.0,
            "eta_a": 0.5,
            "alpha_in": float(rng.uniform(0.0, 2.0)) / (1.0 if module == "anil_erf" else 3.0),
            "S": float(rng.integers(0, 5)),
            "order": 1.0,
            "n_q": 1.0,
            "n_s": np.inf,
            "s": float(rng.uniform(0.0, 2.0)),
            "eps_B": float(rng.uniform(0.0, 1.0)),
            "sigma": 0.3,
        }
        met = run(mod, Q, R, T, a, vbar, prm)[3]
        pre, meta, opt = met
        tol = 1e-12 * max(1.0, pre, meta)
        assert min(met) >= -tol, (module, met)
        assert opt <= pre + tol and opt <= meta + tol, (module, met, prm)
        other = run(mod, Q, R, T, rng.normal(size=K), vbar, {**prm, "alpha_in": 0.37, "S": 2.0})[3]
        assert_rel(other[2], opt, 1e-12, "eps_opt must not depend on a or the inner loop")
        zero = run(mod, Q, R, T, a, vbar, {**prm, "S": 0.0})[3]
        assert_rel(zero[1], zero[0], 1e-14, "S = 0: eps_meta = eps_pre")


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("i", range(8))
def test_linear_kernel_matches_reference(order, i):
    mod = load("anil_linear")
    Q, R, T, a, vbar, prm = state_case(i, order=order)
    prm["alpha_in"] /= 4.0  # C = Q has entries up to ~3 for the linear activation
    dQ, dR, da, met = run(mod, Q, R, T, a, vbar, prm)
    rQ, rR, ra, rmet = reference(Q, R, T, a, vbar, prm, act="linear")
    rtol = RTOL1 if order == 1 else RTOL2
    t = tag(R, prm)
    assert_rel(dQ, rQ, rtol, f"dQ {t}")
    assert_rel(dR, rR, rtol, f"dR {t}")
    if prm["eta_a"] != 0.0:
        assert_rel(da, ra, rtol, f"da {t}")
    assert_rel(met, rmet, RTOL1, f"metrics {t}")


# ---------------------------------------------------------------------------
# 4. Monte Carlo: task moments and the first-order flow by sampling


def mc_close(samples, want, what, nse=5.0):
    """Column means of samples within nse standard errors of want (+ a floor for exact zeros)."""
    samples = samples.reshape(samples.shape[0], -1)
    want = np.ravel(want)
    mean = samples.mean(axis=0)
    se = samples.std(axis=0) / np.sqrt(samples.shape[0])
    ok = np.abs(mean - want) <= nse * se + 1e-12 * (1 + np.abs(want))
    assert np.all(ok), f"{what}: MC {mean} vs {want} (se {se})"


@pytest.mark.parametrize("i", [3, 6, 7, 11, 14])
def test_task_moments_monte_carlo(i):
    """Draw tasks v_task = vbar + s xi, run the inner loop c <- c - alpha_in (C c - D v_task)
    step by step, and compare the mean and covariance of a' (and of a* = C^+ D v_task)
    with task_moments; A_S = d a' / d a against the loop run on unit vectors with v_task = 0."""
    mod = load("anil_erf")
    Q, R, T, a, vbar, prm = state_case(i, order=2)
    K, M = R.shape
    y, c, p = pack(mod, Q, R, T, a, vbar, prm)
    Cf = field_cov(Q, R, T, prm["eps_B"])
    out = mod.task_moments(y, c, p, K, M, Cf, True)
    mu_adapted, L_adapted, mu_v_task, L_v_task, mu_a_best, L_a_best = out[:6]
    A_S = out[10]  # mu_adapted_da: d a'_j / d a_k, the sensitivity along the start
    C, D = support(Q, R, T, prm["eps_B"], "erf")
    S, alpha, s = int(prm["S"]), prm["alpha_in"], prm["s"]

    def loop(c0, v_task):  # c0 (n, K), v_task (n, M)
        cc = c0.copy()
        for _ in range(S):
            cc = cc - alpha * (cc @ C.T - v_task @ D.T)
        return cc

    rng = np.random.default_rng(100 + i)
    n = 100_000
    v_task = vbar + s * rng.normal(size=(n, M))
    a_adapted = loop(np.broadcast_to(a, (n, K)), v_task)
    a_best = v_task @ (np.linalg.pinv(C) @ D).T

    for name, x, mu, L in (
        ("adapted", a_adapted, mu_adapted, L_adapted),
        ("v_task", v_task, mu_v_task, L_v_task),
        ("a_best", a_best, mu_a_best, L_a_best),
    ):
        mc_close(x, mu, f"mean of {name} K,M={K},{M}")
        xc = x - x.mean(axis=0)
        prods = np.einsum("ni,nj->nij", xc, xc)
        mc_close(prods, L @ L.T, f"covariance of {name} K,M={K},{M}", nse=6.0)
    assert_rel(A_S, loop(np.eye(K), np.zeros((K, M))).T, 1e-12, "A_S")


@pytest.mark.parametrize("i", [3, 7, 11])
def test_first_order_flow_monte_carlo(i):
    """The kernel's first-order flow and metrics against the integrands of 5.5 / 5.7
    averaged over sampled tasks and query fields (no closed form on this side)."""
    mod = load("anil_erf")
    Q, R, T, a, vbar, prm = state_case(i, order=1)
    prm.update(n_q=1.0, eps_B=0.4, sigma=0.3, s=0.8)
    K, M = R.shape
    dQ, dR, da, met = run(mod, Q, R, T, a, vbar, prm)
    mu, G = adapted(Q, R, T, a, vbar, prm["eps_B"], prm["alpha_in"], int(prm["S"]), "erf")
    C, D = support(Q, R, T, prm["eps_B"], "erf")

    from scipy.special import erf

    def g(x):
        return erf(x / np.sqrt(2))

    def gp(x):
        return np.sqrt(2 / np.pi) * np.exp(-(x**2) / 2)

    rng = np.random.default_rng(200 + i)
    n = 400_000
    Cf = field_cov(Q, R, T, prm["eps_B"])
    w, V = np.linalg.eigh(Cf)
    u = rng.normal(size=(n, Cf.shape[0])) @ (V * np.sqrt(np.clip(w, 0, None))).T
    lam, nu, nu_task = u[:, :K], u[:, K : K + M], u[:, K + M :]
    xi = rng.normal(size=(n, M))
    v_task = vbar + prm["s"] * xi
    a_adapted = mu + prm["s"] * xi @ G.T
    astar = v_task @ (np.linalg.pinv(C) @ D).T
    y_clean = np.sum(v_task * g(nu_task), axis=1)
    d = y_clean - np.sum(a_adapted * g(lam), axis=1) + prm["sigma"] * rng.normal(size=n)
    eta, eta_a = prm["eta"], prm["eta_a"]
    Gk = a_adapted * gp(lam) * d[:, None]  # a'_k g'(lam_k) d
    mc_close(eta * np.einsum("nk,nm->nkm", Gk, nu), dR, f"dR {tag(R, prm)}")
    XQ = eta * np.einsum("nk,nl->nkl", Gk, lam)
    mc_close(XQ + XQ.transpose(0, 2, 1) + eta**2 * np.einsum("nk,nl->nkl", Gk, Gk), dQ, f"dQ {tag(R, prm)}")
    mc_close(eta_a * g(lam) * d[:, None], da, f"da {tag(R, prm)}")
    for n_, readout in enumerate((np.broadcast_to(a, (len(d), K)), a_adapted, astar)):
        err = 0.5 * (np.sum(readout * g(lam), axis=1) - y_clean) ** 2
        mc_close(err, met[n_], f"{METRICS[n_]} {tag(R, prm)}")


@pytest.mark.parametrize("module", ["anil_erf", "anil_linear"])
def test_eps_opt_with_a_duplicated_unit(module):
    """A student unit copied (w_{K+1} = w_1) makes C singular; a* = C^+ D v_task then
    spans the same functions, so eps_opt is that of the K distinct units."""
    mod = load(module)
    rng = np.random.default_rng(71)
    for K, M in ((1, 1), (2, 3), (2, 1), (3, 2)):
        Q, R, T, a, vbar = random_state(rng, K, M)
        Qd = np.block([[Q, Q[:, :1]], [Q[:1, :], Q[:1, :1]]])
        Rd = np.vstack([R, R[:1]])
        prm = {
            "eta": 1.0,
            "eta_a": 0.0,
            "alpha_in": 0.3,
            "S": 1.0,
            "order": 1.0,
            "n_q": 1.0,
            "n_s": np.inf,
            "s": 0.9,
            "eps_B": 0.2,
            "sigma": 0.0,
        }
        opt = run(mod, Q, R, T, a, vbar, prm)[3][2]
        opt_d = run(mod, Qd, Rd, T, np.r_[a, 0.0], vbar, prm)[3][2]
        assert_rel(opt_d, opt, 1e-9, f"{module} K,M={K},{M}")
