"""The generated kernels against a direct numpy evaluation of the flows
(docs/conventions.md section 2, docs/models/scm.md, docs/models/two_layer.md), plus the
properties of STYLE.md "Tests at three levels".

The reference below does not import derive: the closed forms of section 2 are
typed as tensors over all index tuples, and the flows of sections 3 and 4 are
written with einsum over the signed readouts ``s = (-v, vs)``, so that
``d = y - f = sum_p s_p g(u_p) + sigma zeta`` with ``u = (lambda, nu)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from closed_forms import load, tensors_erf, tensors_linear
from scipy.special import erf

MODULES = ("two_layer_erf", "two_layer_linear", "scm_erf", "scm_linear")
N_STATES = 20
RTOL = 1e-12


TENSORS = {"erf": tensors_erf, "linear": tensors_linear}


def reference_flow(Q, R, T, v, vs, eta, eta_v, kappa, sigma, activation):
    """dQ, dR, dv and eps_g of docs/models/two_layer.md (section 3 is v = vs = 1, eta_v = kappa = 0)."""
    K, M = R.shape
    C = np.block([[Q, R], [R.T, T]])
    I2, I3, I4, J2 = TENSORS[activation](C)
    s = np.concatenate([-v, vs])  # d = y - f = s . g(u) + sigma zeta
    st = slice(0, K)
    te = slice(K, K + M)

    # E[g'(lam_k) u_b d] = sum_p s_p I3(k, b, p)
    A = np.einsum("kbp,p->kb", I3[st], s)
    dR = eta * v[:, None] * A[:, te] - kappa * R
    AQ = A[:, st]  # AQ[k, l] = E[g'(lam_k) lam_l d]
    # E[g'(lam_k) g'(lam_l) d^2] = sum_pq s_p s_q I4(k, l, p, q) + sigma^2 J2(k, l)
    D2 = np.einsum("klpq,p,q->kl", I4[st, st], s, s) + sigma**2 * J2[st, st]
    dQ = eta * v[:, None] * AQ + eta * v[None, :] * AQ.T + eta**2 * np.outer(v, v) * D2 - 2 * kappa * Q
    # E[g(lam_k) d] = sum_p s_p I2(k, p)
    dv = eta_v * I2[st] @ s - (kappa if eta_v != 0 else 0.0) * v
    eps_g = 0.5 * s @ I2 @ s
    return dQ, dR, dv, eps_g


# ---------------------------------------------------------------------------
# packing: the kernel ABI (flat y, c, p in the order of STATE, CONSTS, PARAMS)


def pack(mod, Q, R, T, v, vs, params):
    K, M = R.shape
    parts = {"Q": Q, "R": R, "v": v, "T": T, "vs": vs}
    y = np.concatenate([np.ravel(parts[name]) for name, _ in mod.STATE]).astype(float)
    c = np.concatenate([np.ravel(parts[name]) for name, _ in mod.CONSTS]).astype(float)
    p = np.array([params[name] for name in mod.PARAMS], dtype=float)
    return y, c, p


def run(mod, Q, R, T, v, vs, params):
    """(dQ, dR, dv or None, eps_g) from the generated module."""
    K, M = R.shape
    y, c, p = pack(mod, Q, R, T, v, vs, params)
    dy = np.full_like(y, np.nan)
    mod.rhs(y, c, p, K, M, dy)
    out = np.full(len(mod.METRICS), np.nan)
    mod.metrics(y, c, p, K, M, out)
    dQ = dy[: K * K].reshape(K, K)
    dR = dy[K * K : K * K + K * M].reshape(K, M)
    dv = dy[K * K + K * M :] if dy.size > K * K + K * M else None
    return dQ, dR, dv, out[mod.METRICS.index("eps_g")]


def random_state(rng, K, M):
    """Random positive-definite [[Q, R], [R^T, T]] (entries of order 0.1..3) and readouts."""
    n = K + M
    A = rng.normal(size=(n, n)) * rng.uniform(0.3, 1.8, size=(n, 1))
    C = A @ A.T / n + 1e-2 * np.eye(n)
    Q, R, T = C[:K, :K].copy(), C[:K, K:].copy(), C[K:, K:].copy()
    v = rng.normal(size=K)
    vs = rng.normal(size=M)
    return Q, R, T, v, vs


# (K, M) pairs that every state loop covers, the rest drawn at random
KM_FIXED = [(1, 1), (1, 4), (4, 1), (2, 3), (3, 2), (4, 4), (2, 2), (3, 1)]


def state_case(i):
    rng = np.random.default_rng(4242 + i)
    if i < len(KM_FIXED):
        K, M = KM_FIXED[i]
    else:
        K, M = (int(x) for x in rng.integers(1, 5, size=2))
    Q, R, T, v, vs = random_state(rng, K, M)
    params = {
        "eta": float(rng.uniform(0.05, 2.0)),
        "eta_v": 0.0 if i % 3 == 0 else float(rng.uniform(0.05, 2.0)),
        "kappa": 0.0 if i % 4 == 1 else float(rng.uniform(0.0, 0.5)),
        "sigma": 0.0 if i % 5 == 2 else float(rng.uniform(0.0, 1.0)),
    }
    return Q, R, T, v, vs, params


def assert_rel(got, want, rtol=RTOL, what=""):
    """Entrywise |got - want| <= rtol * max(1, max|want|) (a scale, since entries
    of a flow can cancel to near zero)."""
    got = np.asarray(got, float)
    want = np.asarray(want, float)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert np.all(np.isfinite(got)), f"{what}: not finite: {got}"
    assert err <= rtol * scale, (
        f"{what}: max error {err:.3g} > {rtol:g} * {scale:.3g}\ngot  {got}\nwant {want}"
    )


# ---------------------------------------------------------------------------
# layout


def test_kernel_layout():
    tl = load("two_layer_erf")
    assert tl.PARAMS == ("eta", "eta_v", "kappa", "sigma")
    assert tl.STATE == (("Q", ("K", "K")), ("R", ("K", "M")), ("v", ("K",)))
    assert tl.CONSTS == (("T", ("M", "M")), ("vs", ("M",)))
    assert tl.METRICS == ("eps_g",)
    assert tl.SAMPLES == ("G", "H_v")
    scm = load("scm_erf")
    assert scm.PARAMS == ("eta", "sigma")
    assert scm.STATE == (("Q", ("K", "K")), ("R", ("K", "M")))
    assert scm.CONSTS == (("T", ("M", "M")),)
    assert scm.SAMPLES == ("G",)
    for name in MODULES:
        mod = load(name)
        assert mod.MODEL + "_" + mod.ACTIVATION == name


@pytest.mark.parametrize("module", ["two_layer_erf", "scm_erf"])
def test_contraction_reads_the_table_where_tilt2_table_packs_it(module):
    """The weights of a contraction (derive/codegen.py: Contraction) are written at
    the offsets packed_offsets gives; the table at those tilt2_table fills: both
    must pack the triangle the same way, and packed_dot is the plain dot product."""
    mod = load(module)
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 16, 33):
        A = rng.normal(size=(n, n))
        C = A @ A.T / n + np.eye(n)
        a, b = (0, 0) if n == 1 else (0, 1)
        Dn, X, P = np.empty(n), np.empty(n * (n + 1) // 2), np.empty(n, np.int64)
        mod.tilt2_table(C, a, b, Dn, X, P)
        assert np.array_equal(mod.packed_offsets(n), P)
        W = rng.normal(size=X.size)
        assert mod.packed_dot(X, W) == pytest.approx(float(X @ W), rel=1e-13, abs=1e-15)
    # two_layer's pair terms read the table only through the contraction
    src = open(mod.__file__).read()
    rhs_ws = src[src.index("def rhs_ws") : src.index("def rhs_parallel")]
    assert "packed_dot(X, W0)" in rhs_ws and "X[P[" not in rhs_ws


# ---------------------------------------------------------------------------
# rhs and metrics against the reference


@pytest.mark.parametrize("module", ["two_layer_erf", "two_layer_linear"])
@pytest.mark.parametrize("i", range(N_STATES))
def test_two_layer_rhs_matches_reference(module, i):
    mod = load(module)
    Q, R, T, v, vs, params = state_case(i)
    dQ, dR, dv, eps = run(mod, Q, R, T, v, vs, params)
    rQ, rR, rv, reps = reference_flow(Q, R, T, v, vs, activation=mod.ACTIVATION, **params)
    tag = f"{module} K,M={R.shape} {params}"
    assert_rel(dQ, rQ, what=f"dQ {tag}")
    assert_rel(dR, rR, what=f"dR {tag}")
    assert_rel(dv, rv, what=f"dv {tag}")
    assert_rel(eps, reps, what=f"eps_g {tag}")


@pytest.mark.parametrize("K, M", [(9, 9), (13, 5), (6, 17)])
def test_two_layer_rhs_matches_reference_at_larger_sizes(K, M):
    """Sizes where the vectorised table loop (tilt2_table) runs whole vectors and
    remainders, and the triangular sums have long rows."""
    mod = load("two_layer_erf")
    rng = np.random.default_rng(100 * K + M)
    Q, R, T, v, vs = random_state(rng, K, M)
    params = {"eta": 0.7, "eta_v": 0.4, "kappa": 0.1, "sigma": 0.3}
    dQ, dR, dv, eps = run(mod, Q, R, T, v, vs, params)
    rQ, rR, rv, reps = reference_flow(Q, R, T, v, vs, activation="erf", **params)
    assert_rel(dQ, rQ, what=f"dQ K,M={K, M}")
    assert_rel(dR, rR, what=f"dR K,M={K, M}")
    assert_rel(dv, rv, what=f"dv K,M={K, M}")
    assert_rel(eps, reps, what=f"eps_g K,M={K, M}")


@pytest.mark.parametrize("module", ["scm_erf", "scm_linear"])
@pytest.mark.parametrize("i", range(N_STATES))
def test_scm_rhs_matches_reference(module, i):
    mod = load(module)
    Q, R, T, _, _, params = state_case(i)
    K, M = R.shape
    ones_k, ones_m = np.ones(K), np.ones(M)
    p = {"eta": params["eta"], "sigma": params["sigma"]}
    dQ, dR, dv, eps = run(mod, Q, R, T, ones_k, ones_m, p)
    assert dv is None, "scm has no readout in its state"
    rQ, rR, _, reps = reference_flow(
        Q,
        R,
        T,
        ones_k,
        ones_m,
        eta=p["eta"],
        eta_v=0.0,
        kappa=0.0,
        sigma=p["sigma"],
        activation=mod.ACTIVATION,
    )
    tag = f"{module} K,M={R.shape} {p}"
    assert_rel(dQ, rQ, what=f"dQ {tag}")
    assert_rel(dR, rR, what=f"dR {tag}")
    assert_rel(eps, reps, what=f"eps_g {tag}")


def test_reference_flow_is_sensitive():
    """The comparison has teeth: dropping the noise term, the eta^2 term or the
    decay changes the reference by far more than the tolerance."""
    Q, R, T, v, vs, params = state_case(5)
    base = reference_flow(Q, R, T, v, vs, activation="erf", **params)
    for change in (
        {"sigma": params["sigma"] + 0.1},
        {"kappa": params["kappa"] + 0.1},
        {"eta": params["eta"] * 1.01},
        {"eta_v": params["eta_v"] + 0.1},
    ):
        other = reference_flow(Q, R, T, v, vs, activation="erf", **{**params, **change})
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(base[:3], other[:3]))
        assert diff > 1e-6, change


# ---------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("activation", ["erf", "linear"])
@pytest.mark.parametrize("i", range(8))
def test_scm_equals_two_layer_with_unit_readouts(activation, i):
    scm, tl = load(f"scm_{activation}"), load(f"two_layer_{activation}")
    Q, R, T, _, _, params = state_case(i)
    K, M = R.shape
    ones_k, ones_m = np.ones(K), np.ones(M)
    a = run(scm, Q, R, T, ones_k, ones_m, {"eta": params["eta"], "sigma": params["sigma"]})
    b = run(
        tl,
        Q,
        R,
        T,
        ones_k,
        ones_m,
        {"eta": params["eta"], "eta_v": 0.0, "kappa": 0.0, "sigma": params["sigma"]},
    )
    for name, x, y in (("dQ", a[0], b[0]), ("dR", a[1], b[1]), ("eps_g", a[3], b[3])):
        assert_rel(x, y, rtol=1e-14, what=f"{name} {activation} K,M={R.shape}")
    assert np.all(b[2] == 0.0), "frozen readout (eta_v = 0, kappa = 0) must not move"


@pytest.mark.parametrize("module", MODULES)
def test_dQ_is_symmetric(module):
    mod = load(module)
    for i in range(N_STATES):
        Q, R, T, v, vs, params = state_case(i)
        dQ = run(mod, Q, R, T, v, vs, params)[0]
        assert_rel(dQ, dQ.T, rtol=1e-13, what=f"dQ - dQ^T {module} case {i}")


@pytest.mark.parametrize("module", MODULES)
def test_eps_g_nonnegative(module):
    mod = load(module)
    rng = np.random.default_rng(31)
    for _ in range(50):
        K, M = (int(x) for x in rng.integers(1, 5, size=2))
        Q, R, T, v, vs = random_state(rng, K, M)
        params = {"eta": 1.0, "eta_v": 1.0, "kappa": 0.0, "sigma": 0.5}
        eps = run(mod, Q, R, T, v, vs, params)[3]
        assert eps >= -1e-14, f"{module}: eps_g = {eps} at K, M = {K}, {M}"


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_teacher_equal_start_is_fixed_point(module, K):
    mod = load(module)
    rng = np.random.default_rng(77 + K)
    M = K
    _, _, T, _, vs = random_state(rng, K, M)
    if mod.MODEL == "scm":
        vs = np.ones(M)
    params = {
        "eta": float(rng.uniform(0.2, 2.0)),
        "eta_v": float(rng.uniform(0.2, 2.0)),
        "kappa": 0.0,
        "sigma": 0.0,
    }
    dQ, dR, dv, eps = run(mod, T.copy(), T.copy(), T, vs.copy(), vs, params)
    assert np.max(np.abs(dQ)) <= 1e-12, dQ
    assert np.max(np.abs(dR)) <= 1e-12, dR
    if dv is not None:
        assert np.max(np.abs(dv)) <= 1e-12, dv
    assert abs(eps) <= 1e-12, eps


@pytest.mark.parametrize("module", ["two_layer_erf", "scm_erf"])
def test_noise_moves_the_fixed_point(module):
    """With sigma > 0 the teacher-equal start is no longer fixed (dQ gets
    eta^2 sigma^2 v_k v_l J2) while eps_g (noise excluded) stays 0."""
    mod = load(module)
    T = np.array([[1.0, 0.2], [0.2, 0.8]])
    vs = np.array([0.7, -1.3]) if mod.MODEL == "two_layer" else np.ones(2)
    eta, sigma = 0.9, 0.4
    dQ, dR, _, eps = run(
        mod, T.copy(), T.copy(), T, vs.copy(), vs, {"eta": eta, "eta_v": 0.5, "kappa": 0.0, "sigma": sigma}
    )
    J2 = (2 / np.pi) / np.sqrt(np.outer(1 + np.diag(T), 1 + np.diag(T)) - T**2)
    assert_rel(dQ, eta**2 * sigma**2 * np.outer(vs, vs) * J2, rtol=1e-13, what="dQ")
    assert np.max(np.abs(dR)) <= 1e-13
    assert abs(eps) <= 1e-13


def test_weight_decay_alone():
    """With eta = eta_v = 0 only the decay acts: dQ = -2 kappa Q, dR = -kappa R,
    and the readout decays only when it is trained (eta_v != 0)."""
    mod = load("two_layer_erf")
    rng = np.random.default_rng(5)
    Q, R, T, v, vs = random_state(rng, 3, 2)
    kappa = 0.3
    dQ, dR, dv, _ = run(mod, Q, R, T, v, vs, {"eta": 0.0, "eta_v": 0.0, "kappa": kappa, "sigma": 0.7})
    assert_rel(dQ, -2 * kappa * Q, what="dQ")
    assert_rel(dR, -kappa * R, what="dR")
    assert np.all(dv == 0.0), "eta_v = 0 freezes the readout, decay included"
    dv = run(mod, Q, R, T, v, vs, {"eta": 0.0, "eta_v": 1e-300, "kappa": kappa, "sigma": 0.0})[2]
    assert_rel(dv, -kappa * v, what="dv with a trained readout")


# ---------------------------------------------------------------------------
# per-sample gradients against finite differences of the per-sample loss

ACT = {"erf": lambda z: erf(z / math.sqrt(2)), "linear": lambda z: z}


def sample_loss(lam, nu, zeta, v, vs, sigma, activation):
    g = ACT[activation]
    f = np.sum(v * g(lam))
    y = np.sum(vs * g(nu)) + sigma * zeta
    return 0.5 * (f - y) ** 2


def fd(fun, x, h=1e-3):
    """Fourth-order central differences of fun at every component of x."""
    out = np.empty_like(x)
    for i in range(x.size):

        def at(t):
            z = x.copy()
            z[i] += t
            return fun(z)

        out[i] = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
    return out


@pytest.mark.parametrize("module", MODULES)
def test_sample_gradients_match_finite_differences(module):
    mod = load(module)
    act = mod.ACTIVATION
    rng = np.random.default_rng(11)
    for _ in range(10):
        K, M = (int(x) for x in rng.integers(1, 5, size=2))
        lam = rng.normal(size=K) * 1.5
        nu = rng.normal(size=M) * 1.5
        zeta = float(rng.normal())
        if mod.MODEL == "two_layer":
            v, vs = rng.normal(size=K), rng.normal(size=M)
            vec = np.concatenate([v, vs])
            params = {"eta": 0.7, "eta_v": 0.3, "kappa": 0.1, "sigma": float(rng.uniform(0, 1))}
        else:
            v, vs = np.ones(K), np.ones(M)
            vec = np.zeros(0)
            params = {"eta": 0.7, "sigma": float(rng.uniform(0, 1))}
        p = np.array([params[n] for n in mod.PARAMS])
        sigma = params["sigma"]
        out = np.full(K * len(mod.SAMPLES), np.nan)
        mod.sample_gradients(lam, nu, zeta, vec, p, K, M, out)

        G_fd = fd(lambda x: sample_loss(x, nu, zeta, v, vs, sigma, act), lam)
        G = out[mod.SAMPLES.index("G") * K :][:K]
        np.testing.assert_allclose(G, G_fd, rtol=1e-8, atol=1e-9, err_msg=f"G {module} K,M={K},{M}")
        if "H_v" in mod.SAMPLES:
            H_fd = fd(lambda x: sample_loss(lam, nu, zeta, x, vs, sigma, act), v)
            H = out[mod.SAMPLES.index("H_v") * K :][:K]
            np.testing.assert_allclose(H, H_fd, rtol=1e-8, atol=1e-9, err_msg=f"H_v {module} K,M={K},{M}")
